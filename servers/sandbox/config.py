"""Sandbox server settings (`CORRAL_SANDBOX_*`), read once at the edge and passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from corral.config import CoreSettings

__all__ = ["BackendConfig", "BubblewrapConfig", "DockerConfig", "E2BConfig", "ExtraBind", "SandboxSettings"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- the tagged backend config ---------------------------------------------------------


class ExtraBind(_Model):
    """A host path (directory, file or unix socket) mounted into every bubblewrap sandbox.

    Server-side only (never a tool parameter): e.g. the credential proxy's socket, so a
    sandbox can reach the proxy without any secret entering it.
    """

    source: Path
    dest: str
    writable: bool = False


class BubblewrapConfig(_Model):
    type: Literal["bubblewrap"] = "bubblewrap"
    root: Path = Field(description="where sandbox directories live")
    run_as_uid: int | None = Field(None, description="host uid for sandboxes when the server is root (never root)")
    extra_binds: list[ExtraBind] = Field(default_factory=list)
    bwrap: str = "bwrap"


class DockerConfig(_Model):
    type: Literal["docker"] = "docker"
    image: str = "python:3.12-slim"
    docker: str = Field("docker", description="the docker CLI")
    label: str = "corral.sandbox"


class E2BConfig(_Model):
    type: Literal["e2b"] = "e2b"
    template: str | None = None
    api_key: str = ""
    request_timeout_s: float = 30.0
    max_ttl_s: int = Field(3600, gt=0, description="longest sandbox lifetime the E2B tier allows; longer TTLs are clamped")


BackendConfig = Annotated[BubblewrapConfig | DockerConfig | E2BConfig, Field(discriminator="type")]


# -- settings ------------------------------------------------------------------------


class SandboxSettings(CoreSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore", populate_by_name=True)

    sandbox_backend: Literal["bubblewrap", "docker", "e2b"] = Field(
        "bubblewrap", description="where sandboxes run: bubblewrap (namespaces), docker (containers) or e2b (microVMs)"
    )
    sandbox_image: str = Field(
        "", description="docker image or e2b template; empty: python:3.12-slim for docker, the e2b default template"
    )
    sandbox_cpus: float = Field(1.0, gt=0, description="default CPUs per sandbox (docker, e2b)")
    sandbox_memory_mb: int = Field(1024, gt=0, description="default memory per sandbox; bubblewrap: address-space limit per process")
    sandbox_disk_mb: int = Field(1024, gt=0, description="default largest file a command may write (RLIMIT_FSIZE)")
    sandbox_max_processes: int = Field(256, gt=0, description="processes/threads a sandbox may run at once (RLIMIT_NPROC)")
    sandbox_ttl_s: int = Field(24 * 3600, gt=0, description="default lifetime of a sandbox")
    sandbox_idle_timeout_s: int = Field(3600, gt=0, description="default idle time after which a sandbox is reaped")
    sandbox_reap_interval_s: float = Field(30.0, gt=0, description="how often the server looks for idle/expired sandboxes")
    sandbox_progress_interval_s: float = Field(5.0, gt=0, description="how often a long execute reports progress")
    sandbox_output_limit: int = Field(64 * 1024, ge=1024, description="bytes kept per output stream (half head, half tail)")
    sandbox_read_limit: int = Field(1 << 20, gt=0, description="bytes read_file returns when no limit is given")
    sandbox_max_file_bytes: int = Field(64 << 20, gt=0, description="largest read_file slice / write_file content")
    sandbox_run_as_uid: int = Field(
        65534, ge=1, description="bubblewrap, when the server runs as root: host uid the sandboxes run as (never root)"
    )
    sandbox_dir: Path | None = Field(
        None,
        description="where bubblewrap sandbox directories live; default $CORRAL_HOME/sandboxes, "
        "or /var/lib/corral/sandboxes when the server runs as root (the sandbox uid must traverse it)",
    )
    sandbox_extra_binds: str = Field(
        "",
        description="bubblewrap: host paths (dirs, files, unix sockets) mounted into every sandbox, "
        "comma-separated HOST:SANDBOX[:rw], read-only unless :rw (e.g. the credential proxy's git socket)",
    )
    e2b_api_key: str = Field("", validation_alias="E2B_API_KEY", description="E2B API key (e2b backend)")
    e2b_max_ttl_s: int = Field(
        3600,
        gt=0,
        description="e2b: longest sandbox lifetime your E2B tier allows (3600 Hobby, 86400 Pro); "
        "longer TTLs are clamped to it",
    )

    def sandboxes_dir(self) -> Path:
        """Where the registry lives: always in the data dir."""
        path = self.data_dir() / "sandboxes"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def workspaces_dir(self) -> Path:
        if self.sandbox_dir is not None:
            return self.sandbox_dir
        if os.geteuid() == 0:
            return Path("/var/lib/corral/sandboxes")
        return self.sandboxes_dir()
