"""Verifying an archive: every session record, every tree page, every referenced blob.

Quick: authenticate the root, session records and all tree pages, check that every index object
the root lists exists with a possible size, that every referenced chunk is indexed and that every
indexed pack exists with a plausible size. Full: also read and authenticate every index object
(one at a time; lookups may come from the local index cache, which would still know what a lost
index object held), read every pack whole, authenticate and decompress every indexed blob, and
re-hash it against its ID.

Verify does not stop at the first problem. It collects every damaged object (missing, truncated or
tampered pack, blob that fails, tree page, session record, index object), maps each to the
sessions and volumes that reference it, and returns them under "damaged" (the first
MAX_LISTED; the rest are counted and their sessions and volumes summed up under
"damaged_unlisted"). The caller turns a non-empty report into exit status 3.
"""

from __future__ import annotations

import os
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import gettempdir

from qubes_backup_hub.errors import IntegrityError, QbhubError
from qubes_backup_hub.progress import Progress

from .blob import BlobType
from .extsort import RunSorter
from .index import Index
from .index_cache import RAW_BITS, RAW_MAX, DiskIndex
from .limits import MAX_PACK
from .livesets import KEYED, cache_records, whole_cache
from .pack import ENTRY, PackEntry, pack_name, plausible_size, read_trailer
from .repository import Repository
from .root import SessionRef
from .session import VolumeRecord
from .tree import ZERO_ID, Geometry, check_height, split_ids

MAX_LISTED = 1000  # damaged objects listed one by one; more are only counted
OVERFLOW = -1  # the problem number of every damaged object beyond MAX_LISTED
NO_PROBLEMS: frozenset[int] = frozenset()
MEMO_CLEAN = 1 << 16  # recent clean tree pages remembered (clones share subtrees)


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
    """Walks session trees, mapping every problem below a page to that page.

    Memory does not grow with the archive: a volume is walked against the tree last walked under
    its name (same geometry), and a subtree whose page ID is the same at the same place is not
    read again: its problems are those memoized for it (only pages with problems are memoized,
    plus a bounded set of recent clean pages, for clones). Distinct pages and chunks are counted
    through sorted runs on local disk (`directory`).
    """

    def __init__(
        self, repo: Repository, report: DamageReport, bad: dict[bytes, int], directory: Path
    ) -> None:
        self.repo = repo
        self.report = report
        self.bad = bad  # blob ID -> problem number, from the pack checks
        self.memo: dict[bytes, frozenset[int]] = {}  # pages with problems
        self.clean: set[bytes] = set()  # recent pages without problems (bounded)
        self.last: dict[str, tuple[Geometry, bytes]] = {}  # volume name -> last tree walked
        self.seen = RunSorter(directory, 33)  # b"p" + page ID, b"c" + chunk ID
        self.missing_from_index: set[int] = set()

    def counts(self) -> tuple[int, int]:
        """(distinct tree pages, distinct chunks) met; the walker is then spent."""
        pages = chunks = 0
        for record in self.seen.sorted():
            if record[:1] == b"p":
                pages += 1
            else:
                chunks += 1
        return pages, chunks

    def close(self) -> None:
        self.seen.close()

    def volume(self, volume: VolumeRecord) -> frozenset[int]:
        geometry = volume.geometry
        try:
            check_height(geometry)
        except IntegrityError as exc:
            key = ("volume", volume.tree_id)
            return frozenset((self.report.add(key, f"volume tree {volume.tree[:16]}", str(exc)),))
        before = self.last.get(volume.name)
        base = before[1] if before is not None and before[0] == geometry else None
        found = self._page(volume.tree_id, base, geometry, geometry.height, 0)
        self.last[volume.name] = (geometry, volume.tree_id)
        return found

    def indexed(self, blob_id: bytes, type_code: int, what: str) -> int | None:
        """The problem number of a referenced blob that is damaged or not properly indexed."""
        number = self.bad.get(blob_id)
        if number is not None:
            return number
        loc = self.repo.locator.get(blob_id)
        if loc is not None and loc.type_code == type_code:
            return None
        problem = "is referenced but not in the index" if loc is None else "has the wrong type"
        number = self.report.add(blob_id, what, problem)
        if loc is None:
            self.missing_from_index.add(number)
        return number

    def _page(
        self, page_id: bytes, base: bytes | None, geometry: Geometry, level: int, index: int
    ) -> frozenset[int]:
        if page_id == ZERO_ID:
            return NO_PROBLEMS
        known = self.memo.get(page_id)
        if known is not None:
            return known
        if page_id == base or page_id in self.clean:
            return NO_PROBLEMS  # walked before: it would be in `memo` if it had problems
        self.seen.add(b"p" + page_id)
        what = f"tree page {page_id.hex()}"
        number = self.indexed(page_id, BlobType.TREE, what)
        entries = b""
        count = geometry.children(level, index)
        if number is None:
            try:
                entries = self.repo.load_page(page_id, level, count)
            except QbhubError as exc:
                number = self.report.add(page_id, what, str(exc))
        if number is not None:
            found = frozenset((number,))
        elif level == 0:
            found = self._leaf(split_ids(entries))
        else:
            olds: list[bytes | None] = [None] * count
            # The base's children were all walked if it is clean (a base with problems may
            # have failed before its children were reached: then this page is walked whole).
            if base is not None and base != ZERO_ID and base not in self.memo:
                with suppress(QbhubError):  # reported where it is met: walk this page whole
                    olds = list(split_ids(self.repo.load_page(base, level, count)))
            found = NO_PROBLEMS.union(
                *(
                    self._page(child, old, geometry, level - 1, index * geometry.fanout + k)
                    for k, (child, old) in enumerate(zip(split_ids(entries), olds, strict=True))
                )
            )
        if found:
            self.memo[page_id] = found
        else:
            if len(self.clean) >= MEMO_CLEAN:
                self.clean.clear()
            self.clean.add(page_id)
        return found or NO_PROBLEMS

    def _leaf(self, chunks: list[bytes]) -> frozenset[int]:
        problems = set()
        for chunk in chunks:
            if chunk == ZERO_ID:
                continue
            self.seen.add(b"c" + chunk)
            number = self.indexed(chunk, BlobType.DATA, f"chunk {chunk.hex()}")
            if number is not None:
                problems.add(number)
        return frozenset(problems) if problems else NO_PROBLEMS


def verify_archive(repo: Repository, *, quick: bool, progress: Progress) -> dict[str, object]:
    """Check the archive and report every damaged object with what it affects; never raises
    IntegrityError for damage it can attribute (the result's "damaged" list says it all).

    Works on any opened Repository; a TolerantRepository also reports bad index objects.
    Memory does not grow with the archive when the local index cache can be used: the index's
    entries come grouped by pack from sorted runs of the cache's records, and the tree walk
    counts what it met through sorted runs too. Otherwise the index is held in memory.
    """
    report = DamageReport()
    sizes = dict(repo.store.list())
    bad: dict[bytes, int] = {}
    disk = None if isinstance(repo, TolerantRepository) else whole_cache(repo)
    directory = repo.cache_dir if disk is not None and repo.cache_dir else Path(gettempdir())
    try:
        groups = PackGroups(repo, disk, directory, sizes)
        packs = _check_all_packs(repo, groups, sizes, report, bad, progress, quick=quick)
    finally:
        if disk is not None:
            disk.close()
    walker = DamageWalker(repo, report, bad, directory)
    try:
        for ref in repo.body.sessions:
            _check_session(repo, ref.session_id, ref, walker, report)
        pages, chunks = walker.counts()
    finally:
        walker.close()
    _check_index_objects(repo, sizes, report, quick=quick)
    for name, problem in getattr(repo, "index_problems", []):
        number = report.add(name, f"index object {name}", problem)
        for missing in walker.missing_from_index:
            found = report.damage(missing)
            for session in found.sessions:
                report.attach(number, session)
            report.damage(number).volumes |= found.volumes
    order = {ref.session_id: k for k, ref in enumerate(repo.body.sessions)}
    index_names = {n for n, _ in repo.body.indexes}
    result: dict[str, object] = {
        "sessions": len(repo.body.sessions),
        "tree_pages": pages,
        "chunks_referenced": chunks,
        "packs": packs.count,
        "unreferenced_objects": len(sizes)
        - packs.present
        - sum(1 for n in index_names if n in sizes),
        "mode": "quick" if quick else "full",
        **report.result(order),
    }
    if not quick:
        result["blobs_verified"] = packs.blobs
        result["bytes_verified"] = groups.total
    return result


def _check_index_objects(
    repo: Repository, sizes: dict[str, int], report: DamageReport, *, quick: bool
) -> None:
    """Every index object the root lists must be stored with a possible size; full: each is also
    read and authenticated. The index may have come from the local index cache, which still
    knows what a lost object held: such damage shows on no blob, yet the archive no longer opens
    on a machine without that cache, so it is attached to every session.

    A TolerantRepository read every index object when it opened (its `index_problems`): those
    that failed are reported by the caller with the blobs that lack them.
    """
    if isinstance(repo, TolerantRepository):
        return
    for name, raw_length in repo.body.indexes:
        size = sizes.get(name)
        least, most = repo.index_object_bounds(raw_length)
        if size is None:
            problem = "is missing"
        elif not least <= size <= most:
            problem = f"has an impossible size ({size} bytes for {raw_length} listed)"
        elif quick:
            continue
        else:
            try:
                repo.index_object_tables(name, raw_length)
                continue
            except QbhubError as exc:
                problem = str(exc)
        number = report.add(
            name,
            f"index object {name}",
            f"{problem}; the archive opens only where a local index cache still covers it",
        )
        for ref in repo.body.sessions:
            report.attach(number, ref.session_id)


class PackGroups:
    """The index's entries grouped by pack (each pack's in offset order), with the bytes of the
    packs the store holds: from the whole index in memory, or from sorted runs of the cache's
    records (`disk`), which hold nothing per blob in memory."""

    def __init__(
        self, repo: Repository, disk: DiskIndex | None, directory: Path, sizes: dict[str, int]
    ) -> None:
        self.repo = repo
        self.disk = disk
        self.sorter: RunSorter | None = None
        self.names: list[str] = []
        if disk is None:
            self.packs = repo.index.by_pack()
            self.total = sum(sizes[name] for name in self.packs if name in sizes)
            return
        self.names = [name for name, _ in disk.iter_packs()]
        counts = array("Q", bytes(8 * len(self.names)))
        self.sorter = RunSorter(directory, KEYED.size + ENTRY.size)
        for blob_id, pack, offset, length, packed in cache_records(disk):
            if pack >= len(self.names):
                raise IntegrityError("the index cache names a pack it does not hold")
            counts[pack] += 1
            self.sorter.add(
                KEYED.pack(pack, offset)
                + ENTRY.pack(packed >> RAW_BITS, blob_id, offset, length, packed & RAW_MAX)
            )
        self.total = sum(
            sizes.get(name, 0) for name, n in zip(self.names, counts, strict=True) if n
        )

    def __iter__(self) -> Iterator[tuple[str, list[PackEntry]]]:
        if self.sorter is None:
            yield from self.packs.items()
            return
        current = -1
        entries: list[PackEntry] = []
        with self.sorter:
            for record in self.sorter.sorted():
                pack, _ = KEYED.unpack_from(record)
                if pack != current and entries:
                    yield self.names[current], entries
                    entries = []
                current = pack
                entries.append(PackEntry(*ENTRY.unpack_from(record, KEYED.size)))
            if entries:
                yield self.names[current], entries


@dataclass
class PacksChecked:
    """How many packs the index lists, how many of them the store holds, blobs that passed."""

    count: int = 0
    present: int = 0
    blobs: int = 0


def _check_all_packs(
    repo: Repository,
    groups: PackGroups,
    sizes: dict[str, int],
    report: DamageReport,
    bad: dict[bytes, int],
    progress: Progress,
    *,
    quick: bool,
) -> PacksChecked:
    """Every indexed pack must be in the listing (quick: of a possible size); full: each is
    also read whole (in parallel, a bounded number at a time) and its problems recorded."""
    done = PacksChecked()
    if not quick:
        progress.start("verify", groups.total)
    workers = os.cpu_count() or 2
    with ThreadPoolExecutor(workers, thread_name_prefix="qbhub-verify") as pool:
        pending: deque[Future[PackCheck]] = deque()
        for name, entries in groups:
            done.count += 1
            _check_presence(repo, name, entries, sizes, report, bad, sizes_matter=quick)
            if name not in sizes:
                continue
            done.present += 1
            if quick:
                continue
            pending.append(pool.submit(_verify_pack, repo, name, entries, sizes[name]))
            while len(pending) > 2 * workers:
                done.blobs += _record_check(repo, pending.popleft().result(), report, bad, progress)
        while pending:
            done.blobs += _record_check(repo, pending.popleft().result(), report, bad, progress)
    if not quick:
        progress.finish()
    return done


def _record_check(
    repo: Repository, check: PackCheck, report: DamageReport, bad: dict[bytes, int],
    progress: Progress,
) -> int:  # fmt: skip
    """Record what reading one pack found; return the blobs that passed."""
    for problem, affected in check.pack_problems:
        number = report.add(check.name, f"pack {check.name}", problem)
        for blob_id in affected:
            bad.setdefault(blob_id, number)
    for e, problem in check.blob_problems:
        what = f"{_label(repo, e)} in pack {check.name}"
        bad.setdefault(e.blob_id, report.add(e.blob_id, what, problem))
    progress.advance(check.size)
    return check.blobs


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
    name: str,
    entries: list[PackEntry],
    sizes: dict[str, int],
    report: DamageReport,
    bad: dict[bytes, int],
    *,
    sizes_matter: bool,
) -> None:
    """An indexed pack must be in the listing (and, if `sizes_matter`, of a possible size)."""
    end = max(e.offset + e.length for e in entries)
    if name not in sizes:
        number = report.add(name, f"pack {name}", "is missing from the store")
        affected = entries
    elif sizes_matter and not plausible_size(sizes[name], end, repo.sealer.overhead):
        problem = f"has an impossible size ({sizes[name]} bytes, its blobs end at {end})"
        number = report.add(name, f"pack {name}", problem)
        affected = [e for e in entries if e.offset + e.length > sizes[name]]
    else:
        return
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


KINDS = {BlobType.DATA: "chunk", BlobType.TREE: "tree page", BlobType.SESSION: "session blob"}


def _label(repo: Repository, entry: PackEntry) -> str:
    """How the report names a blob: session records by their session, others by kind and ID."""
    if entry.type_code == BlobType.SESSION:
        for ref in repo.body.sessions:
            if ref.record == entry.blob_id:
                return f"session record {ref.session_id} (blob {entry.blob_id.hex()})"
    kind = KINDS.get(BlobType(entry.type_code)) if entry.type_code in KINDS else None
    return f"{kind or f'blob of type {entry.type_code}'} {entry.blob_id.hex()}"


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
