"""dom0's end of a VM-level restore from a Borg archive: the worker's restore stream.

Borg needs the passphrase to read, so there is no read grant for the hub's restore worker to
hold: the Borg worker itself reads the session's settings document from the Borg archive and
sends the hub's strict restore stream (HEADER, DATA..., END), which dom0 checks exactly as it
checks the hub's worker's (`qubes_backup_hub.jobs.restore`). This module only hands dom0 those
frames and ends the worker; it parses nothing.
"""

from __future__ import annotations

from contextlib import ExitStack

from .protocol import DATA, END, HEADER, MAX_DATA_FRAME, MAX_HEADER, MAX_PROGRESS, PROGRESS
from .runner import WorkerSession

STREAM_FRAMES = {HEADER: MAX_HEADER, DATA: MAX_DATA_FRAME, END: 0, PROGRESS: MAX_PROGRESS}


class BorgRestoreStream:
    """The restore stream of one Borg worker (`qubes_backup_hub.engine.RestoreStream`).

    `sessions` is the worker's listing as dom0 checked it against its rollback memory; `stack`
    holds the worker and the archive's lock until `close` or `abort`.
    """

    def __init__(self, stack: ExitStack, worker: WorkerSession, sessions: list[str]) -> None:
        self.stack, self.worker, self.sessions = stack, worker, sessions

    def next_frame(self) -> tuple[bytes, bytes]:
        while True:
            kind, payload = self.worker.receive(STREAM_FRAMES)
            if kind != PROGRESS:
                return kind, payload

    def abort(self) -> None:
        self.worker.close()  # kill the worker and its borg serve at once
        self.stack.close()

    def close(self) -> None:
        self.stack.close()
