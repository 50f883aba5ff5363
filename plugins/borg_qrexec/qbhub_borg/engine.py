"""The host's `Engine` interface for Borg: dom0's half of every command.

dom0 decides (which sessions, which volumes, the session ID), keeps the rollback memory, reads
the passphrase and hands it to the worker, and checks what comes back; borg itself runs only in
the worker (`runner.WorkerSession`). The store's root holds the marker (`marker.py`) and the
Borg repository lives in the archive directory's `borg/`, which dom0 never opens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from qubes_backup_hub.engine import Engine, EngineContext, VMRestoreJob, VolumeSource
from qubes_backup_hub.errors import IntegrityError, NotFoundError, PassphraseError, UsageError
from qubes_backup_hub.progress import human_bytes
from qubes_backup_hub.safety.jsonlimits import loads_bounded
from qubes_backup_hub.safety.names import SESSION_ID
from qubes_backup_hub.safety.text import shown
from qubes_backup_hub.session_notes import summary
from qubes_backup_hub.store.base import Store
from qubes_backup_hub.store.local import LocalDirStore

from . import marker as markers
from .memory import Memory
from .protocol import (
    HEADER,
    LISTING,
    MAX_HEADER,
    MAX_LISTING,
    MAX_PROGRESS,
    MAX_RESULT,
    PROGRESS,
    REPLY,
    RESULT,
)
from .receive import check_target, parse_header, receive_volume
from .runner import WorkerSession
from .sessions import next_session, session_key
from .vm_restore import BorgRestoreStream

CAPABILITIES = frozenset(
    {"encryption", "authentication", "incremental", "dedup", "rollback-detection", "prune",
     "verify", "rekey", "append-only"}
)  # fmt: skip
CHUNK_SIZE = 65536


def _archive_dir(store: Store) -> Path:
    if not isinstance(store, LocalDirStore):
        raise UsageError(
            f"the borg engine serves local directory archives so far, not {store.url!r}"
        )
    return store.path


def _volume_size(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read volume {path}: {exc.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


BORG_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?")


def _text(passphrase: bytes) -> str:
    """The passphrase as borg takes it (an environment variable): UTF-8 text."""
    try:
        return passphrase.decode()
    except UnicodeDecodeError:
        raise PassphraseError("the borg engine needs a UTF-8 passphrase") from None


def _progress_done(payload: bytes) -> int | None:
    """The `done` count of a worker's progress frame; None for anything that is not one."""
    try:
        frame = loads_bounded(payload)
    except ValueError:
        return None
    done = frame.get("done") if isinstance(frame, dict) else None
    return done if type(done) is int else None


def _parse_listing(payload: bytes) -> list[str]:
    try:
        body = loads_bounded(payload)
        names = body["sessions"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the borg worker's listing is malformed") from None
    if not isinstance(names, list) or not all(
        isinstance(n, str) and SESSION_ID.fullmatch(n) for n in names
    ):
        raise IntegrityError("the borg worker's listing holds invalid session names")
    if len(set(names)) != len(names):
        raise IntegrityError("the borg worker's listing repeats a session")
    return sorted(names, key=session_key)


def _notes(metadata: dict[str, Any]) -> dict[str, Any]:
    """What `qbhub list` shows of a session (`session_notes.summary`), in the metadata's own
    shape (VMs as {"name"} documents) so that `summary` reads it back as it reads metadata."""
    notes = summary(metadata)
    if "vms" in notes:
        notes["vms"] = [{"name": name} for name in notes["vms"]]
    return notes


class SessionChooser:
    """dom0's answer to a worker's checked listing when it reads one session: the one asked
    for, else the newest listed; "not found" (exit 7) when there is none such."""

    def __init__(self, wanted: str | None) -> None:
        self.wanted = wanted
        self.chosen = ""

    def __call__(self, listed: list[str]) -> dict[str, Any]:
        if self.wanted is not None and self.wanted not in listed:
            raise NotFoundError(f"no session {self.wanted} in the archive")
        if not listed:
            raise NotFoundError("the archive holds no session yet")
        self.chosen = self.wanted or listed[-1]
        return {"session": self.chosen}


def _times(archive: dict[str, Any]) -> dict[str, str]:
    """The session's start and end as borg's worker reported them, to the second (borg's own
    ISO times, in the worker's local time), if they look like times at all."""
    out = {}
    for key in ("started", "finished"):
        value = archive.get(key)
        if isinstance(value, str) and BORG_TIME.fullmatch(value):
            out[key] = value[:19]
    return out


MAX_NUMBER = 1 << 62  # a byte count the worker reports; larger is a lie (and no float holds it)


def _number(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= MAX_NUMBER else 0


def _items(value: Any) -> list[Any]:
    """A list the worker reports, or none if it sent something else."""
    return value if isinstance(value, list) else []


class BorgEngine(Engine):
    """Borg in the backup worker; see the module docstring."""

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    # -- shared steps ---------------------------------------------------------------------------

    def _marker(self, store: Store) -> markers.Marker:
        root = store.get_root(markers.MAX_MARKER)
        if root is None:
            raise NotFoundError(f"no qbhub archive at {store.url} (run `qbhub init` first)")
        return markers.decode(root)

    @contextmanager
    def _worker(self, store: Store, marker: markers.Marker, **kw: Any) -> Iterator[WorkerSession]:
        """A worker for one job, under the archive's lock for the whole job (so the storage
        side may clear a lock a killed `borg serve` left behind)."""
        prune = bool(kw.pop("prune", False))  # deleting needs the serve side writable
        with (
            store.lock(),
            WorkerSession(
                _archive_dir(store),
                state_dir=self.context.state_dir,
                append_only=marker.append_only and not prune,
                exclusive=True,
                **kw,
            ) as worker,
        ):
            yield worker

    def _job(self, op: str, **fields: Any) -> bytes:
        passphrase = _text(self.context.passphrase.get())
        return json.dumps({"op": op, "passphrase": passphrase, **fields}).encode()

    def _checked_listing(
        self, worker: WorkerSession, marker: markers.Marker, answer: dict[str, Any] | None = None
    ) -> tuple[list[str], bool]:
        """Receive the listing, check it against the rollback memory, remember it, go on."""
        _, payload = worker.receive({LISTING: MAX_LISTING})
        names = _parse_listing(payload)
        with Memory(self.context.state_dir, marker.archive_id).locked() as seen:
            seen.check(names)
            first = not seen.known
            seen.add(names)
        reply = {"go": True, **(answer(names) if callable(answer) else answer or {})}
        worker.send(REPLY, json.dumps(reply).encode())
        return names, first

    def _result(self, worker: WorkerSession, label: str = "", total: int = 0) -> dict[str, Any]:
        progress = self.context.progress
        if label:
            progress.start(label, total)
        done = 0
        while True:
            kind, payload = worker.receive({PROGRESS: MAX_PROGRESS, RESULT: MAX_RESULT})
            if kind == RESULT:
                break
            with_done = _progress_done(payload)
            if label and type(with_done) is int and with_done > done:
                progress.advance(with_done - done)
                done = with_done
        if label:
            progress.finish()
        try:
            result = loads_bounded(payload)
        except ValueError:
            raise IntegrityError("the borg worker's result is not JSON") from None
        if not isinstance(result, dict):
            raise IntegrityError("the borg worker's result is not a JSON object")
        return result

    def _info(self, marker: markers.Marker, names: list[str], first: bool) -> dict[str, Any]:
        return {
            "engine": "borg",
            "archive_id": marker.archive_id,
            "generation": len(names),
            "updated": names[-1] if names else "never",
            "first_contact": first,
        }

    # -- Engine ---------------------------------------------------------------------------------

    def init_archive(self, store: Store, *, encryption: bool) -> dict[str, Any]:
        if not encryption:
            raise UsageError("the borg engine always encrypts (repokey-blake2)")
        archive_dir = _archive_dir(store)
        if store.exists():
            raise UsageError(f"{store.url} already holds an archive")
        append_only = bool(self.context.options.get("append_only"))
        marker = markers.Marker.new(append_only=append_only)
        passphrase = _text(self.context.passphrase.get(confirm=True))
        store.create()
        with (
            store.lock(),
            WorkerSession(archive_dir, state_dir=self.context.state_dir) as worker,
        ):
            worker.start_job(json.dumps({"op": "init", "passphrase": passphrase}).encode())
            self._result(worker)
        store.put_root(marker.encode())
        with Memory(self.context.state_dir, marker.archive_id).locked() as seen:
            seen.add([])
        return {
            **self._info(marker, [], False),
            "url": store.url,
            "encryption": marker.encryption,
            "chunk_size": CHUNK_SIZE,
            "append_only": append_only,
        }

    def backup(
        self,
        store: Store,
        volumes: list[VolumeSource],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        marker = self._marker(store)
        names = [v.name for v in volumes]
        if len(set(names)) != len(names):
            raise UsageError("a volume name is given twice")
        sizes = [(v.name, _volume_size(v.path)) for v in volumes]
        chosen: dict[str, str] = {}

        def answer(listed: list[str]) -> dict[str, Any]:
            chosen["session"] = next_session(listed)
            return {"session": chosen["session"]}

        doc = {
            "archive_id": marker.archive_id,
            "volumes": [{"name": n, "size": s} for n, s in sizes],
            "metadata": metadata or {},
        }
        with self._worker(
            store,
            marker,
            volumes=[(Path(v.path).resolve(), v.name) for v in volumes],
            session_doc=json.dumps(doc).encode(),
        ) as worker:
            worker.start_job(
                self._job(
                    "backup",
                    archive_id=marker.archive_id,
                    volumes=sizes,
                    notes=_notes(metadata or {}),
                )
            )
            listed, first = self._checked_listing(worker, marker, answer)  # type: ignore[arg-type]
            result = self._result(worker, "backup", sum(s for _, s in sizes))
        session = chosen["session"]
        with Memory(self.context.state_dir, marker.archive_id).locked() as seen:
            seen.add([session])
        stats = result.get("stats") if isinstance(result.get("stats"), dict) else {}
        stored = _number(stats.get("deduplicated_size"))  # type: ignore[union-attr]
        return {
            **self._info(marker, [*listed, session], first),
            "session": session,
            "volumes": [
                {
                    "name": n,
                    "size": s,
                    "bytes_read": s,
                    "provider": v.provider,
                    "chunks_new": None,
                    "bytes_stored": None,
                }
                for (n, s), v in zip(sizes, volumes, strict=True)
            ],
            "bytes_stored": stored,
            "packs_reused": 0,
            "human": f"Session {session} committed (borg archive {marker.archive_id})\n"
            + "\n".join(f"  {n}: {human_bytes(s)}" for n, s in sizes)
            + f"\n  added {human_bytes(stored)} to the archive",
        }

    def restore_volume(
        self, store: Store, name: str, target: Path, *, session: str | None, overwrite: bool
    ) -> dict[str, Any]:
        marker = self._marker(store)
        check_target(target, overwrite=overwrite)
        with self._worker(store, marker) as worker:
            worker.start_job(self._job("restore", volume=name, session=session))
            listed, first = self._checked_listing(worker, marker)
            if session is not None and session not in listed:
                raise NotFoundError(f"no session {session} in the archive")
            _, payload = worker.receive({HEADER: MAX_HEADER})
            header = parse_header(payload, name=name, session=session, known=set(listed))
            self.context.hook.qbhub_validate_restore(header=header)
            written = receive_volume(worker, header, target, self.context.progress)
        size = header.volumes[0].size
        return {
            **self._info(marker, listed, first),
            "session": header.session,
            "volume": name,
            "target": str(target),
            "size": size,
            "bytes_written": written,
        }

    def list_sessions(self, store: Store, *, session: str | None) -> dict[str, Any]:
        marker = self._marker(store)
        with self._worker(store, marker) as worker:
            worker.start_job(self._job("list"))
            listed, first = self._checked_listing(worker, marker)
            result = self._result(worker)
        sessions = []
        for archive in _items(result.get("archives")):
            if not isinstance(archive, dict) or archive.get("session") not in listed:
                continue
            if session is not None and archive["session"] != session:
                continue
            stats = archive.get("stats") if isinstance(archive.get("stats"), dict) else {}
            volumes: list[dict[str, Any]] = [
                {"name": shown(str(v[0]), 128), "size": _number(v[1]), "bytes_stored": 0}
                for v in _items(archive.get("volumes"))
                if isinstance(v, list) and len(v) == 2
            ]
            sessions.append(
                {
                    "session": archive["session"],
                    **_times(archive),
                    "engine": "borg",
                    "volumes": volumes,
                    "bytes_read": sum(int(v["size"]) for v in volumes),  # borg reads all
                    "bytes_stored": _number(stats.get("deduplicated_size")),  # type: ignore[union-attr]
                    **summary(archive.get("notes")),  # checked and made printable here
                }
            )
        if session is not None and not sessions:
            raise NotFoundError(f"no session {session} in the archive")
        sessions.sort(key=lambda s: session_key(s["session"]))
        repo = result.get("repository") if isinstance(result.get("repository"), dict) else {}
        info = self._info(marker, listed, first)
        stored = _number(repo.get("unique_csize"))  # type: ignore[union-attr]
        lines = [
            f"borg archive {marker.archive_id}, {len(sessions)} sessions, "
            f"archive size {human_bytes(stored)}"
        ]
        for s in sessions:
            lines.append(f"{s['session']}  unique to it {human_bytes(s['bytes_stored'])}")
            lines += [f"    {v['name']:<32} {human_bytes(v['size']):>10}" for v in s["volumes"]]
        return {**info, "sessions": sessions, "archive_bytes": stored, "human": "\n".join(lines)}

    def verify(self, store: Store, *, quick: bool) -> dict[str, Any]:
        marker = self._marker(store)
        with self._worker(store, marker) as worker:
            worker.start_job(self._job("verify", quick=quick))
            listed, first = self._checked_listing(worker, marker)
            result = self._result(worker)
        problems = [shown(str(p), 300) for p in _items(result.get("problems"))[:50]]
        if result.get("ok") is not True:
            told = problems[0] if problems else "borg check found problems"
            raise IntegrityError(f"borg check found damage: {told}")
        mode = "quick" if quick else "full"
        return {
            **self._info(marker, listed, first),
            "mode": mode,
            "sessions": len(listed),
            "human": f"Archive OK ({mode} verify, borg check"
            + ("" if quick else " --verify-data")
            + f"): {len(listed)} sessions",
        }

    def prune(self, store: Store, *, sessions: list[str], keep_last: int | None) -> dict[str, Any]:
        marker = self._marker(store)
        if keep_last is not None and keep_last < 0:
            raise UsageError("--keep-last must be 0 or more")
        dropped: list[str] = []

        def answer(listed: list[str]) -> dict[str, Any]:
            missing = [s for s in sessions if s not in listed]
            if missing:
                raise NotFoundError(f"no session {missing[0]} in the archive")
            drop = set(sessions)
            if keep_last is not None:
                drop |= set(listed[: max(len(listed) - keep_last, 0)])
            dropped.extend(sorted(drop, key=session_key))
            # Forget them before borg deletes anything: a prune cut short must not look like a
            # rollback next time.
            with Memory(self.context.state_dir, marker.archive_id).locked() as seen:
                seen.sessions -= drop
            return {"drop": dropped}

        with self._worker(store, marker, prune=True) as worker:
            worker.start_job(self._job("prune"))
            listed, first = self._checked_listing(worker, marker, answer)  # type: ignore[arg-type]
            self._result(worker)
        left = [s for s in listed if s not in dropped]
        return {
            **self._info(marker, left, first),
            "sessions_removed": dropped,
            "sessions_left": len(left),
            "human": f"Removed sessions: {', '.join(dropped) or 'none'}; {len(left)} left "
            "(borg delete + compact)",
        }

    def change_passphrase(self, store: Store) -> dict[str, Any]:
        marker = self._marker(store)
        if self.context.new_passphrase is None:
            raise UsageError("no new passphrase source given")
        new = _text(self.context.new_passphrase.get(confirm=True))
        with self._worker(store, marker) as worker:
            worker.start_job(self._job("passphrase", new_passphrase=new))
            listed, first = self._checked_listing(worker, marker)
            self._result(worker)
        return self._info(marker, listed, first)

    def archive_id(self, store: Store) -> str:
        return self._marker(store).archive_id

    restores_in_own_worker = True  # borg reads only with the passphrase: no read grant

    def open_vm_restore(self, store: Store, job: VMRestoreJob) -> BorgRestoreStream:
        marker = self._marker(store)
        stack = ExitStack()
        try:
            worker = stack.enter_context(self._worker(store, marker))
            worker.start_job(
                self._job(
                    "restore_vms",
                    session=job.session,
                    vms=list(job.vms),
                    settings_only=job.settings_only,
                )
            )

            chooser = SessionChooser(job.session)
            listed, _ = self._checked_listing(worker, marker, chooser)  # type: ignore[arg-type]
        except BaseException:
            stack.close()
            raise
        return BorgRestoreStream(stack, worker, listed)

    def session_settings(self, store: Store, session: str | None) -> dict[str, Any]:
        """The worker reads the session's settings document; dom0 only shows it (escaped)."""
        marker = self._marker(store)
        with self._worker(store, marker) as worker:
            worker.start_job(self._job("settings"))

            chooser = SessionChooser(session)
            self._checked_listing(worker, marker, chooser)  # type: ignore[arg-type]
            result = self._result(worker)
        vms = result.get("vms")
        return {"session": chooser.chosen, "vms": vms if isinstance(vms, list) else []}

    def describe_session(self, store: Store, session: str | None) -> dict[str, Any]:
        raise UsageError(
            "dom0 cannot read a Borg session's VM list (only the worker can, with the passphrase)"
        )

    def stream_volume(self, store: Store, session: str, name: str, write: Any) -> int:
        raise UsageError("the borg engine streams volumes only from its own worker")
