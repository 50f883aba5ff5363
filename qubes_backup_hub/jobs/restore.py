"""VM-level restore, dom0's side: drive a restore worker in a DispVM and import what it sends.

dom0 relays the worker's read-only store requests, then reads the restore stream: the header is
parsed strictly and put through every restore-validate hook and the rollback check before any VM
is created; volume bytes are imported by exact length; anything after the last byte, a short or
long volume, or a worker failure aborts, and every VM this restore created is removed again.
With --replace or --data-only (which touch existing VMs) the whole stream is first received and
checked once without importing, and only then imported from a second run of the worker.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import IO, Any, cast

import pluggy

from ..errors import IntegrityError, NotFoundError, QbhubError, RollbackError, UsageError
from ..platform.base import Platform, ServiceProcess, VMSettings
from ..safety import vm_rules
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
from ..safety.rollback import LocalState
from ..safety.vm_rules import PROPERTIES, VM_REF, check_vm_name
from ..store.base import Store
from ..store.qrexec import OP, QrexecStore
from .replace_guard import HeldVM, RecoveryError, bring_back, hold_vms, release

WORKER_SERVICE = "qbhub.RestoreWorker"
READ_OPS = {OP[name]: name for name in ("get", "range", "list", "root_get", "exists")}
MAX_STORE_REPLY = 80 << 20
FROM_WORKER = {QUERY: MAX_QUERY, HEADER: MAX_HEADER, DATA: MAX_DATA_FRAME, END: 0, FAIL: MAX_FAIL}


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


class WorkerChannel:
    """dom0's end of one restore worker: relays store queries, yields the stream's frames."""

    def __init__(self, process: ServiceProcess, store: Store) -> None:
        self.process, self.store = process, store
        self.pending = b""  # DATA bytes received but not consumed yet

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
                reason = payload.decode("utf-8", "replace").splitlines()[0] if payload else ""
                raise QbhubError(f"the restore worker failed: {reason[:300]}")
            return kind, payload

    def _answer(self, query: bytes) -> bytes:
        op = READ_OPS.get(query[0]) if query else None
        try:
            if op is None:
                raise UsageError("the restore worker may only read")
            args = query[1:].decode().split("\n")
            if op == "get":
                body = self.store.get(args[0], min(int(args[1]), MAX_STORE_REPLY))
            elif op == "range":
                body = self.store.get_range(
                    args[0], int(args[1]), min(int(args[2]), MAX_STORE_REPLY)
                )
            elif op == "list":
                body = "".join(f"{n} {s}\n" for n, s in self.store.list()).encode()
            elif op == "root_get":
                body = self.store.get_root(min(int(args[0]), MAX_STORE_REPLY)) or b""
            else:
                body = b"1" if self.store.exists() else b"0"
        except (QbhubError, ValueError, IndexError, UnicodeDecodeError) as exc:
            return b"\x01" + str(exc).encode()[:1000]
        return b"\x00" + body

    def read_volume_into(self, size: int) -> IO[bytes]:
        """A reader of exactly the next `size` bytes (duck-typed as a binary file)."""
        return cast(IO[bytes], VolumeReader(self, size))

    def expect_end(self) -> None:
        if self.pending:
            raise IntegrityError("the restore stream carries more bytes than its header declared")
        kind, _ = self.next_frame()
        if kind != END:
            raise IntegrityError("the restore stream carries more bytes than its header declared")


class VolumeReader:
    """A file-like object giving exactly `size` bytes of DATA, then end of file."""

    def __init__(self, channel: WorkerChannel, size: int) -> None:
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


def parse_header(payload: bytes, request: RestoreRequest) -> tuple[RestoreHeader, dict[str, Any]]:
    """Decode the header strictly into a RestoreHeader (renames applied) and its archive facts."""
    try:
        doc = json.loads(payload)
        facts = {k: doc[k] for k in ("archive_id", "generation", "identity", "session")}
        vms = []
        for vm in doc["vms"]:
            name = check_vm_name(vm["name"], "restore header")
            volumes = tuple(RestoreVolume(str(v["name"]), v["size"]) for v in vm["volumes"])
            vms.append(
                RestoreVM(
                    request.renames.get(name, name), str(vm["class"]), vm["settings"], volumes
                )
            )
        if not isinstance(facts["generation"], int) or not isinstance(facts["archive_id"], str):
            raise TypeError("archive facts")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the restore header is malformed ({exc})") from None
    return RestoreHeader(volumes=(), session=str(facts["session"]), vms=tuple(vms)), facts


def dependency_order(vms: tuple[RestoreVM, ...]) -> list[RestoreVM]:
    """Templates and netvms before the VMs that use them (within the restored set)."""
    return vm_rules.dependency_order(
        vms, lambda vm: vm.name, lambda vm: vm.settings.get("properties", {})
    )


def check_archive(state: LocalState, facts: dict[str, Any]) -> None:
    """Refuse a substituted archive or a rolled-back root (the worker reports, dom0 decides)."""
    known = state.recall(str(facts["archive_id"]))
    if known is None:
        return
    if known.identity and known.identity != facts["identity"]:
        raise IntegrityError(
            f"archive {facts['archive_id']} is not the one this machine knows by that ID; refusing"
        )
    if facts["generation"] < known.generation:
        raise RollbackError(
            f"archive rollback detected: the root is generation {facts['generation']}, "
            f"but generation {known.generation} was seen here"
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
    state: LocalState,
    passphrase: bytes,
    request: RestoreRequest,
) -> dict[str, Any]:
    """Restore VMs from the archive in `store`; see the module docstring for the guarantees."""
    if request.settings_only and request.data_only:
        raise UsageError("--settings-only and --data-only exclude each other")
    for new in request.renames.values():
        check_vm_name(new, "--rename")
    if request.replace or request.data_only:
        _run_worker(platform, store, hook, state, passphrase, request, do_import=False)
    return _run_worker(platform, store, hook, state, passphrase, request, do_import=True)


def _run_worker(
    platform: Platform,
    store: Store,
    hook: pluggy.HookRelay,
    state: LocalState,
    passphrase: bytes,
    request: RestoreRequest,
    *,
    do_import: bool,
) -> dict[str, Any]:
    existing = {vm.name for vm in platform.list_vms()}
    job = {
        "engine": request.engine,
        "passphrase": passphrase.decode(),
        "session": request.session,
        "vms": request.vms,
        "settings_only": request.settings_only,
    }
    process = platform.dispvm_service(WORKER_SERVICE)
    channel = WorkerChannel(process, store)
    created: list[str] = []
    held: list[HeldVM] = []
    removed: list[str] = []
    try:
        channel.start(job)
        kind, payload = channel.next_frame()
        if kind != HEADER:
            raise IntegrityError("the restore stream does not start with a header")
        header, facts = parse_header(payload, request)
        hook.qbhub_validate_restore(header=header)
        check_archive(state, facts)
        header = _renamed(header, request.renames)
        _check_plan(header, existing, request)
        removals = _replace_plan(platform, store, header, existing, request)
        if not do_import:
            _consume(channel, header, request)
            return {"session": header.session}
        held = hold_vms(platform, removals)
        for name in removals:
            platform.remove_vm(name)
            removed.append(name)
        order = dependency_order(header.vms)
        failed: list[str] = []
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
                    platform.import_volume(vm.name, volume.name, volume.size, reader)
                    imported += volume.size
        channel.expect_end()
        if not request.data_only:
            for vm in order:
                failed += [f"{vm.name}: {f}" for f in platform.apply_settings(_settings_of(vm))]
        state.remember(str(facts["archive_id"]), int(facts["generation"]), str(facts["identity"]))
    except BaseException as exc:
        process.kill()
        for name in reversed(created):
            with contextlib.suppress(QbhubError):
                platform.remove_vm(name)
        _recover(platform, held, removed, exc)
        raise
    finally:
        process.wait(timeout=60)
    leftover = release(platform, held)
    return {
        "session": header.session,
        "vms": [vm.name for vm in order],
        "bytes_imported": imported,
        "settings_failed": failed + [f"holder VM {h} could not be removed" for h in leftover],
    }


def _recover(
    platform: Platform, held: list[HeldVM], removed: list[str], exc: BaseException
) -> None:
    """After a failed restore: bring back the replaced VMs (see replace_guard), or say why not."""
    if not held:
        return
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
            f"VM {', '.join(clash)} already exists; use --replace, or --rename OLD:NEW"
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


def _consume(channel: WorkerChannel, header: RestoreHeader, request: RestoreRequest) -> None:
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
