"""Session store settings (`CORRAL_SESSION_*`), read once at the edge."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings


class SessionSettings(CoreSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    session_store: str = Field(
        "",
        description="where the log lives: empty for the SQLite file $CORRAL_HOME/sessions.db, "
        "a path or sqlite:///PATH, or postgresql://USER@HOST/DB",
    )
    max_event_bytes: int = Field(1 << 20, gt=0, description="largest event (JSON-encoded data) the log accepts")
    sqlite_synchronous: str = Field(
        "NORMAL",
        pattern="^(NORMAL|FULL)$",
        description="SQLite synchronous mode: NORMAL survives process crashes (WAL), FULL also power loss",
    )

    def store_url(self) -> str:
        return self.session_store or f"sqlite:///{self.data_dir() / 'sessions.db'}"

    def open_store(self):
        """The configured store (SQLite options apply only to SQLite)."""
        from corral.servers.session.store import open_store

        url = self.store_url()
        options = {} if url.startswith(("postgresql://", "postgres://")) else {"synchronous": self.sqlite_synchronous}
        return open_store(url, max_event_bytes=self.max_event_bytes, **options)
