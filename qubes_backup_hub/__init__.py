"""qbhub, the Qubes Backup Hub: a pluggy host for incremental, encrypted, authenticated backups."""

__version__ = "0.1.0"
PLUGIN_GROUP = "qbhub"
