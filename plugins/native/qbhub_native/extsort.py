"""External sorting of fixed-size records: sorted, de-duplicated runs on local disk, merged.

Why: prune and verify need sets as large as the archive (every blob a session reaches, every
index entry grouped by pack); held as Python sets or dicts they cost about 100 bytes of RAM per
blob. A `RunSorter` keeps at most `run_records` records in memory: each full buffer is sorted and
written as a run to an unlinked temporary file, and `sorted()` merges the runs, reading each in
small slices. Memory: the buffer (under 20 MB at the default size) plus one slice per run.

Temporary files live in a directory of the local state (beside the index cache), are named with
the index cache's temporary mark and this process's ID (so a later cache rebuild removes those
of a killed process), and are unlinked as soon as they are open.
"""

from __future__ import annotations

import heapq
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .index_cache import TMP_MARK

RUN_RECORDS = 1 << 18  # records sorted in memory at once: 8 MiB of 32-byte IDs
READ_SLICE = 1 << 16  # bytes read from a run at a time


class RunSorter:
    """Collects records of `size` bytes; yields them sorted (bytewise), each distinct one once."""

    def __init__(self, directory: Path, size: int, run_records: int = RUN_RECORDS) -> None:
        self.directory = directory
        self.size = size
        self.run_records = max(1, run_records)
        self.buffer = bytearray()
        self.runs: list[BinaryIO] = []
        self.added = 0

    def add(self, record: bytes) -> None:
        """Add one record (exactly `size` bytes)."""
        if len(record) != self.size:
            raise ValueError(f"a record of {len(record)} bytes, not {self.size}")
        self.buffer += record
        self.added += 1
        if len(self.buffer) >= self.run_records * self.size:
            self._spill()

    def _sorted_buffer(self) -> list[bytes]:
        n = self.size
        data = bytes(self.buffer)
        self.buffer = bytearray()
        return sorted({data[k : k + n] for k in range(0, len(data), n)})

    def _spill(self) -> None:
        records = self._sorted_buffer()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-sort"
        f = open(path, "w+b")  # noqa: SIM115 - lives as long as this sorter
        try:
            path.unlink()
            for start in range(0, len(records), 4096):
                f.write(b"".join(records[start : start + 4096]))
            f.flush()
        except BaseException:
            f.close()
            raise
        self.runs.append(f)

    def _read_run(self, f: BinaryIO) -> Iterator[bytes]:
        n = self.size
        step = max(n, READ_SLICE // n * n)
        f.seek(0)
        while True:
            data = f.read(step)
            if not data:
                return
            if len(data) % n:
                raise OSError("a sorted run was cut short")
            for k in range(0, len(data), n):
                yield data[k : k + n]

    def sorted(self) -> Iterator[bytes]:
        """Every distinct record added, in byte order (once; the sorter is then spent)."""
        if not self.runs:
            yield from self._sorted_buffer()
            return
        if self.buffer:
            self._spill()
        previous = b""
        for record in heapq.merge(*(self._read_run(f) for f in self.runs)):
            if record != previous:
                previous = record
                yield record
        self.close()

    def close(self) -> None:
        """Drop the runs (their files are already unlinked)."""
        for f in self.runs:
            f.close()
        self.runs = []
        self.buffer = bytearray()

    def __enter__(self) -> RunSorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
