"""Error types that the CLI turns into one clear message and a non-zero exit.

Every error names *what* was wrong and *where* (file, key, column, row, site,
round) and, where it can, what to do about it.
"""

from __future__ import annotations


class FedHealthError(Exception):
    """Base class of every error fedhealth reports to a user without a traceback."""

    exit_code: int = 1


class ConfigError(FedHealthError):
    """An experiment config or site profile is invalid."""

    exit_code = 2


class DataError(FedHealthError):
    """A site's data cannot be read as declared."""

    exit_code = 3


class PolicyError(FedHealthError):
    """A site refuses a request because it breaks the site's privacy policy."""

    exit_code = 4


class CryptoError(FedHealthError):
    """A key, signature or ciphertext failed a check."""

    exit_code = 5


class FederationError(FedHealthError):
    """A federated run could not complete (too few sites, all refused, ...)."""

    exit_code = 6
