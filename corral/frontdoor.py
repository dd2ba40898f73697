"""What `corral up` and `corral mcp-config` share: where the servers listen, which exist.

`CORRAL_UP_HOST` / `CORRAL_UP_PORT` say where `corral up` listens, so that
`corral mcp-config --http` prints the URLs it will answer on.
"""

from __future__ import annotations

import importlib.util

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings

__all__ = ["SERVER_MODULES", "UpSettings", "available", "missing"]

# The three servers, in the order they are listed and started.
SERVER_MODULES = {
    "session": "corral.servers.session.server",
    "sandbox": "corral.servers.sandbox.server",
    "credentials": "corral.servers.credentials.server",
}


class UpSettings(CoreSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    up_host: str = Field("127.0.0.1", description="address `corral up` listens on (loopback unless you mean it)")
    up_port: int = Field(8750, ge=1, le=65535, description="port `corral up` listens on")

    def base_url(self, host: str | None = None, port: int | None = None) -> str:
        h = host or self.up_host
        return f"http://{'[' + h + ']' if ':' in h else h}:{port or self.up_port}"


def available() -> list[str]:
    """Servers whose module is installed (the others are still being built)."""
    return [name for name, module in SERVER_MODULES.items() if importlib.util.find_spec(module) is not None]


def missing() -> list[str]:
    have = set(available())
    return [name for name in SERVER_MODULES if name not in have]
