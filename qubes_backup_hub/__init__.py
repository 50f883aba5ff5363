"""qbhub, the Qubes Backup Hub: a pluggy host for incremental, encrypted, authenticated backups."""

import logging

__version__ = "0.1.0"
PLUGIN_GROUP = "qbhub"

# Log records are shown only where the CLI is asked to (cli/logsetup.py), never by Python's
# last-resort handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())
