"""Vault and credential-proxy settings, read once at the edge (the CLI) and passed down."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from corral.config import CoreSettings

ROOT_GIT_SOCKET = Path("/run/corral-git/git.sock")


class VaultSettings(CoreSettings):
    """`CORRAL_*` settings of the vault (`corral vault ...`) and the proxy (`corral serve credentials`);
    `home` (the vault lives in $CORRAL_HOME/vault) and the rest of the core come from `CoreSettings`."""

    vault_backend: str = Field(
        "auto",
        description="keyring backend: auto (OS keyring, else our encrypted file), os, encrypted-file, "
        "or an insecure one only by name: plaintext, null, or a keyring backend class path",
    )
    keyring_timeout_s: float = Field(5.0, gt=0, le=120, description="deadline of every keyring call")
    proxy_max_request_bytes: int = Field(1 << 20, gt=0, description="largest request body http_request accepts")
    proxy_max_response_bytes: int = Field(
        1 << 20, gt=0, description="response body bytes returned; the rest is counted, not returned"
    )
    proxy_drain_bytes: int = Field(
        16 << 20, gt=0, description="response bytes read at most (to count totals) before giving up"
    )
    proxy_timeout_s: float = Field(30.0, gt=0, le=600, description="default upstream timeout of http_request")
    git_socket: Path | None = Field(None, description="unix socket of the git gateway (default: see git_socket_path)")
    git_grant_ttl_s: int = Field(900, gt=0, le=86400, description="default lifetime of a git capability")

    def git_socket_path(self) -> Path:
        """The git gateway's socket; sandboxes mount its directory at /run/corral.

        As root the sandboxes run as an unprivileged uid that cannot traverse $CORRAL_HOME,
        so the default is then /run/corral-git/git.sock (the gateway makes that dir 0711).
        """
        if self.git_socket is not None:
            return self.git_socket
        if os.geteuid() == 0:
            return ROOT_GIT_SOCKET
        return self.vault_dir() / "run" / "git.sock"

    def vault_dir(self) -> Path:
        """$CORRAL_HOME/vault, created mode 0700."""
        path = self.home / "vault"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path
