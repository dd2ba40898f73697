"""The audit log: one JSON line per use of a credential, appended, never rewritten."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from corral.vault.redact import Redactor

__all__ = ["AuditLog"]


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, redactor: Redactor, **fields) -> None:
        """Append one line; the line goes through the redactor like everything else that leaves."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields}
        line = redactor.text(json.dumps(record, default=str, ensure_ascii=False)) + "\n"
        # O_APPEND: concurrent writers (several proxy processes) never overwrite each other's lines.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def monotonic_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 2)
