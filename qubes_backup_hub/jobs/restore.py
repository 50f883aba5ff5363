"""VM-level restore, dom0's side: drive a restore worker in a DispVM and import what it sends.

dom0 authenticates the archive root itself (the engine's `grant_read`: KDF, rollback check and
rollback memory all in dom0) and hands the worker only what reading needs, never the passphrase.
It relays the worker's read requests, but only for objects in its own listing of the archive,
each capped at its listed size, and serves the root it authenticated. Then it reads the restore
stream: the header is parsed strictly (bounded size and nesting), must describe exactly the VMs
the user asked for from the session dom0 expects, passes every restore-validate hook and the
settings policy (`safety.policy`) before any VM is created; what the policy marks sensitive is
reported first. Volume bytes are imported by exact length; anything after the last byte, a short
or long volume, or a worker failure aborts, and every VM this restore created is removed again.
With --replace or --data-only (which touch existing VMs) the whole stream is first received and
checked once without importing, and only then imported from a second run of the worker.

An engine whose tool needs the passphrase to read (Borg) has no read grant to give: it restores
in a worker of its own (`Engine.open_vm_restore`), whose listing of sessions dom0 checks against
its rollback memory; the stream that worker sends is checked exactly as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

import pluggy

from ..engine import Engine, ReadGrant, RestoreStream, VMRestoreJob
from ..errors import IntegrityError, NotFoundError, QbhubError, UsageError
from ..platform.base import Platform, ServiceProcess, VMSettings
from ..progress import Progress
from ..safety import vm_rules
from ..safety.jsonlimits import loads_bounded
from ..safety.restore_channel import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    MAX_DATA_FRAME,
    MAX_FAIL,
    MAX_HEADER,
    MAX_QUERY,
    QUERY,
    REPLY,
    receive,
    send,
)
from ..safety.restore_header import RestoreHeader, RestoreVM, RestoreVolume
from ..safety.text import shown
from ..safety.vm_rules import (
    PROPERTIES,
    VM_REF,
    KnownVM,
    PolicyContext,
    PolicyOutcome,
    apply_policy,
    check_vm_name,
    referenced_vms,
)
from ..store.base import Store
from ..store.qrexec import OP, QrexecStore
from .replace_guard import HeldVM, RecoveryError, bring_back, hold_vms, put_back, release

WORKER_SERVICE = "qbhub.RestoreWorker"
READ_OPS = {OP[name]: name for name in ("get", "range", "list", "root_get", "exists")}
MAX_STORE_REPLY = 80 << 20
WORKER_EXIT_WAIT = 60  # seconds a restore worker gets to end after its stream; then killed
FROM_WORKER = {QUERY: MAX_QUERY, HEADER: MAX_HEADER, DATA: MAX_DATA_FRAME, END: 0, FAIL: MAX_FAIL}


log = logging.getLogger(__name__)


@dataclass
class RestoreRequest:
    """What the user asked for."""

    vms: list[str]
    session: str | None = None
    renames: dict[str, str] = field(default_factory=dict)
    pool: str | None = None
    settings_only: bool = False
    data_only: bool = False
    replace: bool = False
    engine: str = "native"
    all_vms: bool = False
    allow: frozenset[str] = frozenset()  # --allow words (see safety.policy.RISKS)
    report: Callable[[str], None] = lambda line: None  # lines shown before anything is created
    progress: Progress | None = None  # a bar per volume imported


class WorkerChannel:
    """dom0's end of one restore worker: relays read queries, yields the stream's frames.

    The relay answers reads of objects in `listing` (dom0's own listing of the archive) only,
    each capped at its listed size, and serves `pinned_root` (the root dom0 authenticated) for
    the root: the worker can neither probe storage for names of its choosing nor see a root
    other than the one dom0 checked.
    """

    def __init__(
        self,
        process: ServiceProcess,
        store: Store,
        listing: dict[str, int],
        pinned_root: bytes,
        sessions: list[str] | None = None,
    ) -> None:
        self.process, self.store = process, store
        self.listing, self.pinned_root = listing, pinned_root
        self.sessions = sessions or []  # from the root dom0 authenticated (the grant's facts)

    def abort(self) -> None:
        self.process.kill()

    def close(self) -> None:
        try:
            self.process.wait(timeout=WORKER_EXIT_WAIT)
        except subprocess.TimeoutExpired:  # its stream ended (or failed): nothing more is wanted
            self.process.kill()

    def start(self, job: dict[str, Any]) -> None:
        send(self.process.stdin, JOB, json.dumps(job).encode())
        self.process.stdin.flush()

    def next_frame(self) -> tuple[bytes, bytes]:
        """The next HEADER, DATA, END frame; QUERY frames are answered on the way."""
        while True:
            kind, payload = receive(self.process.stdout, FROM_WORKER)
            if kind == QUERY:
                send(self.process.stdin, REPLY, self._answer(payload))
                self.process.stdin.flush()
                continue
            if kind == FAIL:
                reason = shown(payload.split(b"\n", 1)[0]) if payload else "no reason given"
                raise QbhubError(f"the restore worker failed: {reason}")
            return kind, payload

    def _answer(self, query: bytes) -> bytes:
        op = READ_OPS.get(query[0]) if query else None
        try:
            if op is None:
                raise UsageError("the restore worker may only read")
            args = query[1:].decode("ascii").split("\n")
            if op == "get":
                size = self._listed(args[0])
                body = self.store.get(args[0], min(int(args[1]), size, MAX_STORE_REPLY))
            elif op == "range":
                size = self._listed(args[0])
                offset, length = int(args[1]), int(args[2])
                if not (0 <= offset <= size and 0 <= length <= min(size - offset, MAX_STORE_REPLY)):
                    raise UsageError(f"range outside object {args[0]}")
                body = self.store.get_range(args[0], offset, length)
            elif op == "list":
                body = "".join(f"{n} {s}\n" for n, s in sorted(self.listing.items())).encode()
            elif op == "root_get":
                body = self.pinned_root
            else:
                body = b"1"
        except (QbhubError, ValueError, IndexError, UnicodeDecodeError) as exc:
            return b"\x01" + str(exc).encode()[:1000]
        return b"\x00" + body

    def _listed(self, name: str) -> int:
        size = self.listing.get(name)
        if size is None:
            raise UsageError(f"no object {name[:80]!r} in the archive")
        return size


class FrameReader:
    """Volumes and the end of any restore stream (the hub's worker's or an engine's own), read
    by exact length: DATA bytes received but not consumed yet wait in `pending`."""

    def __init__(self, stream: RestoreStream) -> None:
        self.stream = stream
        self.pending = b""

    def next_frame(self) -> tuple[bytes, bytes]:
        return self.stream.next_frame()

    def read_volume_into(self, size: int) -> IO[bytes]:
        """A reader of exactly the next `size` bytes (duck-typed as a binary file)."""
        return cast(IO[bytes], VolumeReader(self, size))

    def expect_end(self) -> None:
        if self.pending:
            raise IntegrityError("the restore stream carries more bytes than its header declared")
        kind, _ = self.stream.next_frame()
        if kind != END:
            raise IntegrityError("the restore stream carries more bytes than its header declared")


class VolumeReader:
    """A file-like object giving exactly `size` bytes of DATA, then end of file."""

    def __init__(self, channel: FrameReader, size: int) -> None:
        self.channel, self.left = channel, size

    def read(self, n: int = -1) -> bytes:
        if self.left == 0:
            return b""
        if not self.channel.pending:
            kind, payload = self.channel.next_frame()
            if kind != DATA:
                raise IntegrityError("the restore stream is shorter than its header declared")
            self.channel.pending = payload
        n = self.left if n is None or n < 0 else min(n, self.left)
        block, self.channel.pending = self.channel.pending[:n], self.channel.pending[n:]
        self.left -= len(block)
        return block

    def readable(self) -> bool:
        return True


class CountingReader:
    """A reader that reports every byte read from `inner` to a progress bar."""

    def __init__(self, inner: IO[bytes], progress: Progress) -> None:
        self.inner, self.progress = inner, progress

    def read(self, n: int = -1) -> bytes:
        block = self.inner.read(n)
        self.progress.advance(len(block))
        return block

    def readable(self) -> bool:
        return True


def vm_list(names: list[str]) -> str:
    """ "VM work", "VMs fedora and work", "VMs a, b and c"."""
    if len(names) == 1:
        return f"VM {names[0]}"
    return f"VMs {', '.join(names[:-1])} and {names[-1]}"


def parse_header(payload: bytes, request: RestoreRequest) -> RestoreHeader:
    """Decode the header strictly into a RestoreHeader with the renames applied.

    Only the session and the VMs are read; what the worker says of the archive (its ID or
    generation) is ignored: dom0 learned those from the root it authenticated itself.
    """
    try:
        doc = loads_bounded(payload)
        vms = []
        for vm in doc["vms"]:
            name = check_vm_name(vm["name"], "restore header")
            volumes = tuple(RestoreVolume(str(v["name"]), v["size"]) for v in vm["volumes"])
            vms.append(
                RestoreVM(
                    request.renames.get(name, name), str(vm["class"]), vm["settings"], volumes
                )
            )
        session = doc["session"]
        if not isinstance(session, str):
            raise TypeError("session")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the restore header is malformed ({exc})") from None
    return RestoreHeader(volumes=(), session=session, vms=tuple(vms))


def check_asked_for(header: RestoreHeader, sessions: list[str], request: RestoreRequest) -> None:
    """The header names the session dom0 expects (of `sessions`, the archive's as dom0 checked
    them) and exactly the VMs the user asked for."""
    expected = request.session or (sessions[-1] if sessions else None)
    if header.session != expected or header.session not in sessions:
        raise IntegrityError(
            f"the restore worker sent session {header.session[:40]!r}, not {expected}"
        )
    names = [vm.name for vm in header.vms]
    if len(set(names)) != len(names):
        raise IntegrityError("the restore worker sent a VM twice")
    # Always exact: with --all, `request.vms` holds what dom0 read from the session itself.
    wanted = {request.renames.get(n, n) for n in request.vms}
    if set(names) != wanted:
        extra = sorted(set(names) - wanted)[:3]
        raise IntegrityError(
            "the restore worker sent other VMs than asked for"
            + (f" ({', '.join(shown(n, 40) for n in extra)})" if extra else "")
        )


def dependency_order(vms: tuple[RestoreVM, ...]) -> list[RestoreVM]:
    """Templates and netvms before the VMs that use them (within the restored set)."""
    return vm_rules.dependency_order(
        vms, lambda vm: vm.name, lambda vm: vm.settings.get("properties", {})
    )


def _settings_of(vm: RestoreVM) -> VMSettings:
    s = vm.settings
    return VMSettings(
        name=vm.name,
        klass=vm.klass,
        properties=dict(s.get("properties", {})),
        features=dict(s.get("features", {})),
        tags=list(s.get("tags", [])),
        devices=list(s.get("devices", [])),
        firewall=list(s.get("firewall", [])),
        notes=str(s.get("notes", "")),
    )


def _renamed(header: RestoreHeader, renames: dict[str, str]) -> RestoreHeader:
    """Point properties that name a renamed VM (template, netvm, ...) at its new name."""
    if not renames:
        return header
    vms = []
    for vm in header.vms:
        props = {
            k: renames.get(v, v) if k in ("template", "netvm", "default_dispvm") else v
            for k, v in vm.settings.get("properties", {}).items()
        }
        vms.append(RestoreVM(vm.name, vm.klass, {**vm.settings, "properties": props}, vm.volumes))
    return RestoreHeader(header.volumes, header.session, header.settings, tuple(vms))


def restore_vms(
    platform: Platform,
    store: Store,
    hook: pluggy.HookRelay,
    engine: Engine,
    request: RestoreRequest,
) -> dict[str, Any]:
    """Restore VMs from the archive in `store`; see the module docstring for the guarantees.

    `engine` is dom0's instance of the archive's engine: it authenticates the root here and
    grants the worker read access (`Engine.grant_read`); it never parses anything else.
    """
    if request.settings_only and request.data_only:
        raise UsageError("--settings-only and --data-only exclude each other")
    for new in request.renames.values():
        check_vm_name(new, "--rename")
    # An engine with a worker of its own checks the archive there (dom0 checks its listing).
    grant = None if engine.restores_in_own_worker else engine.grant_read(store)
    if request.all_vms:  # the VMs the session holds, as dom0 itself reads them
        request = dataclasses.replace(request, vms=session_vms(engine, store, request.session))
    else:
        check_named_vms(engine, store, request)
    listing = dict(store.list()) if grant is not None else {}

    def start() -> RestoreStream:
        if grant is None:
            job = VMRestoreJob(request.session, request.vms, request.settings_only)
            return engine.open_vm_restore(store, job)
        return _start_hub_worker(platform, store, grant, listing, request)

    if request.replace or request.data_only:
        checked = _run_worker(platform, store, hook, start, request, do_import=False)
        # The import reads the session just checked (`start` sees this request): an engine's
        # own worker lists the sessions again, and one committed meanwhile is not the newest.
        request = dataclasses.replace(request, session=checked["session"])
    return _run_worker(platform, store, hook, start, request, do_import=True)


def _start_hub_worker(
    platform: Platform,
    store: Store,
    grant: ReadGrant,
    listing: dict[str, int],
    request: RestoreRequest,
) -> WorkerChannel:
    """The hub's restore worker in a new DispVM, running the engine with a read grant."""
    job = {
        "engine": request.engine,
        "grant": grant.secret,
        "session": request.session,
        "vms": request.vms,
        "settings_only": request.settings_only,
    }
    process = platform.dispvm_service(WORKER_SERVICE)
    channel = WorkerChannel(process, store, listing, grant.pinned_root, list(grant.facts.sessions))
    try:
        channel.start(job)
    except BaseException:
        process.kill()
        raise
    return channel


def check_named_vms(engine: Engine, store: Store, request: RestoreRequest) -> None:
    """A missing session or VM is "not found" (exit 7), said by dom0 before any worker starts;
    for an engine whose sessions only its worker can read, the worker says it instead."""
    try:
        described = engine.describe_session(store, request.session)
    except UsageError:
        return
    held = _vm_names(described)
    missing = [name for name in request.vms if name not in held]
    if held and missing:  # (a session of volumes only: the worker says so)
        raise NotFoundError(
            f"no VM named {', '.join(missing)} in session {described.get('session')} "
            f"(it holds {', '.join(held[:10])}{' ...' if held[10:] else ''})"
        )


def session_vms(engine: Engine, store: Store, session: str | None) -> list[str]:
    """The names of the VMs a session holds, read by dom0's own engine from the authenticated
    session record (never from the worker, which could name any VM it wants created or, with
    --replace, overwritten)."""
    try:
        described = engine.describe_session(store, session)
    except UsageError as exc:
        raise UsageError(
            f"--all needs dom0 to read the session's list of VMs, and {exc}: name the VMs"
        ) from None
    names = _vm_names(described)
    if not names:
        raise NotFoundError(
            f"session {described.get('session')} holds no VM (a backup of volumes only?)"
        )
    return names


def _vm_names(described: dict[str, Any]) -> list[str]:
    """The VM names of an authenticated session description, checked."""
    metadata = described.get("metadata")
    documents = metadata.get("vms") if isinstance(metadata, dict) else None
    if not isinstance(documents, list):
        return []
    names = [
        check_vm_name(doc.get("name") if isinstance(doc, dict) else None, "session record")
        for doc in documents
    ]
    if len(set(names)) != len(names):
        raise IntegrityError("the session record names a VM twice")
    return names


def _run_worker(
    platform: Platform,
    store: Store,
    hook: pluggy.HookRelay,
    start: Callable[[], RestoreStream],
    request: RestoreRequest,
    *,
    do_import: bool,
) -> dict[str, Any]:
    existing = {vm.name for vm in platform.list_vms()}
    stream = start()
    channel = FrameReader(stream)
    created: list[str] = []
    held: list[HeldVM] = []
    removed: list[str] = []
    try:
        kind, payload = channel.next_frame()
        if kind != HEADER:
            raise IntegrityError("the restore stream does not start with a header")
        header = parse_header(payload, request)
        check_asked_for(header, stream.sessions, request)
        hook.qbhub_validate_restore(header=header)
        header = _renamed(header, request.renames)
        _check_plan(header, existing, request)
        outcome = _judge(platform, store, header, request)
        header = _with_settings(header, outcome)
        removals = _replace_plan(platform, store, header, existing, request)
        if not do_import:
            _consume(channel, header, request)
            return {"session": header.session}
        _report_plan(header, outcome, request)
        log.info("restoring %s from session %s", ", ".join(v.name for v in header.vms),
                 header.session)  # fmt: skip
        overwritten = [vm.name for vm in header.vms] if request.data_only else []
        held = hold_vms(platform, removals or overwritten)
        for name in removals:
            platform.remove_vm(name)
            removed.append(name)
        order = dependency_order(header.vms)
        failed: list[str] = list(outcome.left_out)
        if not request.data_only:
            for vm in order:
                platform.create_vm(_settings_of(vm), pool=request.pool)
                created.append(vm.name)
        imported = 0
        if request.settings_only:
            failed += _size_volumes(platform, header.vms)
        else:
            for vm in header.vms:
                for volume in vm.volumes:
                    reader = channel.read_volume_into(volume.size)
                    if request.progress is not None:
                        request.progress.start(f"{vm.name}:{volume.name}", volume.size)
                        reader = cast(IO[bytes], CountingReader(reader, request.progress))
                    platform.import_volume(vm.name, volume.name, volume.size, reader)
                    log.info("imported %s:%s (%d bytes)", vm.name, volume.name, volume.size)
                    if request.progress is not None:
                        request.progress.finish()
                    imported += volume.size
        channel.expect_end()
        if not request.data_only:
            for vm in order:
                failed += [f"{vm.name}: {f}" for f in platform.apply_settings(_settings_of(vm))]
    except BaseException as exc:
        log.warning("restore failed (%s: %s); undoing it", type(exc).__name__, exc)
        stream.abort()
        for name in reversed(created):
            with contextlib.suppress(QbhubError):
                platform.remove_vm(name)
        _recover(platform, held, removed, exc, data_only=request.data_only)
        raise
    finally:
        stream.close()
    leftover = release(platform, held)
    return {
        "session": header.session,
        "vms": [vm.name for vm in order],
        "bytes_imported": imported,
        "settings_failed": failed + [f"holder VM {h} could not be removed" for h in leftover],
    }


def _judge(
    platform: Platform, store: Store, header: RestoreHeader, request: RestoreRequest
) -> PolicyOutcome:
    """Apply the settings policy with dom0's own knowledge of its VMs (not the worker's).

    One listing gives every VM's class; the properties the policy judges references by
    (provides_network, template_for_dispvms) are read only for the VMs the restored settings
    name (`referenced_vms`), not for every VM on the system."""
    vms = [(vm.name, vm.klass, vm.settings) for vm in header.vms]
    named = referenced_vms(vms)
    known: dict[str, KnownVM] = {}
    untouchable: set[str] = set()
    for summary in platform.list_vms():
        if summary.klass in ("AdminVM", "DispVM") or summary.name not in named:
            known[summary.name] = KnownVM(summary.klass)
            continue
        props = platform.vm_settings(summary.name).properties
        known[summary.name] = KnownVM(
            summary.klass,
            provides_network=str(props.get("provides_network")) == "True",
            template_for_dispvms=str(props.get("template_for_dispvms")) == "True",
        )
    if isinstance(store, QrexecStore):
        untouchable.add(store.vm)
    restored = {vm.name: vm.klass for vm in header.vms}
    context = PolicyContext(
        restored=restored,
        existing={k: v for k, v in known.items() if k not in restored or request.replace},
        untouchable=untouchable,
        allow=request.allow,
        limits=platform.host_limits(),
    )
    return apply_policy(vms, context)


def _with_settings(header: RestoreHeader, outcome: PolicyOutcome) -> RestoreHeader:
    """The header with each VM's settings replaced by what the policy lets through."""
    vms = tuple(
        RestoreVM(vm.name, vm.klass, outcome.settings[vm.name], vm.volumes) for vm in header.vms
    )
    return RestoreHeader(header.volumes, header.session, header.settings, vms)


def _report_plan(header: RestoreHeader, outcome: PolicyOutcome, request: RestoreRequest) -> None:
    """Tell the user, before anything is created, what will be applied that is sensitive."""
    if request.data_only:
        return
    request.report(f"restoring {', '.join(vm.name for vm in header.vms)} from {header.session}")
    for vm in header.vms:  # sizes come from the worker: a huge one is the user's to judge
        sizes = ", ".join(f"{v.name} {v.size / 2**30:.1f} GiB" for v in vm.volumes)
        request.report(f"  volumes: {vm.name}: {sizes or 'none'}")
    for line in outcome.sensitive:
        request.report(f"  sensitive: {line}")
    for line in outcome.left_out:
        request.report(f"  left out: {line}")


def _recover(
    platform: Platform,
    held: list[HeldVM],
    removed: list[str],
    exc: BaseException,
    *,
    data_only: bool,
) -> None:
    """After a failed restore: bring back the replaced VMs, or put back the data --data-only
    was overwriting (see replace_guard), or say why not."""
    if not held:
        return
    if data_only:
        problems = put_back(platform, held)
    else:
        problems = bring_back(platform, [h for h in held if h.name in removed])
        release(platform, [h for h in held if h.name not in removed])
    if problems:
        raise RecoveryError(
            f"{exc}; then not every replaced VM could be brought back: {'; '.join(problems)}"
        ) from exc


def _size_volumes(platform: Platform, vms: tuple[RestoreVM, ...]) -> list[str]:
    """--settings-only: grow each new, empty volume to its archived size; report what could not."""
    failed = []
    for vm in vms:
        for volume in vm.volumes:
            try:
                platform.resize_volume(vm.name, volume.name, volume.size)
            except QbhubError as exc:
                failed.append(f"{vm.name}: volume {volume.name} keeps its default size ({exc})")
    return failed


def _check_plan(header: RestoreHeader, existing: set[str], request: RestoreRequest) -> None:
    names = [vm.name for vm in header.vms]
    if request.data_only:
        missing = [n for n in names if n not in existing]
        if missing:
            raise NotFoundError(f"--data-only needs existing VMs; missing: {', '.join(missing)}")
        return
    clash = [n for n in names if n in existing]
    if clash and not request.replace:
        raise UsageError(
            f"{vm_list(clash)} already exist{'s' if len(clash) == 1 else ''}; "
            "use --replace, or --rename OLD:NEW"
        )


def _vm_refs(settings: VMSettings) -> set[str]:
    """The VMs that `settings` names in VM-valued properties (template, netvm, ...)."""
    return {str(v) for k, v in settings.properties.items() if PROPERTIES.get(k) == VM_REF and v}


def _replace_plan(
    platform: Platform,
    store: Store,
    header: RestoreHeader,
    existing: set[str],
    request: RestoreRequest,
) -> list[str]:
    """The existing VMs --replace removes, dependents first; refuse before anything changes.

    A VM can only be removed once nothing refers to it, so a replaced VM still used by a VM this
    restore does not replace is refused up front (UsageError), as is replacing (or importing
    data into) the VM whose storage agent serves the archive being read.
    """
    touched = {vm.name for vm in header.vms if vm.name in existing}
    if (
        isinstance(store, QrexecStore)
        and store.vm in touched
        and (request.replace or request.data_only)
    ):
        raise UsageError(f"VM {store.vm} holds the archive being restored; not touching it")
    if not request.replace or not touched:
        return []
    refs = {
        vm.name: _vm_refs(platform.vm_settings(vm.name))
        for vm in platform.list_vms()
        if vm.klass != "AdminVM"
    }
    for name in sorted(touched):
        users = sorted(u for u, r in refs.items() if name in r and u not in touched)
        if users:
            raise UsageError(
                f"VM {name} is used by {', '.join(users)}, which this restore does not "
                "replace; restore those too, or use --rename OLD:NEW"
            )
    order: list[str] = []
    left = set(touched)
    while left:  # remove a VM only once no VM still to be removed refers to it
        ready = sorted(n for n in left if not any(n in refs[u] for u in left - {n}))
        if not ready:
            raise UsageError(f"VMs {', '.join(sorted(left))} refer to each other in a cycle")
        order += ready
        left -= set(ready)
    return order


def _consume(channel: FrameReader, header: RestoreHeader, request: RestoreRequest) -> None:
    """Receive the whole stream without importing it: sizes exact, nothing after the end."""
    if not request.settings_only:
        for vm in header.vms:
            for volume in vm.volumes:
                reader = channel.read_volume_into(volume.size)
                got = 0
                while block := reader.read(1 << 20):
                    got += len(block)
                if got != volume.size:
                    raise IntegrityError(f"volume {vm.name}:{volume.name} is short")
    channel.expect_end()
