"""Typed errors raised anywhere in qbhub and caught at the CLI edge, each with its exit code.

Exit codes (documented in the README and `qbhub --help`):
  0 success, 1 other error, 2 usage error, 3 integrity or authentication failure,
  4 rollback detected, 5 wrong passphrase, 6 storage or I/O error, 7 not found,
  8 refused by a restore validator, 9 `diff --exit-status` found a difference, 130 interrupted.
"""

from __future__ import annotations


class QbhubError(Exception):
    """Base of every error qbhub reports as one line and a non-zero exit code."""

    exit_code = 1


class UsageError(QbhubError):
    """The command line or the request does not make sense."""

    exit_code = 2


class IntegrityError(QbhubError):
    """Data read back from storage failed authentication, hashing or structural checks."""

    exit_code = 3


class UnencryptedArchiveError(IntegrityError):
    """The archive is not authenticated under a passphrase and the user did not ask for that
    (`--allow-unencrypted`): storage may have substituted or downgraded it."""


class KdfParametersError(IntegrityError):
    """The root's key-derivation parameters are outside the documented bounds (a root made to
    exhaust memory or time before anything could be authenticated)."""


class RollbackError(IntegrityError):
    """The archive root is older than the newest one this machine has seen."""

    exit_code = 4


class PassphraseError(QbhubError):
    """The passphrase does not unlock the archive key, or none could be obtained."""

    exit_code = 5


class StoreError(QbhubError):
    """The storage backend failed (missing object, I/O error, refused name or size)."""

    exit_code = 6


class NotFoundError(QbhubError):
    """A named session, volume, archive or plugin does not exist."""

    exit_code = 7


class ValidationError(QbhubError):
    """A restore-validate hook refused what a restore would import."""

    exit_code = 8


class DifferenceFound(QbhubError):
    """`diff --exit-status`: the archived volume and the local one differ (not an error of
    integrity: both were read correctly)."""

    exit_code = 9
