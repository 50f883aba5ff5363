"""`qbhub backup` and `qbhub restore`: whole VMs, with their settings, through the platform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from ..jobs.backup import backup_vms, choose_vms
from ..jobs.restore import RestoreRequest, restore_vms
from ..platform.detect import default_platform
from ..progress import Progress, human_bytes
from ..safety.names import check_session_id
from ..safety.policy import RISKS
from ..session_notes import make_notes
from ..store.qrexec import QrexecStore
from . import format as fmt
from .context import archive_options, cli_state


@click.command()
@archive_options
@click.argument("vms", nargs=-1, metavar="[VM]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM except dom0 and DispVMs.")
@click.option("--exclude", multiple=True, metavar="VM", help="Leave this VM out (repeatable).")
@click.option("--comment", metavar="TEXT", help="A note kept with the session (qbhub list).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag the session (repeatable).")
def backup(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    vms: tuple[str, ...],
    all_vms: bool,
    exclude: tuple[str, ...],
    comment: str | None,
    tags: tuple[str, ...],
) -> None:
    """Back up VMs (their persistent volumes and settings) as one session.

    --dest is a directory or qubes://BACKUPVM/NAME (the storage agent in a backup VM). DispVMs
    are backed up only when named. Only what changed since the last session is stored.
    """
    state = cli_state(json_output)
    notes = make_notes(comment, list(tags))
    platform = default_platform()
    store = state.store(dest)
    serving = store.vm if isinstance(store, QrexecStore) else None
    try:
        names = choose_vms(platform, list(vms), all_vms, list(exclude), serving=serving)
        if all_vms and serving and serving not in names and serving not in exclude:
            click.echo(f"qbhub: leaving out {serving}: it stores this archive (name it to back "
                       "it up anyway)", err=True)  # fmt: skip
        eng = state.engine(engine, passphrase_file)
        result = backup_vms(
            platform,
            eng,
            store,
            state.registry.pm.hook,
            names,
            prepare_in_background=not state.passphrase_prompts(passphrase_file),
            session_notes=notes,
        )
    finally:
        store.close()
    state.emit(result, fmt.backup_text)


def parse_renames(renames: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in renames:
        old, sep, new = item.partition(":")
        if not sep or not old or not new:
            raise UsageError(f"--rename takes OLD:NEW, not {item!r}")
        mapping[old] = new
    return mapping


@click.command()
@archive_options
@click.argument("vms", nargs=-1, metavar="[VM]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM in the session.")
@click.option("--session", help="Restore from this session (default: the newest).")
@click.option("--rename", "renames", multiple=True, metavar="OLD:NEW", help="Restore OLD as NEW.")
@click.option("--pool", help="Create the VMs' volumes in this storage pool.")
@click.option(
    "--settings-only",
    is_flag=True,
    help="Create the VMs and settings, no data (volumes empty, at their archived sizes).",
)
@click.option("--data-only", is_flag=True, help="Restore volume data into existing VMs only.")
@click.option("--replace", is_flag=True, help="Replace existing VMs of the same name.")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    type=click.Choice(sorted(RISKS)),
    metavar="RISK",
    help="Also restore settings the policy holds back for this risk (repeatable): "
    + "; ".join(f"{word}: {what}" for word, what in sorted(RISKS.items()))
    + ".",
)
def restore(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    vms: tuple[str, ...],
    all_vms: bool,
    session: str | None,
    renames: tuple[str, ...],
    pool: str | None,
    settings_only: bool,
    data_only: bool,
    replace: bool,
    allow: tuple[str, ...],
) -> None:
    """Restore VMs from an archive; the archive is parsed in a disposable VM, never in dom0.

    dom0 authenticates the archive root and hands the disposable VM only a read key. Nothing is
    imported until the restore stream's header passed every check and the settings policy
    (docs/threat-model.md): references to dom0 or the backup VM refuse the restore; risky
    settings (PCI devices, autostart, PV mode, ...) are left out unless --allow names the risk;
    what is sensitive is listed before anything is created. A failure removes the VMs this
    restore created. Existing VMs are left alone unless --replace.
    """
    state = cli_state(json_output)
    if not vms and not all_vms:
        raise UsageError("name the VMs to restore, or give --all")
    if vms and all_vms:
        raise UsageError("name the VMs to restore or give --all, not both")
    if session:
        check_session_id(session)
    request = RestoreRequest(
        vms=list(vms),
        session=session,
        renames=parse_renames(renames),
        pool=pool,
        settings_only=settings_only,
        data_only=data_only,
        replace=replace,
        engine=engine or state.archive_engine(),
        all_vms=all_vms,
        allow=frozenset(allow),
        report=lambda line: click.echo(line, err=True),
        progress=Progress(enabled=None if not state.json_output else False),
    )
    eng = state.engine(engine, passphrase_file)
    store = state.store(dest)
    try:
        result = restore_vms(default_platform(), store, state.registry.pm.hook, eng, request)
    finally:
        store.close()
    state.emit(result, restore_text)


def restore_text(r: dict[str, Any]) -> str:
    lines = [
        f"Restored {', '.join(r['vms']) or 'nothing'} from session {r['session']} "
        f"({human_bytes(r['bytes_imported'])} of volume data)"
    ]
    lines += [f"  setting not applied: {f}" for f in r["settings_failed"]]
    return "\n".join(lines)
