"""Sandbox server settings (`CORRAL_SANDBOX_*`), read once at the edge and passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from corral.config import CoreSettings

from .backend import SandboxSpec

if TYPE_CHECKING:
    from .checkpoints import CheckpointStore

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

    @classmethod
    def parse(cls, spec: str) -> list[ExtraBind]:
        """`HOST:SANDBOX[:rw],...` -> binds; a bad entry is a ValueError naming the setting."""
        binds = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            source, _, rest = item.partition(":")
            dest, _, flag = rest.partition(":")
            if not source.startswith("/") or not dest.startswith("/") or flag not in ("", "rw", "ro"):
                raise ValueError(
                    f"bad CORRAL_SANDBOX_EXTRA_BINDS entry {item!r}; expected /host/path:/sandbox/path[:rw]"
                )
            binds.append(cls(source=Path(source), dest=dest, writable=flag == "rw"))
        return binds


class BubblewrapConfig(_Model):
    type: Literal["bubblewrap"] = "bubblewrap"
    root: Path = Field(description="where sandbox directories live")
    run_as_uid: int | None = Field(None, description="host uid for sandboxes when the server is root (never root)")
    extra_binds: list[ExtraBind] = Field(default_factory=list)
    bwrap: str = "bwrap"
    cgroups: bool = Field(
        True, description="one cgroup per sandbox (memory, pids, cpu for all its processes) where the server can"
    )
    fast_enter: bool = Field(True, description="enter sandboxes through corral-enter where a C compiler builds it")
    templates: Path | None = Field(
        None, description="where registered templates (root filesystems) live; None: no templates"
    )
    system_layer: bool = Field(
        True,
        description="as root: the default sandbox's system (/usr, /etc, ...) is a writable copy-on-write layer "
        "over the host's (id-mapped mounts); else read-only",
    )


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
    max_ttl_s: int = Field(
        3600, gt=0, description="longest sandbox lifetime the E2B tier allows; longer TTLs are clamped"
    )


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
    sandbox_cpus: float = Field(
        1.0, gt=0, description="CPUs per sandbox (docker, e2b): the default and the most a client may ask"
    )
    sandbox_memory_mb: int = Field(
        1024,
        gt=0,
        description="memory per sandbox, the default and the most a client may ask; bubblewrap: address-space limit per process",
    )
    sandbox_disk_mb: int = Field(
        1024,
        gt=0,
        description="largest file a command may write (RLIMIT_FSIZE): the default and the most a client may ask",
    )
    sandbox_max_processes: int = Field(
        256, gt=0, description="processes/threads a sandbox may run at once (RLIMIT_NPROC)"
    )
    sandbox_ttl_s: int = Field(
        24 * 3600, gt=0, description="lifetime of a sandbox: the default and the most a client may ask"
    )
    sandbox_idle_timeout_s: int = Field(
        3600, gt=0, description="idle time after which a sandbox is reaped: the default and the most a client may ask"
    )
    sandbox_reap_interval_s: float = Field(
        30.0, gt=0, description="how often the server looks for idle/expired sandboxes"
    )
    sandbox_tombstone_retention_s: float = Field(
        7 * 86400,
        ge=0,
        description="how long a destroyed sandbox's id keeps answering sandbox_lost (not not_found); "
        "a week covers a session woken after a weekend",
    )
    sandbox_progress_interval_s: float = Field(5.0, gt=0, description="how often a long execute reports progress")
    sandbox_output_limit: int = Field(
        64 * 1024, ge=1024, description="bytes kept per output stream (half head, half tail)"
    )
    sandbox_read_limit: int = Field(1 << 20, gt=0, description="bytes read_file returns when no limit is given")
    sandbox_max_file_bytes: int = Field(
        64 << 20, gt=0, description="largest read_file slice / write_file content; larger files get no sha256"
    )
    sandbox_file_timeout_s: float = Field(
        30.0, gt=0, description="deadline of one read_file/write_file/list_files (a timeout error past it)"
    )
    sandbox_file_concurrency: int = Field(
        2, ge=1, description="file operations one sandbox may run at once (the rest wait; other sandboxes do not)"
    )
    sandbox_run_as_uid: int = Field(
        65534, ge=1, description="bubblewrap, when the server runs as root: host uid the sandboxes run as (never root)"
    )
    sandbox_dir: Path | None = Field(
        None,
        description="where bubblewrap sandbox directories live; default $CORRAL_HOME/sandboxes, "
        "or /var/lib/corral/sandboxes when the server runs as root (the sandbox uid must traverse it)",
    )
    sandbox_templates_dir: Path | None = Field(
        None,
        description="bubblewrap: where `corral sandbox templates add` unpacks templates (root filesystems); "
        "default $CORRAL_HOME/templates, or /var/lib/corral/templates when run as root (the sandbox uid must traverse it)",
    )
    sandbox_system_layer: bool = Field(
        True,
        description="bubblewrap, when the server runs as root: give each default sandbox a writable copy-on-write "
        "system (/usr, /etc, /var, ...) over the host's, discarded on destroy; false: a read-only system",
    )
    sandbox_extra_binds: Annotated[list[ExtraBind], NoDecode] = Field(
        default_factory=list,
        description="bubblewrap: host paths (dirs, files, unix sockets) mounted into every sandbox, "
        "comma-separated HOST:SANDBOX[:rw], read-only unless :rw (e.g. the credential proxy's git socket)",
    )
    sandbox_client_key: str = Field(
        "",
        max_length=200,
        description="the default sandbox's key for clients that send none (a stdio server serves one client): "
        "`corral mcp-config --workspace-key KEY` sets it per project; empty: one default sandbox per CORRAL_HOME",
    )
    sandbox_fast_enter: bool = Field(
        True,
        description="bubblewrap: build a small C helper (corral-enter, with the machine's `cc`) that enters a live "
        "sandbox in one exec; without a compiler, or off, commands enter through nsenter, setpriv, env and prlimit",
    )
    checkpoint_store: str = Field(
        "",
        description="where checkpoints (workspace snapshots) live: empty for the session store's database when "
        "CORRAL_SESSION_STORE is postgresql:// (every host sharing the log can restore them: a session moved to "
        "another host continues with its files), else $CORRAL_HOME/sandboxes/checkpoints (this host); 'local' for "
        "this host's even then, a directory, postgresql://USER@HOST/DB for another database, or 'off' for none",
    )
    session_store: str = Field(
        "", description="the session log's store (see Session log): a postgresql:// one also holds the checkpoints"
    )
    checkpoint_max_mb: int = Field(
        10240,
        gt=0,
        description="storage cap of the checkpoint store (blobs and manifests; a PostgreSQL store: its total over "
        "every host): past it, checkpoint refuses",
    )
    checkpoint_max_files: int = Field(
        200_000, gt=0, description="most files (and dirs) one checkpoint captures: past it, checkpoint refuses"
    )
    checkpoint_retention_s: float = Field(
        30 * 86400,
        ge=0,
        description="checkpoints of a sandbox no longer running are deleted this long after its last one "
        "(forks of older positions then start with a fresh sandbox)",
    )
    e2b_api_key: str = Field("", validation_alias="E2B_API_KEY", description="E2B API key (e2b backend)")
    e2b_max_ttl_s: int = Field(
        3600,
        gt=0,
        description="e2b: longest sandbox lifetime your E2B tier allows (3600 Hobby, 86400 Pro); "
        "longer TTLs are clamped to it",
    )

    @field_validator("sandbox_extra_binds", mode="before")
    @classmethod
    def _parse_binds(cls, value: object) -> object:
        return ExtraBind.parse(value) if isinstance(value, str) else value

    def spec(
        self, *, template: str | None = None, env: dict[str, str] | None = None, network: str = "none"
    ) -> SandboxSpec:
        """The recipe of a sandbox with the operator's limits (the only place they come from)."""
        return SandboxSpec(
            template=template or self.sandbox_image or None,
            cpus=self.sandbox_cpus,
            memory_mb=self.sandbox_memory_mb,
            disk_mb=self.sandbox_disk_mb,
            max_processes=self.sandbox_max_processes,
            env=dict(env or {}),
            network=network,
            ttl_s=self.sandbox_ttl_s,
        )

    def checkpoint_store_url(self) -> str:
        """The checkpoint store to open (`checkpoints.open_store`): the setting, else a PostgreSQL
        session store's database, else this host's ('')."""
        if self.checkpoint_store:
            return self.checkpoint_store
        return self.session_store if self.session_store.startswith(("postgresql://", "postgres://")) else ""

    def open_checkpoints(self) -> CheckpointStore | None:
        """The configured checkpoint store (None: off); the server and `corral sessions diff` open the same."""
        from .checkpoints import open_store

        return open_store(self.checkpoint_store_url(), self.sandboxes_dir(), self.checkpoint_max_mb << 20)

    def sandboxes_dir(self) -> Path:
        """Where the registry lives: always in the data dir."""
        path = self.data_dir() / "sandboxes"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def templates_dir(self) -> Path:
        if self.sandbox_templates_dir is not None:
            return self.sandbox_templates_dir
        if os.geteuid() == 0:
            return Path("/var/lib/corral/templates")
        return self.data_dir() / "templates"

    def workspaces_dir(self) -> Path:
        if self.sandbox_dir is not None:
            return self.sandbox_dir
        if os.geteuid() == 0:
            return Path("/var/lib/corral/sandboxes")
        return self.sandboxes_dir()
