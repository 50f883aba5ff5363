"""`qbhub mount`: browse archived volumes read-only before restoring anything (plain Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import NotFoundError, UsageError
from ..fuseview import ArchiveView, layout, serve
from ..platform.detect import platform_choice
from ..progress import human_bytes
from ..safety.names import check_session_id, check_volume_name
from .context import archive_options, cli_state


@click.command()
@archive_options
@click.option("--session", help="Show only this session (with VOLUME: the one to show).")
@click.argument("targets", nargs=-1, required=True, metavar="[VOLUME] MOUNTPOINT")
def mount(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    session: str | None,
    targets: tuple[str, ...],
) -> None:
    """Mount the archive read-only at MOUNTPOINT (FUSE) and serve it until unmounted.

    \b
    qbhub mount --dest D MOUNTPOINT          every session: MOUNTPOINT/SESSION/VOLUME
    qbhub mount --dest D VOLUME MOUNTPOINT   one volume (newest, or --session): MOUNTPOINT/VOLUME

    Each volume is a read-only image file; only the chunks read are fetched, each authenticated
    (a chunk that fails is an I/O error, never wrong bytes). Loop-mount an image to browse its
    files: `mount -o ro,loop MOUNTPOINT/VOLUME /mnt`. Runs in the foreground: unmount with
    `umount MOUNTPOINT` (or `fusermount3 -u`), or press Ctrl-C. Needs FUSE (libfuse 3); in Qubes
    dom0 never mounts archive data (a DispVM view is planned), so it is refused there.
    """
    state = cli_state(json_output)
    if len(targets) > 2:
        raise UsageError("give at most VOLUME and MOUNTPOINT")
    volume = targets[0] if len(targets) == 2 else None
    mountpoint = Path(targets[-1])
    if volume is not None:
        check_volume_name(volume)
    if session:
        check_session_id(session)
    if platform_choice() == "qubes":
        raise UsageError("dom0 never mounts archive data: mount from a DispVM or plain Linux")
    if not mountpoint.is_dir():
        raise NotFoundError(f"mount point {mountpoint} is not a directory")
    eng = state.engine(engine, passphrase_file)
    store = state.store(dest)
    sessions = eng.list_sessions(store, session=session)["sessions"]
    if volume is not None and session is None:
        holding = [s for s in sessions if any(v["name"] == volume for v in s["volumes"])]
        sessions = holding[-1:]
    files = layout(sessions, volume)
    if not files:
        raise NotFoundError(f"no volume {volume} in the archive" if volume else "no sessions")
    view = ArchiveView(files, lambda s, v: eng.open_volume(store, s, v))
    click.echo(
        f"qbhub: serving {len(files)} volume(s) read-only at {mountpoint} "
        f"(umount {mountpoint} to stop)",
        err=True,
    )
    try:
        serve(view, os.fspath(mountpoint))
    finally:
        store.close()
    click.echo(
        f"qbhub: unmounted; {human_bytes(view.bytes_read)} read, "
        f"{view.chunks_fetched} chunks ({human_bytes(view.bytes_fetched)}) fetched",
        err=True,
    )
