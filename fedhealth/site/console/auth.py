"""Who may use the site console: a login token printed at start, an optional read-only
token for viewers, or a password the operator set (stored hashed, mode 0600).

Roles: ``"operator"`` may approve and decline studies; ``"viewer"`` may only look.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from werkzeug.security import check_password_hash, generate_password_hash

from fedhealth.config.site import SiteProfile
from fedhealth.errors import ConfigError

Role = Literal["operator", "viewer"]
PASSWORD_FILE = "console-password"
MIN_PASSWORD = 12


def password_path(profile: SiteProfile) -> Path:
    """Where the operator's hashed console password lives: ``<workspace>/console-password``."""
    return profile.workspace / PASSWORD_FILE


def set_password(profile: SiteProfile, password: str) -> Path:
    """Store the operator password's salted scrypt hash (werkzeug), file mode 0600.

    Raises
    ------
    ConfigError
        The password is shorter than :data:`MIN_PASSWORD` characters.
    """
    if len(password) < MIN_PASSWORD:
        raise ConfigError(
            f"the console password of site {profile.name!r} must have at least "
            f"{MIN_PASSWORD} characters; choose a longer one"
        )
    path = password_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(generate_password_hash(password, method="scrypt") + "\n")
    os.replace(tmp, path)
    return path


def _stored_hash(profile: SiteProfile) -> str | None:
    path = password_path(profile)
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
            f"run `chmod 600 {path}` or set the password again"
        )
    return path.read_text().strip() or None


@dataclass(frozen=True)
class Secrets:
    """The secrets of one console session.

    Attributes
    ----------
    token : str
        The operator's login token (random, printed at start).
    read_only_token : str or None
        The viewers' token, if one was asked for.
    password_hash : str or None
        The operator password's hash, if one is set.
    """

    token: str
    read_only_token: str | None = None
    password_hash: str | None = None

    @classmethod
    def generate(cls, profile: SiteProfile, read_only: bool = False) -> Secrets:
        """Fresh random tokens (``secrets.token_urlsafe``) and the stored password hash."""
        return cls(
            token=secrets.token_urlsafe(32),
            read_only_token=secrets.token_urlsafe(32) if read_only else None,
            password_hash=_stored_hash(profile),
        )

    def role_of(self, secret: str) -> Role | None:
        """The role a typed secret grants, or None. Tokens compare in constant time."""
        secret = secret.strip()
        if not secret:
            return None
        if secrets.compare_digest(secret.encode(), self.token.encode()):
            return "operator"
        if self.read_only_token and secrets.compare_digest(
            secret.encode(), self.read_only_token.encode()
        ):
            return "viewer"
        if self.password_hash and check_password_hash(self.password_hash, secret):
            return "operator"
        return None
