"""What `corral up` and `corral mcp-config` share: where the servers listen.

`CORRAL_UP_HOST` / `CORRAL_UP_PORT` say where `corral up` listens, so that
`corral mcp-config --http` prints the URLs it will answer on. A running `corral up` also
leaves its URL in `$CORRAL_HOME/up.json` (`corral/probe.py`, removed when it stops), so
that `mcp-config --http` finds one started with `--port` without being told.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings
from corral.servers import SERVER_MODULES

__all__ = ["SERVER_MODULES", "UpSettings"]


class UpSettings(CoreSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    up_host: str = Field("127.0.0.1", description="address `corral up` listens on (loopback unless you mean it)")
    up_port: int = Field(8750, ge=0, le=65535, description="port `corral up` listens on (0: any free port)")

    def base_url(self, host: str | None = None, port: int | None = None) -> str:
        h = host or self.up_host
        return f"http://{'[' + h + ']' if ':' in h else h}:{port or self.up_port}"
