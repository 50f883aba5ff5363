"""Where qbhub's log records go: `--verbose` to stderr, `--log-file` to a file, for support.

Modules log with `logging.getLogger(__name__)`; nothing is shown unless asked for (the one-line
error and the command's own output are what a user reads). `-v` shows INFO records on stderr
(what is backed up or restored, sessions committed), `-vv` DEBUG ones too. `--log-file PATH`
(or $QBHUB_LOG_FILE) appends every record of DEBUG level and up, with time and process ID, plus
the command line and its outcome: what to attach to a bug report. Scheduled runs log to the
journal through stderr. Passphrases never reach a log record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UsageError

LOGGERS = ("qubes_backup_hub", "qbhub_native", "qbhub_borg")
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def configure(verbosity: int, log_file: Path | None) -> None:
    """Attach the handlers the options ask for to qbhub's loggers (once per process)."""
    handlers: list[logging.Handler] = []
    if verbosity > 0:
        shown = logging.StreamHandler()
        shown.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
        shown.setFormatter(logging.Formatter("qbhub: %(message)s"))
        handlers.append(shown)
    if log_file is not None:
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot open log file {log_file}: {exc.strerror}") from None
        stored = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", errors="replace"))
        stored.setLevel(logging.DEBUG)
        stored.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(stored)
    if not handlers:
        return
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(min(h.level for h in handlers))
        for handler in handlers:
            logger.addHandler(handler)
