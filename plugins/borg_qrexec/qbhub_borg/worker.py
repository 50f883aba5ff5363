"""The Borg backup worker: runs borg, in a sandbox (a DispVM on Qubes), for one dom0 job.

It gets one JOB frame (the operation, the passphrase, the session and volume names), sees the
volumes read-only under `protocol.STAGING`, and reaches the repository only through `BORG_RSH`
(`qbhub_borg.rsh`, a relay to the storage side's restricted `borg serve`). It parses everything
borg prints; dom0 parses only the frames it sends back. Every job but `init` first sends the
archive listing and waits for dom0's go-ahead (dom0's rollback check, and the sessions a prune
drops). A restore ends in qbhub's strict restore stream: HEADER, exactly the declared bytes as
DATA, END.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from qubes_backup_hub.errors import NotFoundError, QbhubError
from qubes_backup_hub.safety.names import SESSION_ID, VOLUME_NAME
from qubes_backup_hub.safety.restore_channel import receive, send
from qubes_backup_hub.workers.vm_stream import plan_vm_stream

from .protocol import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    LISTING,
    MAX_DATA_FRAME,
    MAX_JOB,
    MAX_REPLY_JSON,
    PROGRESS,
    REPLY,
    RESULT,
    SESSION_DOC,
    STAGING,
)

REPOSITORY_URL = "ssh://qbhub-storage/home/user/borg"  # the storage side fixes it anyway
CHUNKER = "fixed,65536"
COMPRESSION = "zstd,3"
PASSPHRASE_WRONG = "passphrase wrong"


class WorkerError(Exception):
    """A job failed; the message is the one line dom0 shows."""


class BadPassphrase(WorkerError):
    """borg refused the passphrase (dom0 reports it as a passphrase error, exit 5)."""


class NotFound(WorkerError):
    """The session lacks what was asked for (dom0 reports it as "not found", exit 7)."""


class Damaged(WorkerError):
    """What borg extracted is not what qbhub stored (dom0 reports an integrity error, exit 3)."""


def encode_comment(
    archive_id: str, volumes: list[tuple[str, int]], notes: dict[str, Any] | None = None
) -> str:
    """The archive comment: what the session holds and what `qbhub list` shows of it (host,
    comment, tags, VM names: `session_notes.summary`), so listing needs no extraction. Inside
    Borg's encryption, like the rest of the archive's metadata. Base64: borg expands `{}`."""
    doc: dict[str, Any] = {"archive_id": archive_id, "volumes": volumes}
    if notes:
        doc["notes"] = notes
    body = json.dumps(doc, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode()


def decode_comment(comment: str) -> dict[str, Any] | None:
    """The comment's document, or None if it is not one this engine wrote."""
    try:
        body = json.loads(base64.urlsafe_b64decode(comment.encode()))
    except (ValueError, binascii.Error, UnicodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("volumes"), list):
        return None
    return body


def session_volumes(comment: str) -> list[tuple[str, int]]:
    """The (name, size) pairs a session's comment lists (malformed entries skipped)."""
    body = decode_comment(comment) or {"volumes": []}
    return [
        (v[0], v[1])
        for v in body["volumes"]
        if isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], str)
        and VOLUME_NAME.fullmatch(v[0])
        and isinstance(v[1], int)
        and v[1] >= 0
    ]


class Borg:
    """Runs borg commands against the one repository, with the job's secrets."""

    def __init__(self, passphrase: str, on_progress: Callable[[int], None] | None = None) -> None:
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "USER": "qbhub",  # borg records a user name; the sandbox's uid has no passwd entry
            "BORG_PASSPHRASE": passphrase,
            "BORG_REPO": REPOSITORY_URL,
            "BORG_RSH": f"{sys.executable} -B -P -m qbhub_borg.rsh",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",  # the worker's home is new every time
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
            "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO",
            "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "NO",
        }
        for key in ("PYTHONPATH", "QBHUB_BORG_SOCKET"):
            if key in os.environ:
                self.env[key] = os.environ[key]
        self.on_progress = on_progress

    def start(self, args: list[str], *, cwd: str | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["borg", "--log-json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=cwd,
        )

    def finish(self, proc: subprocess.Popen[bytes], errors: list[str], what: str) -> int:
        code = proc.wait()
        if PASSPHRASE_WRONG in errors:
            raise BadPassphrase("the passphrase is wrong for this Borg repository")
        if code not in (0, 1) or (code == 1 and errors):
            detail = errors[-1] if errors else f"exit status {code}"
            raise WorkerError(f"borg {what} failed: {detail}")
        return code

    def watch(self, stderr: IO[bytes], errors: list[str]) -> threading.Thread:
        """Read borg's JSON log lines: errors kept, progress forwarded."""

        def run() -> None:
            for raw in stderr:
                sys.stderr.buffer.write(raw)  # the worker's log (never read by dom0)
                try:
                    line = json.loads(raw)
                except ValueError:
                    text = raw.decode(errors="replace").strip()
                    if text:
                        errors.append(text[:300])
                    continue
                if not isinstance(line, dict):
                    continue
                if line.get("msgid") == "PassphraseWrong":
                    errors.append(PASSPHRASE_WRONG)
                elif line.get("levelname") in ("ERROR", "CRITICAL"):
                    message = str(line.get("message", "")).strip().splitlines()
                    errors.append(message[-1][:300] if message else "error")
                elif line.get("type") == "archive_progress" and self.on_progress:
                    size = line.get("original_size")
                    if isinstance(size, int):
                        self.on_progress(size)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def run(self, args: list[str], what: str, *, cwd: str | None = None) -> bytes:
        """Run to the end; return stdout. WorkerError on failure."""
        proc = self.start(args, cwd=cwd)
        assert proc.stdout is not None and proc.stderr is not None
        errors: list[str] = []
        watcher = self.watch(proc.stderr, errors)
        out = proc.stdout.read()
        watcher.join()
        self.finish(proc, errors, what)
        return out

    def run_json(self, args: list[str], what: str, *, cwd: str | None = None) -> Any:
        try:
            return json.loads(self.run(args, what, cwd=cwd))
        except ValueError:
            raise WorkerError(f"borg {what} printed no JSON") from None


class Job:
    """One job: the channel to dom0 and the borg runner."""

    def __init__(self, job: dict[str, Any], out: BinaryIO, inp: BinaryIO) -> None:
        self.job, self.out, self.inp = job, out, inp
        self.lock = threading.Lock()
        self.borg = Borg(str(job.get("passphrase", "")), self.progress)

    def send(self, kind: bytes, payload: bytes | memoryview = b"") -> None:
        with self.lock:
            send(self.out, kind, payload)
            self.out.flush()

    def progress(self, done: int) -> None:
        self.send(PROGRESS, json.dumps({"done": done}).encode())

    def listing(self, listed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Send the archive's session names to dom0 and wait for its answer.

        `listed` is a `borg list --json` (or `info --json`) document a read-only job already
        has; otherwise borg lists the archive now.
        """
        if listed is None:
            listed = self.borg.run_json(["list", "--json", "--format", "{name}{comment}"], "list")
        archives = [a for a in listed.get("archives", []) if isinstance(a, dict)]
        names = [a["name"] for a in archives if SESSION_ID.fullmatch(str(a.get("name")))]
        self.send(LISTING, json.dumps({"sessions": names}).encode())
        _, reply = receive(self.inp, {REPLY: MAX_REPLY_JSON})
        answer = json.loads(reply)
        if not answer.get("go"):
            raise WorkerError("dom0 refused the listing")
        self.answer = answer
        return [a for a in archives if a.get("name") in names]

    # -- operations ---------------------------------------------------------------------------

    def op_init(self) -> dict[str, Any]:
        self.borg.run(["init", "--encryption", "repokey-blake2"], "init")
        return {}

    def op_backup(self) -> dict[str, Any]:
        self.listing()
        session = self.answer["session"]
        volumes = [(str(n), int(s)) for n, s in self.job["volumes"]]
        notes = self.job.get("notes")
        comment = encode_comment(
            str(self.job["archive_id"]), volumes, notes if isinstance(notes, dict) else None
        )
        args = [
            "create", "--json", "--progress", "--read-special", "--sparse", "--noflags", "--noacls",
            "--noxattrs", "--chunker-params", CHUNKER, "--compression", COMPRESSION,
            "--comment", comment, f"::{session}", *[n for n, _ in volumes], SESSION_DOC,
        ]  # fmt: skip
        created = self.borg.run_json(args, "create", cwd=STAGING)
        archive = created.get("archive", {})
        return {"stats": archive.get("stats", {}), "repository": created.get("cache", {})}

    def op_restore(self) -> None:
        archives = self.listing()
        name, wanted = str(self.job["volume"]), self.job.get("session")
        chosen: tuple[str, int] | None = None
        for archive in sorted(archives, key=lambda a: str(a["name"]), reverse=True):
            if wanted and archive["name"] != wanted:
                continue
            sizes = dict(session_volumes(str(archive.get("comment", ""))))
            if name in sizes:
                chosen = (str(archive["name"]), sizes[name])
                break
            if wanted:
                raise WorkerError(f"session {wanted} holds no volume {name}")
        if chosen is None:
            raise WorkerError(f"no session holds a volume named {name}")
        session, size = chosen
        header = {"session": session, "volumes": [{"name": name, "size": size}]}
        self.send(HEADER, json.dumps(header).encode())
        self.stream_file(session, name)
        self.send(END)

    def op_settings(self) -> dict[str, Any]:
        """The VM documents of the session dom0 names (for `list --settings`: shown only)."""
        self.listing()
        session = self.answer.get("session")
        if not isinstance(session, str) or not SESSION_ID.fullmatch(session):
            raise WorkerError("dom0 named no session")
        return {"session": session, "vms": self.session_metadata(session).get("vms", [])}

    def session_metadata(self, session: str) -> dict[str, Any]:
        """The metadata of the session's settings document (inside its Borg archive)."""
        raw = self.borg.run(["extract", "--stdout", f"::{session}", SESSION_DOC], "extract")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Damaged(f"session {session}'s settings document is not JSON") from None
        metadata = doc.get("metadata") if isinstance(doc, dict) else None
        return metadata if isinstance(metadata, dict) else {}

    def op_restore_vms(self) -> None:
        """A VM-level restore: the session dom0 names, the VMs' settings from the session's
        settings document, then their volumes; the hub's restore stream, as its worker sends."""
        self.listing()
        session = self.answer.get("session")
        if not isinstance(session, str) or not SESSION_ID.fullmatch(session):
            raise WorkerError("dom0 named no session to restore")
        metadata = self.session_metadata(session)
        if not metadata.get("vms"):
            raise NotFound(f"session {session} holds no VM (a backup of volumes only?)")
        try:
            plan = plan_vm_stream(
                session,
                metadata,
                [str(v) for v in self.job.get("vms", [])],
                settings_only=bool(self.job.get("settings_only")),
            )
        except NotFoundError as exc:
            raise NotFound(str(exc)) from None
        except QbhubError as exc:
            raise Damaged(str(exc)) from None
        self.send(HEADER, json.dumps(plan.header).encode())
        for name in plan.archive_names:
            self.stream_file(session, name)
        self.send(END)

    def stream_file(self, session: str, name: str) -> None:
        """Send file `name` of Borg archive `session` as DATA frames, as borg extracts it."""
        proc = self.borg.start(["extract", "--stdout", f"::{session}", name])
        assert proc.stdout is not None and proc.stderr is not None
        errors: list[str] = []
        watcher = self.borg.watch(proc.stderr, errors)
        while block := proc.stdout.read(MAX_DATA_FRAME):
            self.send(DATA, block)
        watcher.join()
        self.borg.finish(proc, errors, "extract")

    def op_list(self) -> dict[str, Any]:
        # read-only: one borg run gives both dom0's listing and the result
        info = self.borg.run_json(["info", "--json", "--glob-archives", "*"], "info")
        self.listing(info)
        archives = []
        for archive in info.get("archives", []):
            if not isinstance(archive, dict) or not SESSION_ID.fullmatch(str(archive.get("name"))):
                continue
            comment = str(archive.get("comment", ""))
            archives.append(
                {
                    "session": archive["name"],
                    "stats": archive.get("stats", {}),
                    "volumes": session_volumes(comment),
                    "notes": (decode_comment(comment) or {}).get("notes", {}),
                    "started": archive.get("start"),
                    "finished": archive.get("end"),
                }
            )
        return {"archives": archives, "repository": info.get("cache", {}).get("stats", {})}

    def op_verify(self) -> dict[str, Any]:
        archives = self.listing()
        args = ["check", *(["--verify-data"] if not self.job.get("quick") else [])]
        proc = self.borg.start(args)
        assert proc.stdout is not None and proc.stderr is not None
        errors: list[str] = []
        watcher = self.borg.watch(proc.stderr, errors)
        proc.stdout.read()
        watcher.join()
        code = proc.wait()
        return {"ok": code == 0 and not errors, "problems": errors[:50], "sessions": len(archives)}

    def op_prune(self) -> dict[str, Any]:
        self.listing()
        drop = [s for s in self.answer.get("drop", []) if SESSION_ID.fullmatch(str(s))]
        if drop:
            self.borg.run(["delete", "::" + drop[0], *drop[1:]], "delete")
        self.borg.run(["compact"], "compact")
        return {"dropped": drop}

    def op_passphrase(self) -> dict[str, Any]:
        self.listing()
        self.borg.env["BORG_NEW_PASSPHRASE"] = str(self.job.get("new_passphrase", ""))
        self.borg.run(["key", "change-passphrase"], "key change-passphrase")
        return {}

    def run(self) -> None:
        op = str(self.job.get("op"))
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise WorkerError(f"unknown job {op[:40]!r}")
        result = method()
        if result is not None:
            self.send(RESULT, json.dumps(result).encode())


def main() -> int:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    try:
        _, payload = receive(inp, {JOB: MAX_JOB})
        Job(json.loads(payload), out, inp).run()
    except Exception as exc:  # everything ends as one FAIL line for dom0
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        with contextlib.suppress(OSError):
            send(out, FAIL, f"{type(exc).__name__}: {message}"[:1000].encode())
            out.flush()
        return 1
    return 0


if __name__ == "__main__":
    Path(os.environ.get("HOME", "/tmp")).mkdir(parents=True, exist_ok=True)
    sys.exit(main())
