"""The bearer token that guards `corral up` (and `corral serve X --http`).

Generated on first use, kept in `$CORRAL_HOME/token` with mode 0600, reused after.
Anyone who can read that file can use the servers; nobody else can.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from corral.errors import InvalidArgument

__all__ = ["load_or_create_token", "token_matches", "token_path"]

TOKEN_FILE = "token"


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def load_or_create_token(home: Path) -> str:
    """The install's token, created (0600, atomically) on first use."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = token_path(home)
    try:
        # O_EXCL: two first runs racing each other cannot both write a token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _read(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Someone loosened it (a copy, an umask); tighten it rather than serve with a readable secret.
        path.chmod(0o600)
    token = path.read_text().strip()
    if len(token) < 16:
        raise InvalidArgument(
            f"the token in {path} is empty or too short", hint=f"delete {path}; a new one is made on the next start"
        )
    return token


def token_matches(expected: str, offered: str | None) -> bool:
    """Constant-time comparison, so response timing does not leak the token byte by byte."""
    return offered is not None and hmac.compare_digest(expected.encode(), offered.encode())
