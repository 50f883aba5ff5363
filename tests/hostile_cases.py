"""The hostile-storage matrix's case table: which tamper classes apply to which object kind,
which commands each (kind, tamper) runs, and what each case may answer (exit codes, success).

tests/test_hostile_matrix.py builds the archive, applies the tampers and runs the cases.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTE_DAMAGE = ("trunc0", "trunc-half", "trunc1", "append", "flip-start", "flip-mid", "flip-end")
SUBSTITUTIONS = ("subst-off", "subst-enc")
PACKS = ("pack1", "pack2")
# Damage that keeps a pack's size: only reading the bytes back finds it.
SAME_SIZE_DAMAGE = ("flip-start", "flip-mid", "swap")

# Which tampers apply to which kind, and the commands each (kind, tamper) is run with.
R, L, V, B, X = "restore", "list", "verify", "backup", "extract"
_PACK = {
    **{t: (R, V, B) for t in ("delete", *BYTE_DAMAGE, "swap", "dir")},
    "fifo": (R, V, B, X),
    "symlink": (R, V, B, X),
    "huge": (R, V, B, X),
}
MATRIX: dict[str, dict[str, tuple[str, ...]]] = {
    "root": {
        "delete": (R, L, V, B),
        **{t: (R, L, B) for t in BYTE_DAMAGE},
        "replay": (R, L, V, B),
        "fifo": (R, L, V, B, X),
        "symlink": (R, L, V, B, X),
        "dir": (R, L, V, B, X),
        "huge": (R, L, V, B, X),
        "subst-off": (R, L, V, B, X),
        "subst-enc": (R, L, V, B, X),
    },
    "pack1": {**_PACK, "flip-mid": (R, V, B, X), "delete": (R, V, B, X)},
    "pack2": {**_PACK, "trunc-half": (R, V, B, X)},
    "index": {
        **{t: (R, L, B) for t in ("delete", *BYTE_DAMAGE, "dir")},
        "swap": (R, L, B, X),
        "fifo": (R, L, V, B, X),
        "symlink": (R, L, V, B, X),
        "huge": (R, L, V, B, X),
    },
    "lock": {t: (R, B) for t in ("delete", "append", "fifo", "symlink", "dir", "huge")},
    "fanout": {
        "delete": (R, V, B),
        "swap": (R, L, V, B),
        "fifo": (R, L, V, B, X),
        "symlink": (R, L, V, B, X),
        "file": (R, V, B),
    },
    "objects": {
        "delete": (R, L, V, B),
        "fifo": (R, L, V, B, X),
        "symlink": (R, L, V, B, X),
        "file": (R, L, V, B),
    },
}


@dataclass(frozen=True)
class Case:
    kind: str
    tamper: str
    command: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.tamper}-{self.command}"

    def allowed_codes(self) -> set[int]:
        """The documented exit codes a refusal may use."""
        if self.tamper == "replay":
            codes = {4}
        elif self.tamper == "subst-off":
            codes = {3}
        elif self.tamper == "subst-enc":
            codes = {3, 5}  # another archive: the user's passphrase does not open it
        elif self.kind == "root" and self.tamper == "delete":
            codes = {3, 4, 6, 7}
        elif self.kind == "root" and self.tamper in BYTE_DAMAGE:
            codes = {3, 5}  # damage in the header may hit the wrapped key: "wrong passphrase"
        else:
            codes = {3, 6}
        if self.command == X:
            codes -= {4}  # the extractor keeps no memory
        return codes

    def may_succeed(self) -> bool:
        """Whether exit 0 (with a correct result) is acceptable at all."""
        if self.tamper in ("replay", *SUBSTITUTIONS):
            return False
        # A 10 GiB object must be refused by its size by whatever needs to read it whole. A
        # backup may succeed by storing again what it needs (the restore check decides); the
        # lock file is never read; a restore reads only authenticated ranges of a pack, so a
        # pack with 10 GiB of holes after its bytes restores correctly (the check decides).
        if self.tamper != "huge" or self.kind == "lock" or self.command == B:
            return True
        return self.kind in PACKS and self.command in (R, X)


CASES = [
    Case(kind, tamper, command)
    for kind, tampers in MATRIX.items()
    for tamper, commands in tampers.items()
    for command in commands
]
assert len({c.id for c in CASES}) == len(CASES)
