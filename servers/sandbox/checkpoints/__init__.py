"""Workspace checkpoints: manifests (`manifest.py`), capture and restore of host trees
(`tree.py`), and the stores that keep them (`store.py`: on this host `local.py`, shared
between hosts `postgres.py`)."""

from __future__ import annotations

from pathlib import Path

from corral.errors import Unavailable

from .store import CheckpointRecord, CheckpointStore

__all__ = ["CheckpointRecord", "CheckpointStore", "open_store"]


def open_store(url: str, home: Path, cap_bytes: int) -> CheckpointStore | None:
    """The store `url` names: '' or 'local' for `home/checkpoints`, a directory, 'off' for none,
    or `postgresql://...`."""
    if url == "off":
        return None
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresCheckpointStore
        except ModuleNotFoundError as err:
            raise Unavailable(
                f"the PostgreSQL checkpoint store needs {err.name}, which is not installed",
                hint="pip install 'corral[postgres]'",
            ) from err
        return PostgresCheckpointStore(url, cap_bytes, staging=home / "checkpoints-staging")
    from .local import LocalCheckpointStore

    return LocalCheckpointStore(Path(url) if url not in ("", "local") else home / "checkpoints", cap_bytes)
