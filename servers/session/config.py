"""Session store settings (`CORRAL_SESSION_*`), read once at the edge."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings
from corral.errors import Unavailable
from corral.servers.session.store import DEFAULT_MAX_EVENT_BYTES, EventStore

__all__ = ["SessionSettings", "open_store"]


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

    def open_store(self) -> EventStore:
        """The configured store (SQLite options apply only to SQLite)."""
        url = self.store_url()
        options = {} if url.startswith(("postgresql://", "postgres://")) else {"synchronous": self.sqlite_synchronous}
        return open_store(url, max_event_bytes=self.max_event_bytes, **options)


def open_store(url: str, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, **options: Any) -> EventStore:
    """The store at `url`: `sqlite:///PATH`, a plain path, or `postgresql://...`.

    The factory lives here, beside the settings that choose it, so the interface
    (`store.py`) never imports its implementations.
    """
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from corral.servers.session.postgres import PostgresEventStore
        except ModuleNotFoundError as err:
            raise Unavailable(
                f"the PostgreSQL store needs {err.name}, which is not installed", hint="pip install 'corral[postgres]'"
            ) from err
        return PostgresEventStore(url, max_event_bytes=max_event_bytes, **options)
    from corral.servers.session.sqlite import SQLiteEventStore

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite://")
    return SQLiteEventStore(path, max_event_bytes=max_event_bytes, **options)
