"""Core settings, read and validated once at the edge (the CLI) and passed down.

Each area keeps its own settings class beside its code (`servers/session/config.py`,
`servers/sandbox/config.py`, ...), all under the `CORRAL_` prefix; nothing below the
CLI reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "corral"


class CoreSettings(BaseSettings):
    """Settings every part shares."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="data dir: session DB, sandboxes, vault files, audit log, token")
    log_level: str = Field("WARNING", description="log level of the servers (DEBUG, INFO, WARNING, ERROR)")
    stdio: Literal["pipes", "sdk"] = Field("pipes", description="stdio transport of `corral serve`: ours over non-blocking pipes, or the SDK's (a thread hop per message)")

    def data_dir(self) -> Path:
        """The data dir, created (mode 0700) on first use."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.home
