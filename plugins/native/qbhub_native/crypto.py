"""Keys and sealing: the passphrase KDF, key wrapping, keyed blob IDs and the blob AEAD.

Two suites exist. `aes-256-gcm`: every sealed object is nonce(12) || AES-256-GCM ciphertext and
tag(16), with associated data binding it to its identity. `none` (encryption off): the plaintext
followed by a 16-byte keyed BLAKE3 tag, whose key is stored in the clear: it catches accidents,
not attackers. In both, IDs are keyed BLAKE3 hashes, so equal IDs mean equal content.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qubes_backup_hub.errors import IntegrityError, PassphraseError

MASTER_KEY_BYTES = 64
ID_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SUITE_AES = "aes-256-gcm"
SUITE_NONE = "none"
CONTEXT_ENCRYPTION = "qbhub 2026-11 v1 blob encryption"
CONTEXT_ID = "qbhub 2026-11 v1 blob id"
KEY_WRAP_AAD = b"qbhub-v1-key-wrap:"

# scrypt cost: N=2^16, r=8, p=1 uses 64 MiB and about 0.2 s here.
DEFAULT_KDF = {"name": "scrypt", "n": 1 << 16, "r": 8, "p": 1}
MAX_KDF_N = 1 << 22


def derive_kek(passphrase: bytes, kdf: dict[str, object], salt: bytes) -> bytes:
    """Derive the 32-byte key-encryption key from a passphrase with the recorded KDF params."""
    if kdf.get("name") != "scrypt":
        raise IntegrityError(f"unknown key derivation function {kdf.get('name')!r}")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not all(isinstance(v, int) for v in (n, r, p)):
        raise IntegrityError("malformed scrypt parameters in the archive root")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if not (2 <= n <= MAX_KDF_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise IntegrityError(f"refused scrypt parameters n={n} r={r} p={p}")
    return hashlib.scrypt(
        passphrase, salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * p + (32 << 20), dklen=32
    )


def wrap_key(
    master: bytes, passphrase: bytes, archive_id: bytes
) -> tuple[dict[str, object], bytes]:
    """Wrap `master` under a fresh salt; return (kdf params incl. salt hex, wrapped bytes)."""
    salt = os.urandom(16)
    kdf: dict[str, object] = {**DEFAULT_KDF, "salt": salt.hex()}
    kek = derive_kek(passphrase, kdf, salt)
    nonce = os.urandom(NONCE_BYTES)
    return kdf, nonce + AESGCM(kek).encrypt(nonce, master, KEY_WRAP_AAD + archive_id)


def unwrap_key(
    wrapped: bytes, passphrase: bytes, kdf: dict[str, object], archive_id: bytes
) -> bytes:
    """Recover the master key; PassphraseError if the passphrase (or the wrapped key) is wrong."""
    salt_hex = kdf.get("salt")
    if not isinstance(salt_hex, str) or len(salt_hex) != 32:
        raise IntegrityError("malformed KDF salt in the archive root")
    kek = derive_kek(passphrase, kdf, bytes.fromhex(salt_hex))
    try:
        master = AESGCM(kek).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], KEY_WRAP_AAD + archive_id
        )
    except InvalidTag:
        raise PassphraseError("wrong passphrase (or a damaged archive key)") from None
    if len(master) != MASTER_KEY_BYTES:
        raise IntegrityError("the unwrapped archive key has the wrong length")
    return master


@dataclass(frozen=True)
class Keys:
    """Subkeys derived from the master key: one for sealing, one for blob IDs."""

    suite: str
    encryption_key: bytes
    id_key: bytes

    @classmethod
    def from_master(cls, suite: str, master: bytes) -> Keys:
        if suite not in (SUITE_AES, SUITE_NONE):
            raise IntegrityError(f"unknown encryption suite {suite!r}")
        enc = blake3.blake3(master, derive_key_context=CONTEXT_ENCRYPTION).digest()
        ident = blake3.blake3(master, derive_key_context=CONTEXT_ID).digest()
        return cls(suite, enc, ident)


class Sealer:
    """Seals and opens byte strings under the archive's suite; computes keyed IDs."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._aead = AESGCM(keys.encryption_key) if keys.suite == SUITE_AES else None

    def blob_id(self, type_code: int, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of one type byte followed by `data`: the blob's 32-byte ID."""
        hasher = blake3.blake3(bytes((type_code,)), key=self.keys.id_key)
        hasher.update(data)
        return hasher.digest()

    def seal(self, aad: bytes, plaintext: bytes | bytearray) -> bytes | bytearray:
        """Return the sealed form of `plaintext`, bound to `aad`."""
        if self._aead is not None:
            nonce = os.urandom(NONCE_BYTES)
            if not hasattr(self._aead, "encrypt_into"):  # cryptography < 44
                return nonce + self._aead.encrypt(nonce, plaintext, aad)
            out = bytearray(NONCE_BYTES + len(plaintext) + TAG_BYTES)
            out[:NONCE_BYTES] = nonce
            self._aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[NONCE_BYTES:])
            return out
        return bytes(plaintext) + self._tag(aad, plaintext)

    def open(self, aad: bytes, sealed: bytes | memoryview, what: str) -> bytes:
        """Authenticate and return the plaintext; IntegrityError naming `what` if it fails."""
        if len(sealed) < TAG_BYTES + (NONCE_BYTES if self._aead else 0):
            raise IntegrityError(f"{what} is truncated")
        if self._aead is not None:
            try:
                return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
            except InvalidTag:
                raise IntegrityError(f"{what} failed authentication") from None
        plaintext = bytes(sealed[:-TAG_BYTES])
        if self._tag(aad, plaintext) != bytes(sealed[-TAG_BYTES:]):
            raise IntegrityError(f"{what} failed its checksum")
        return plaintext

    def _tag(self, aad: bytes, plaintext: bytes | bytearray) -> bytes:
        hasher = blake3.blake3(len(aad).to_bytes(4, "little"), key=self.keys.encryption_key)
        hasher.update(aad)
        hasher.update(plaintext)
        return hasher.digest(length=TAG_BYTES)

    @property
    def overhead(self) -> int:
        """Bytes a sealed object carries beyond its plaintext."""
        return TAG_BYTES + (NONCE_BYTES if self._aead else 0)
