"""Core settings, read and validated once at the edge (the CLI) and passed down.

Each area keeps its own settings class beside its code (`servers/session/config.py`,
`servers/sandbox/config.py`, ...), all under the `CORRAL_` prefix; nothing below the
CLI reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "corral"


class CoreSettings(BaseSettings):
    """Settings every part shares."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    home: Path = Field(
        default_factory=default_home, description="data dir: session DB, sandboxes, vault files, audit log, token"
    )
    log_level: LogLevel = Field(
        "WARNING", description="log level of every command (DEBUG also shows the traceback of an unexpected error)"
    )
    stdio: Literal["pipes", "sdk"] = Field(
        "pipes",
        description="stdio transport of `corral serve`: ours over non-blocking pipes, or the SDK's (a thread hop per message)",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"not a log level: use {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")

    def data_dir(self) -> Path:
        """The data dir, created (mode 0700) on first use."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.home
