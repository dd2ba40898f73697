"""What `corral up` and `corral mcp-config` share: where the servers listen.

`CORRAL_UP_HOST` / `CORRAL_UP_PORT` say where `corral up` listens, so that
`corral mcp-config --http` prints the URLs it will answer on. A running `corral up` also
leaves its URL in `$CORRAL_HOME/up.json` (removed when it stops), so that
`mcp-config --http` finds one started with `--port` without being told.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings
from corral.servers import SERVER_MODULES

__all__ = ["SERVER_MODULES", "UpSettings", "clear_state", "running_base", "write_state"]

STATE_FILE = "up.json"

class UpSettings(CoreSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    up_host: str = Field("127.0.0.1", description="address `corral up` listens on (loopback unless you mean it)")
    up_port: int = Field(8750, ge=0, le=65535, description="port `corral up` listens on (0: any free port)")

    def base_url(self, host: str | None = None, port: int | None = None) -> str:
        h = host or self.up_host
        return f"http://{'[' + h + ']' if ':' in h else h}:{port or self.up_port}"



def write_state(home: Path, base: str) -> None:
    (home / STATE_FILE).write_text(json.dumps({"url": base, "pid": os.getpid()}) + "\n", encoding="utf-8")


def clear_state(home: Path) -> None:
    path = home / STATE_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():  # ours, not a later run's
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def running_base(home: Path) -> str | None:
    """The URL of the `corral up` running on this data dir, if its process is alive."""
    try:
        state = json.loads((home / STATE_FILE).read_text(encoding="utf-8"))
        os.kill(int(state["pid"]), 0)
        return str(state["url"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
