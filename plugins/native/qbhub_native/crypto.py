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

from qubes_backup_hub.errors import IntegrityError, KdfParametersError, PassphraseError, UsageError

MASTER_KEY_BYTES = 64
ID_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SUITE_AES = "aes-256-gcm"
SUITE_NONE = "none"
CONTEXT_ENCRYPTION = "qbhub 2026-11 v1 blob encryption"
CONTEXT_ID = "qbhub 2026-11 v1 blob id"
CONTEXT_FINGERPRINT = "qbhub 2026-11 v1 archive fingerprint"
CONTEXT_ROOT = "qbhub 2026-12 v2 root body"  # format 2: the root's own key, never granted
FINGERPRINT_HEX = 32
KEY_WRAP_AAD = b"qbhub-v1-key-wrap:"

# scrypt cost for new archives: N=2^17, r=8, p=1 uses 128 MiB and about 0.5 s here.
DEFAULT_KDF = {"name": "scrypt", "n": 1 << 17, "r": 8, "p": 1}
# What a reader accepts (the parameters come from storage before anything is authenticated):
# N a power of two in [2^10, 2^20], 1 <= r <= 32, 1 <= p <= 16, memory 128*N*r <= 256 MiB and
# work N*r*p <= 2^22 (4x the default). Archives made with the old default N=2^16 stay readable.
MIN_KDF_N = 1 << 10
MAX_KDF_N = 1 << 20
MAX_KDF_R = 32
MAX_KDF_P = 16
MAX_KDF_MEMORY = 256 << 20  # bytes: 128 * N * r
MAX_KDF_WORK = 1 << 22  # N * r * p
# Tests only: a cheaper N for archives this process *creates* (never applied to reading).
TEST_KDF_ENV = "QBHUB_TEST_KDF_LOG2_N"


def check_kdf(kdf: object) -> tuple[int, int, int]:
    """Return scrypt's (N, r, p) if `kdf` is within the documented bounds.

    Guarantee: whatever storage put in the root header, the KDF this returns for uses at most
    MAX_KDF_MEMORY bytes and MAX_KDF_WORK units of work; anything else is KdfParametersError.
    """
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        name = kdf.get("name") if isinstance(kdf, dict) else None
        raise KdfParametersError(f"unknown key derivation function {name!r} in the archive root")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise KdfParametersError("malformed scrypt parameters in the archive root")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if not (
        MIN_KDF_N <= n <= MAX_KDF_N
        and n & (n - 1) == 0
        and 1 <= r <= MAX_KDF_R
        and 1 <= p <= MAX_KDF_P
        and 128 * n * r <= MAX_KDF_MEMORY
        and n * r * p <= MAX_KDF_WORK
    ):
        raise KdfParametersError(
            f"refused scrypt parameters n={n} r={r} p={p} from the archive root (allowed: n a "
            f"power of two in [2^10, 2^20], r <= {MAX_KDF_R}, p <= {MAX_KDF_P}, 128*n*r <= "
            f"256 MiB, n*r*p <= 2^22)"
        )
    return n, r, p


def derive_kek(passphrase: bytes, kdf: dict[str, object], salt: bytes) -> bytes:
    """Derive the 32-byte key-encryption key from a passphrase with the recorded KDF params.

    The parameters are checked first (check_kdf): a hostile header costs bounded memory and time.
    """
    n, r, p = check_kdf(kdf)
    # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B; leave a little slack.
    maxmem = 128 * r * (n + 2 + p) + (1 << 20)
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32)


def new_kdf_params() -> dict[str, object]:
    """The KDF parameters for a key wrapped now: DEFAULT_KDF, unless a test asked for less.

    Only the local environment of the process creating the wrap (TEST_KDF_ENV) can lower N;
    nothing read from storage is involved, and readers accept any in-bounds parameters anyway.
    """
    kdf: dict[str, object] = dict(DEFAULT_KDF)
    wanted = os.environ.get(TEST_KDF_ENV)
    if wanted:
        if not wanted.isdigit() or not 10 <= int(wanted) <= 20:
            raise UsageError(f"{TEST_KDF_ENV} must be an integer in [10, 20]")
        kdf["n"] = 1 << int(wanted)
    return kdf


def wrap_aad(archive_id: bytes, fmt: int) -> bytes:
    """What the wrapped key is bound to: the archive ID and, from format 2 on, the format, so a
    header cannot claim an older format (whose root a worker's key could seal) and still unwrap."""
    return KEY_WRAP_AAD + archive_id + (f"|format {fmt}".encode() if fmt >= 2 else b"")


def wrap_key(
    master: bytes, passphrase: bytes, archive_id: bytes, fmt: int
) -> tuple[dict[str, object], bytes]:
    """Wrap `master` under a fresh salt; return (kdf params incl. salt hex, wrapped bytes)."""
    salt = os.urandom(16)
    kdf: dict[str, object] = {**new_kdf_params(), "salt": salt.hex()}
    kek = derive_kek(passphrase, kdf, salt)
    nonce = os.urandom(NONCE_BYTES)
    return kdf, nonce + AESGCM(kek).encrypt(nonce, master, wrap_aad(archive_id, fmt))


def unwrap_key(
    wrapped: bytes, passphrase: bytes, kdf: dict[str, object], archive_id: bytes, fmt: int
) -> bytes:
    """Recover the master key; PassphraseError if the passphrase (or the wrapped key) is wrong."""
    check_kdf(kdf)
    salt_hex = kdf.get("salt")
    if not isinstance(salt_hex, str) or len(salt_hex) != 32:
        raise IntegrityError("malformed KDF salt in the archive root")
    kek = derive_kek(passphrase, kdf, bytes.fromhex(salt_hex))
    try:
        master = AESGCM(kek).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], wrap_aad(archive_id, fmt)
        )
    except InvalidTag:
        raise PassphraseError("wrong passphrase (or a damaged archive key)") from None
    if len(master) != MASTER_KEY_BYTES:
        raise IntegrityError("the unwrapped archive key has the wrong length")
    return master


def key_fingerprint(master: bytes) -> str:
    """A one-way fingerprint of the master key: 32 hex characters of a BLAKE3 derivation.

    It names the key in this machine's rollback memory; it survives passphrase changes (the master
    key stays), does not depend on the suite, and reveals nothing usable about the key.
    """
    digest = blake3.blake3(master, derive_key_context=CONTEXT_FINGERPRINT).hexdigest()
    return digest[:FINGERPRINT_HEX]


@dataclass(frozen=True)
class Keys:
    """Subkeys derived from the master key: one for sealing, one for blob IDs.

    `id_key` is None for keys handed to a restore worker (a read grant): such keys open blobs and
    the root body but can't compute blob IDs, so they can't be used to write anything new.
    """

    suite: str
    encryption_key: bytes
    id_key: bytes | None

    @classmethod
    def from_master(cls, suite: str, master: bytes) -> Keys:
        if suite not in (SUITE_AES, SUITE_NONE):
            raise IntegrityError(f"unknown encryption suite {suite!r}")
        enc = blake3.blake3(master, derive_key_context=CONTEXT_ENCRYPTION).digest()
        ident = blake3.blake3(master, derive_key_context=CONTEXT_ID).digest()
        return cls(suite, enc, ident)

    @classmethod
    def for_root(cls, suite: str, master: bytes, fmt: int) -> Keys:
        """The keys that seal the root body. Format 1 used the blob key, which a restore worker
        holds (so a worker could seal a root dom0 accepts); format 2 derives a key of its own,
        which only holders of the master key have."""
        if fmt < 2:
            return cls.from_master(suite, master)
        if suite not in (SUITE_AES, SUITE_NONE):
            raise IntegrityError(f"unknown encryption suite {suite!r}")
        return cls(suite, blake3.blake3(master, derive_key_context=CONTEXT_ROOT).digest(), None)

    @classmethod
    def for_reading(cls, suite: str, encryption_key: bytes) -> Keys:
        """Keys that only open sealed objects (see `id_key`)."""
        if suite not in (SUITE_AES, SUITE_NONE):
            raise IntegrityError(f"unknown encryption suite {suite!r}")
        if len(encryption_key) != 32:
            raise IntegrityError("a read grant's key has the wrong length")
        return cls(suite, encryption_key, None)


class Sealer:
    """Seals and opens byte strings under the archive's suite; computes keyed IDs."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._aead = AESGCM(keys.encryption_key) if keys.suite == SUITE_AES else None

    def blob_id(self, type_code: int, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of one type byte followed by `data`: the blob's 32-byte ID."""
        if self.keys.id_key is None:
            raise UsageError("this archive was opened with a read grant: it can only be read")
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
