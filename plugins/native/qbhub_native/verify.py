"""Verifying an archive: every session record, every tree page, every referenced blob.

Quick: authenticate the root, indexes, session records and all tree pages, and check that every
referenced chunk is indexed and every indexed pack exists with a plausible size. Full: also read
every pack whole, authenticate and decompress every indexed blob, and re-hash it against its ID.

Verify does not stop at the first problem. It collects every damaged object (missing, truncated or
tampered pack, blob that fails, tree page, session record, index object), maps each to the
sessions and volumes that reference it, and returns them under "damaged" (the first
MAX_LISTED; the rest are counted and their sessions and volumes summed up under
"damaged_unlisted"). The caller turns a non-empty report into exit status 3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qubes_backup_hub.errors import IntegrityError, QbhubError
from qubes_backup_hub.progress import Progress

from .blob import BlobType
from .index import Index
from .limits import MAX_PACK
from .pack import PackEntry, pack_name, plausible_size, read_trailer
from .repository import Repository
from .root import SessionRef
from .session import VolumeRecord
from .tree import ZERO_ID, Geometry, check_height, split_ids

MAX_LISTED = 1000  # damaged objects listed one by one; more are only counted
OVERFLOW = -1  # the problem number of every damaged object beyond MAX_LISTED
NO_PROBLEMS: frozenset[int] = frozenset()


@dataclass
class Reachable:
    """Blob IDs reachable from a set of sessions, by kind."""

    records: set[bytes] = field(default_factory=set)
    pages: set[bytes] = field(default_factory=set)
    chunks: set[bytes] = field(default_factory=set)

    def all(self) -> set[bytes]:
        return self.records | self.pages | self.chunks


def walk_sessions(repo: Repository, session_ids: set[str] | None = None) -> Reachable:
    """Authenticate the records and tree pages of the sessions (all by default); collect IDs.

    Shared subtrees are read once.
    """
    seen = Reachable()
    for ref in repo.body.sessions:
        if session_ids is not None and ref.session_id not in session_ids:
            continue
        seen.records.add(ref.record)
        for volume in repo.session_record(ref).volumes:
            _walk(repo, volume.tree_id, volume.geometry, volume.geometry.height, 0, seen)
    return seen


def _walk(
    repo: Repository, page_id: bytes, geometry: Geometry, level: int, index: int, seen: Reachable
) -> None:
    if page_id == ZERO_ID or page_id in seen.pages:
        return
    seen.pages.add(page_id)
    entries = repo.load_page(page_id, level, geometry.children(level, index))
    children = split_ids(entries)
    if level == 0:
        seen.chunks.update(c for c in children if c != ZERO_ID)
        return
    for k, child in enumerate(children):
        _walk(repo, child, geometry, level - 1, index * geometry.fanout + k, seen)


@dataclass
class Damage:
    """One damaged object, and the sessions and volumes that reference it."""

    what: str
    problem: str
    sessions: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)

    def as_dict(self, order: dict[str, int]) -> dict[str, object]:
        return {
            "object": self.what,
            "problem": self.problem,
            "sessions": sorted(self.sessions, key=lambda s: order.get(s, len(order))),
            "volumes": sorted(self.volumes),
        }


class DamageReport:
    """Problems found, each object once, with a bounded listing.

    `add` returns a problem number to attach referencing sessions to; beyond `limit` objects,
    every new problem shares the number OVERFLOW (counted, summed up, not listed).
    """

    def __init__(self, limit: int = MAX_LISTED) -> None:
        self.limit = limit
        self.listed: list[Damage] = []
        self.numbers: dict[object, int] = {}
        self.overflow = Damage("", "")
        self.total = 0

    def add(self, key: object, what: str, problem: str) -> int:
        number = self.numbers.get(key)
        if number is not None:
            return number
        self.total += 1
        number = len(self.listed) if len(self.listed) < self.limit else OVERFLOW
        if number != OVERFLOW:
            self.listed.append(Damage(what, problem))
        self.numbers[key] = number
        return number

    def damage(self, number: int) -> Damage:
        return self.overflow if number == OVERFLOW else self.listed[number]

    def attach(self, number: int, session: str, volume: str | None = None) -> None:
        found = self.damage(number)
        found.sessions.add(session)
        if volume is not None:
            found.volumes.add(volume)

    def result(self, session_order: dict[str, int]) -> dict[str, object]:
        """The report part of verify's result."""
        out: dict[str, object] = {
            "damaged": [d.as_dict(session_order) for d in self.listed],
            "damaged_count": self.total,
        }
        if self.total > len(self.listed):
            unlisted = self.overflow.as_dict(session_order)
            out["damaged_unlisted"] = {
                "count": self.total - len(self.listed),
                "sessions": unlisted["sessions"],
                "volumes": unlisted["volumes"],
            }
        return out


class TolerantRepository(Repository):
    """A Repository that opens even when index objects fail, recording them for verify.

    Everything else `Repository.open` checks (root, key, rollback) is unchanged. The blobs a bad
    index object listed are then missing from the index, and verify reports what lacks them.
    """

    index_problems: list[tuple[str, str]]

    def _load_indexes(self) -> None:
        self.index_problems = []
        for name, raw_length in self.body.indexes:
            part = Index()
            try:
                self.index_object_entries(name, raw_length, into=part)
            except QbhubError as exc:
                self.index_problems.append((name, str(exc)))
                continue
            for table in part.tables():
                self.index.add_table(table)


class DamageWalker:
    """Walks session trees, each page once, mapping every problem below a page to that page."""

    def __init__(self, repo: Repository, report: DamageReport, bad: dict[bytes, int]) -> None:
        self.repo = repo
        self.report = report
        self.bad = bad  # blob ID -> problem number, from the pack checks
        self.memo: dict[bytes, frozenset[int]] = {}
        self.chunks: set[bytes] = set()
        self.missing_from_index: set[int] = set()

    def volume(self, volume: VolumeRecord) -> frozenset[int]:
        geometry = volume.geometry
        try:
            check_height(geometry)
        except IntegrityError as exc:
            key = ("volume", volume.tree_id)
            return frozenset((self.report.add(key, f"volume tree {volume.tree[:16]}", str(exc)),))
        return self._page(volume.tree_id, geometry, geometry.height, 0)

    def indexed(self, blob_id: bytes, type_code: int, what: str) -> int | None:
        """The problem number of a referenced blob that is damaged or not properly indexed."""
        number = self.bad.get(blob_id)
        if number is not None:
            return number
        loc = self.repo.index.get(blob_id)
        if loc is not None and loc.type_code == type_code:
            return None
        problem = "is referenced but not in the index" if loc is None else "has the wrong type"
        number = self.report.add(blob_id, what, problem)
        if loc is None:
            self.missing_from_index.add(number)
        return number

    def _page(self, page_id: bytes, geometry: Geometry, level: int, index: int) -> frozenset[int]:
        if page_id == ZERO_ID:
            return NO_PROBLEMS
        known = self.memo.get(page_id)
        if known is not None:
            return known
        what = f"tree page {page_id.hex()}"
        number = self.indexed(page_id, BlobType.TREE, what)
        entries = b""
        if number is None:
            try:
                entries = self.repo.load_page(page_id, level, geometry.children(level, index))
            except QbhubError as exc:
                number = self.report.add(page_id, what, str(exc))
        if number is not None:
            found = frozenset((number,))
        elif level == 0:
            found = self._leaf(split_ids(entries))
        else:
            found = NO_PROBLEMS.union(
                *(
                    self._page(child, geometry, level - 1, index * geometry.fanout + k)
                    for k, child in enumerate(split_ids(entries))
                )
            )
        self.memo[page_id] = found or NO_PROBLEMS
        return self.memo[page_id]

    def _leaf(self, chunks: list[bytes]) -> frozenset[int]:
        problems = set()
        for chunk in chunks:
            if chunk == ZERO_ID:
                continue
            self.chunks.add(chunk)
            number = self.indexed(chunk, BlobType.DATA, f"chunk {chunk.hex()}")
            if number is not None:
                problems.add(number)
        return frozenset(problems) if problems else NO_PROBLEMS


def verify_archive(repo: Repository, *, quick: bool, progress: Progress) -> dict[str, object]:
    """Check the archive and report every damaged object with what it affects; never raises
    IntegrityError for damage it can attribute (the result's "damaged" list says it all).

    Works on any opened Repository; a TolerantRepository also reports bad index objects.
    """
    report = DamageReport()
    sizes = dict(repo.store.list())
    packs = repo.index.by_pack()
    bad: dict[bytes, int] = {}
    _check_presence(repo, packs, sizes, report, bad, sizes_matter=quick)
    blobs = total = 0
    if not quick:
        present = {name: entries for name, entries in packs.items() if name in sizes}
        total = sum(sizes[name] for name in present)
        blobs = _check_packs(repo, present, sizes, report, bad, progress, total)
    walker = DamageWalker(repo, report, bad)
    for ref in repo.body.sessions:
        _check_session(repo, ref.session_id, ref, walker, report)
    for name, problem in getattr(repo, "index_problems", []):
        number = report.add(name, f"index object {name}", problem)
        for missing in walker.missing_from_index:
            found = report.damage(missing)
            for session in found.sessions:
                report.attach(number, session)
            report.damage(number).volumes |= found.volumes
    order = {ref.session_id: k for k, ref in enumerate(repo.body.sessions)}
    result: dict[str, object] = {
        "sessions": len(repo.body.sessions),
        "tree_pages": len(walker.memo),
        "chunks_referenced": len(walker.chunks),
        "packs": len(packs),
        "unreferenced_objects": sum(
            1 for n in sizes if n not in packs and n not in dict(repo.body.indexes)
        ),
        "mode": "quick" if quick else "full",
        **report.result(order),
    }
    if not quick:
        result["blobs_verified"] = blobs
        result["bytes_verified"] = total
    return result


def _check_session(
    repo: Repository, session_id: str, ref: SessionRef, walker: DamageWalker, report: DamageReport
) -> None:
    """Read one session's record and walk its volumes, attaching it to every problem found."""
    what = f"session record {session_id}"
    number = walker.indexed(ref.record, BlobType.SESSION, what)
    if number is None:
        try:
            volumes = repo.session_record(ref).volumes
        except QbhubError as exc:
            number = report.add(ref.record, what, str(exc))
    if number is not None:
        report.attach(number, session_id)
        return
    for volume in volumes:
        for found in walker.volume(volume):
            report.attach(found, session_id, volume.name)


def _check_presence(
    repo: Repository,
    packs: dict[str, list[PackEntry]],
    sizes: dict[str, int],
    report: DamageReport,
    bad: dict[bytes, int],
    *,
    sizes_matter: bool,
) -> None:
    """Every indexed pack must be in the listing (and, if `sizes_matter`, of a possible size)."""
    overhead = repo.sealer.overhead
    for name, entries in packs.items():
        end = max(e.offset + e.length for e in entries)
        if name not in sizes:
            number = report.add(name, f"pack {name}", "is missing from the store")
            affected = entries
        elif sizes_matter and not plausible_size(sizes[name], end, overhead):
            problem = f"has an impossible size ({sizes[name]} bytes, its blobs end at {end})"
            number = report.add(name, f"pack {name}", problem)
            affected = [e for e in entries if e.offset + e.length > sizes[name]]
        else:
            continue
        for e in affected:
            bad.setdefault(e.blob_id, number)


@dataclass
class PackCheck:
    """What reading one pack whole found."""

    name: str
    size: int
    blobs: int = 0
    pack_problems: list[tuple[str, list[bytes]]] = field(default_factory=list)
    blob_problems: list[tuple[PackEntry, str]] = field(default_factory=list)


def _check_packs(
    repo: Repository,
    packs: dict[str, list[PackEntry]],
    sizes: dict[str, int],
    report: DamageReport,
    bad: dict[bytes, int],
    progress: Progress,
    total: int,
) -> int:
    """Read every pack whole (in parallel); record its problems. Return the blobs that passed."""
    progress.start("verify", total)
    blobs = 0
    with ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="qbhub-verify") as pool:
        for check in pool.map(lambda item: _verify_pack(repo, *item), _sized(packs, sizes)):
            blobs += check.blobs
            for problem, affected in check.pack_problems:
                number = report.add(check.name, f"pack {check.name}", problem)
                for blob_id in affected:
                    bad.setdefault(blob_id, number)
            for e, problem in check.blob_problems:
                what = f"{_label(repo, e)} in pack {check.name}"
                bad.setdefault(e.blob_id, report.add(e.blob_id, what, problem))
            progress.advance(check.size)
    progress.finish()
    return blobs


KINDS = {BlobType.DATA: "chunk", BlobType.TREE: "tree page", BlobType.SESSION: "session blob"}


def _label(repo: Repository, entry: PackEntry) -> str:
    """How the report names a blob: session records by their session, others by kind and ID."""
    if entry.type_code == BlobType.SESSION:
        for ref in repo.body.sessions:
            if ref.record == entry.blob_id:
                return f"session record {ref.session_id} (blob {entry.blob_id.hex()})"
    kind = KINDS.get(BlobType(entry.type_code)) if entry.type_code in KINDS else None
    return f"{kind or f'blob of type {entry.type_code}'} {entry.blob_id.hex()}"


def _sized(
    packs: dict[str, list[PackEntry]], sizes: dict[str, int]
) -> Iterator[tuple[str, list[PackEntry], int]]:
    for name, entries in packs.items():
        yield name, entries, sizes[name]


def _verify_pack(repo: Repository, name: str, entries: list[PackEntry], size: int) -> PackCheck:
    """Read one pack whole: its name, its trailer and every indexed blob in it; never raises."""
    check = PackCheck(name, size)
    try:
        raw = repo.store.get(name, MAX_PACK)
    except QbhubError as exc:
        check.pack_problems.append((f"can't be read: {exc}", [e.blob_id for e in entries]))
        return check
    if pack_name(raw) != name:
        check.pack_problems.append(("does not hash to its name (damaged or truncated)", []))
    data = memoryview(raw)
    try:
        listed = set(read_trailer(repo.sealer, data, name))
    except QbhubError as exc:
        check.pack_problems.append((f"has a bad trailer: {exc}", []))
    else:
        unlisted = [e.blob_id for e in entries if e not in listed]
        if unlisted:
            check.pack_problems.append(("does not hold what the index says it holds", unlisted))
    for e in entries:
        try:
            blob = repo.codec.decode(
                e.type_code, e.blob_id, data[e.offset : e.offset + e.length], e.raw_length
            )
            repo.codec.check_id(e.type_code, e.blob_id, blob)
        except (QbhubError, ValueError) as exc:
            check.blob_problems.append((e, str(exc)))
        else:
            check.blobs += 1
    return check
