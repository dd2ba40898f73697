"""`corral serve sandbox`: the sandbox MCP server, a thin shell over `SandboxService`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from corral.errors import InvalidArgument, Unavailable
from corral.servers.mcp_shell import serve, tool

from .backend import Backend, Destroyed, FileListing, FileRead, FileWritten, SandboxInfo, SandboxList
from .checkpointing import CheckpointInfo, CheckpointList, Restored
from .config import BubblewrapConfig, DockerConfig, E2BConfig, SandboxSettings
from .processes import ProcessInfo, ProcessList, ProcessOutput, Signal
from .registry import Registry
from .service import Resources, SandboxService

__all__ = ["backend_config", "build_server", "make_backend", "run"]

SandboxId = Annotated[
    str | None,
    Field(description="the sandbox to use; omit it to use your default sandbox (provisioned on first use)"),
]
ReadSandboxId = Annotated[
    str | None,
    Field(
        description="the sandbox to read; omit it for your default sandbox (a read never provisions it: not_found until one exists)"
    ),
]


def backend_config(settings: SandboxSettings) -> BubblewrapConfig | DockerConfig | E2BConfig:
    """The backend config the settings describe (the tagged union `make_backend` takes)."""
    if settings.sandbox_backend == "docker":
        return DockerConfig(image=settings.sandbox_image or "python:3.12-slim")
    if settings.sandbox_backend == "e2b":
        return E2BConfig(
            template=settings.sandbox_image or None, api_key=settings.e2b_api_key, max_ttl_s=settings.e2b_max_ttl_s
        )
    return BubblewrapConfig(
        root=settings.workspaces_dir(),
        run_as_uid=settings.sandbox_run_as_uid,
        extra_binds=list(settings.sandbox_extra_binds),
        templates=settings.templates_dir(),
        fast_enter=settings.sandbox_fast_enter,
        system_layer=settings.sandbox_system_layer,
    )


def make_backend(config: BubblewrapConfig | DockerConfig | E2BConfig, **kwargs: Any) -> Backend:
    """The backend for `config`; its module (and SDK) is imported only now."""
    if config.type == "bubblewrap":
        from .bubblewrap import BubblewrapBackend

        return BubblewrapBackend(config, **kwargs)
    if config.type == "docker":
        from .docker import DockerBackend

        return DockerBackend(config, **kwargs)
    try:
        from .e2b import E2BBackend
    except ModuleNotFoundError as err:
        raise Unavailable(
            f"the e2b backend needs {err.name}, which is not installed", hint="pip install 'corral[e2b]'"
        ) from err
    return E2BBackend(config, **kwargs)


ProcessId = Annotated[str, Field(description="a process_id from execute(background=true) or processes")]

CLIENT_META_KEY = "corral/client"
CHECKPOINT_META_KEY = "corral/checkpoint"


def _client(ctx: Context, fallback: str = "") -> str:
    """Whose default sandbox a call without `sandbox_id` uses.

    MCP 2026-07-28 is stateless: no connection object outlives a request. A client that
    wants its own default sends `_meta: {"corral/client": ID}` (or the `X-Corral-Client`
    header, or keeps an `Mcp-Session-Id`); everyone else shares the server's default
    (stdio serves exactly one client anyway), or the key the operator set for it (`fallback`:
    `CORRAL_SANDBOX_CLIENT_KEY`, the same default as that key sent by header).
    """
    meta: Mapping[str, Any] = ctx.request_context.meta or {}  # the SDK's TypedDict knows only its own keys
    client = meta.get(CLIENT_META_KEY)
    if isinstance(client, str) and client:
        return f"meta:{client}"
    headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
    for header in ("x-corral-client", "mcp-session-id"):
        if headers.get(header):
            return f"{header}:{headers[header]}"
    return f"x-corral-client:{fallback}" if fallback else "default"


def _checkpoint(ctx: Context) -> str | None:
    """The checkpoint the caller's log says its default sandbox holds (`_meta corral/checkpoint`)."""
    meta: Mapping[str, Any] = ctx.request_context.meta or {}
    value = meta.get(CHECKPOINT_META_KEY)
    return value if isinstance(value, str) and value.startswith("ckpt_") and len(value) < 100 else None


async def _resolve(service: SandboxService, ctx: Context, sandbox_id: str | None, *, create: bool = True) -> Any:
    client = _client(ctx, service.settings.sandbox_client_key)
    return await service.resolve(sandbox_id, client, create=create, checkpoint=_checkpoint(ctx))


def build_server(
    settings: SandboxSettings, backend: Backend | None = None, *, reap: bool = True
) -> tuple[MCPServer, SandboxService]:
    """The server and the service behind it; `backend` overrides the one `settings` names."""
    backend = backend or make_backend(backend_config(settings))
    registry = Registry(settings.sandboxes_dir() / f"registry-{backend.name}.db")
    store = settings.open_checkpoints()
    service = SandboxService(backend, registry, settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        async with service.running(reap=reap):
            yield None

    server = MCPServer(
        "corral-sandbox",
        instructions=(
            f"Isolated Linux sandboxes to run code in ({service.backend.isolation}): each has its own filesystem "
            f"(work in {service.backend.workdir}; files persist between calls) and processes that keep running "
            "between calls; no network unless provisioned with network 'full'; no host files, host environment "
            "or secrets inside. Omit sandbox_id to use your default sandbox; a sandbox_lost error means the "
            "sandbox is gone: call again (or provision) for a fresh one."
        ),
        lifespan=lifespan,
        log_level=settings.log_level.upper(),  # type: ignore[arg-type]
    )
    _register_tools(server, service)
    _register_process_tools(server, service)
    _register_checkpoint_tools(server, service)
    return server, service


def _register_tools(server: MCPServer, service: SandboxService) -> None:
    @tool(server, open_world=True)
    async def provision(
        template: Annotated[
            str | None,
            Field(
                description="docker image, e2b template, or a bubblewrap template the operator registered (by name); default from the server"
            ),
        ] = None,
        resources: Annotated[
            Resources | None,
            Field(
                description="cpus, memory_mb, disk_mb, ttl_s, idle_timeout_s: each at most the server's limit (the default)"
            ),
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="environment variables of every command")] = None,
        network: Annotated[Literal["none", "full"], Field(description="'none' (default): no network at all")] = "none",
        label: Annotated[str | None, Field(description="a name for humans", max_length=200)] = None,
        idempotency_key: Annotated[
            str | None, Field(description="provisioning twice with one key returns the same sandbox", max_length=200)
        ] = None,
    ) -> SandboxInfo:
        """Create a fresh sandbox; returns its sandbox_id, isolation, workdir and expiry."""
        return await service.provision(
            template=template,
            resources=resources,
            env=env,
            network=network,
            label=label,
            idempotency_key=idempotency_key,
        )

    cap_kib = service.settings.sandbox_output_limit // 1024
    execute_description = (
        f"Run a bash command in an isolated Linux sandbox ({service.backend.isolation}), in {service.backend.workdir} "
        "unless cwd says otherwise. Files persist between calls and background processes keep running; there is "
        "no network unless the sandbox was provisioned with network 'full', and no host files or secrets. "
        f"Returns exit_code, stdout and stderr (each capped at {cap_kib} KiB, head and tail kept, with byte totals), "
        "duration_ms and timed_out; timeout_s (default 60) kills the command and everything it started. "
        "With background=true it returns at once with a process_id and keeps running: read it with "
        "process_output, stop it with kill_process."
    )

    @tool(server, destructive=True, open_world=True, description=execute_description)
    async def execute(
        ctx: Context,
        command: Annotated[str, Field(description="a bash command line, run in the workdir", min_length=1)],
        sandbox_id: SandboxId = None,
        timeout_s: Annotated[
            float, Field(description="kill the command (all its processes) after this", gt=0, le=3600)
        ] = 60,
        cwd: Annotated[str | None, Field(description="working directory; relative to the workdir")] = None,
        env: Annotated[dict[str, str] | None, Field(description="extra environment variables")] = None,
        stdin: Annotated[str | None, Field(description="text fed to the command's stdin")] = None,
        background: Annotated[
            bool, Field(description="start it and return at once with a process_id (no timeout); see process_output")
        ] = False,
    ) -> dict[str, Any]:  # two shapes (below): an object schema, not a wrapped union
        """Run a shell command; returns exit_code, stdout, stderr (head and tail kept), duration and timed_out.

        With background=true it keeps running after the call: read it with process_output, stop it with kill_process."""
        if background and stdin is not None:
            raise InvalidArgument("stdin cannot be given to a background process", hint="write a file and redirect it")
        record = await _resolve(service, ctx, sandbox_id)
        if background:
            return (await service.start_process(record, command, cwd=cwd, env=env)).model_dump()  # a ProcessInfo

        async def progress(elapsed: float, message: str) -> None:
            await ctx.report_progress(elapsed, timeout_s, message)

        done = await service.execute(
            record, command, timeout_s=timeout_s, cwd=cwd, env=env, stdin=stdin, progress=progress
        )
        return done.model_dump()  # an ExecOutcome

    @tool(server, read_only=True)
    async def read_file(
        ctx: Context,
        path: Annotated[str, Field(description="file path, relative to the workdir (or absolute under it)")],
        sandbox_id: ReadSandboxId = None,
        offset: Annotated[int, Field(description="first byte to return", ge=0)] = 0,
        limit: Annotated[int | None, Field(description="most bytes to return", ge=0)] = None,
        encoding: Annotated[Literal["text", "base64"], Field(description="'base64' for binary files")] = "text",
    ) -> FileRead:
        """Read a file; returns content, size and sha256 (of the whole file, for if_sha256)."""
        record = await _resolve(service, ctx, sandbox_id, create=False)
        return await service.read_file(record, path, offset=offset, limit=limit, encoding=encoding)

    @tool(server, destructive=True)
    async def write_file(
        ctx: Context,
        path: Annotated[str, Field(description="file path, relative to the workdir; parent dirs are created")],
        content: Annotated[str, Field(description="the new content (text, or base64 with encoding='base64')")],
        sandbox_id: SandboxId = None,
        encoding: Annotated[Literal["text", "base64"], Field(description="how content is encoded")] = "text",
        mode: Annotated[
            str | None, Field(description="octal permission bits, e.g. '0755'", pattern=r"^0?[0-7]{3,4}$")
        ] = None,
        if_sha256: Annotated[
            str | None,
            Field(
                description="write only if the file's current sha256 is this (compare-and-swap)",
                pattern=r"^[0-9a-fA-F]{64}$",
            ),
        ] = None,
    ) -> FileWritten:
        """Create or replace a file atomically; returns its size and sha256."""
        record = await _resolve(service, ctx, sandbox_id)
        return await service.write_file(record, path, content, encoding=encoding, mode=mode, if_sha256=if_sha256)

    @tool(server, read_only=True)
    async def list_files(
        ctx: Context,
        path: Annotated[str | None, Field(description="directory to list; default the workdir")] = None,
        sandbox_id: ReadSandboxId = None,
        depth: Annotated[
            int, Field(description="1 lists the directory itself, 2 also its subdirectories, ...", ge=1, le=20)
        ] = 1,
        max_entries: Annotated[int, Field(description="stop after this many entries", ge=1, le=100_000)] = 1000,
    ) -> FileListing:
        """List a directory; returns entries (name, type, size) and whether max_entries cut it short."""
        record = await _resolve(service, ctx, sandbox_id, create=False)
        return await service.list_files(record, path, depth=depth, max_entries=max_entries)

    @tool(server, destructive=True, idempotent=True)
    async def destroy(
        sandbox_id: Annotated[str, Field(description="the sandbox to destroy")],
        keep_workspace: Annotated[bool, Field(description="keep the workspace files on the host (bubblewrap)")] = False,
    ) -> Destroyed:
        """Destroy a sandbox and everything it runs or holds."""
        return await service.destroy(sandbox_id, keep_workspace=keep_workspace)

    @tool(server, read_only=True)
    async def list_sandboxes(
        cursor: Annotated[str | None, Field(description="next_cursor of the previous page; omit for the first")] = None,
        limit: Annotated[int, Field(description="most sandboxes in this page", ge=1, le=1000)] = 100,
    ) -> SandboxList:
        """List this server's live sandboxes, oldest first: id, backend, state, created and expiry times."""
        return service.list_sandboxes(cursor, limit)


def _register_process_tools(server: MCPServer, service: SandboxService) -> None:
    @tool(server, read_only=True)
    async def processes(ctx: Context, sandbox_id: SandboxId = None) -> ProcessList:
        """List the sandbox's background processes: process_id, command, state, exit_code, started, cpu seconds."""
        record = await _resolve(service, ctx, sandbox_id)
        return ProcessList(sandbox_id=record.id, processes=await service.processes(record))

    @tool(server, read_only=True)
    async def process_output(
        process_id: ProcessId,
        offset: Annotated[
            int, Field(description="first stdout byte to return (next_offset of the last call)", ge=0)
        ] = 0,
        stderr_offset: Annotated[int, Field(description="first stderr byte to return", ge=0)] = 0,
        limit: Annotated[int | None, Field(description="most bytes to return per stream", ge=1)] = None,
    ) -> ProcessOutput:
        """What a background process wrote since the offsets; running, exit_code and byte totals."""
        return await service.process_output(process_id, offset=offset, stderr_offset=stderr_offset, limit=limit)

    @tool(server, destructive=True)
    async def kill_process(
        process_id: ProcessId,
        signal: Annotated[Signal, Field(description="the signal to send to its process group")] = "TERM",
    ) -> ProcessInfo:
        """Signal a background process (and what it started); returns its state after."""
        return await service.kill_process(process_id, signal)


def _checkpointer(service: SandboxService) -> Any:
    if service.checkpoints is None:
        raise InvalidArgument(
            "checkpoints are off on this server (CORRAL_CHECKPOINT_STORE=off)", hint="ask the operator to turn them on"
        )
    return service.checkpoints


def _register_checkpoint_tools(server: MCPServer, service: SandboxService) -> None:
    @tool(server)
    async def checkpoint(
        ctx: Context,
        sandbox_id: SandboxId = None,
        label: Annotated[str | None, Field(description="a name for humans", max_length=200)] = None,
    ) -> CheckpointInfo:
        """Capture the sandbox's files (workspace, home, installed software) as a checkpoint to restore later.

        Incremental: only what changed since its last checkpoint is read and stored. Running
        processes are not part of a checkpoint."""
        record = await _resolve(service, ctx, sandbox_id)
        return await _checkpointer(service).checkpoint(record, label)

    @tool(server, read_only=True)
    async def list_checkpoints(ctx: Context, sandbox_id: ReadSandboxId = None) -> CheckpointList:
        """List a sandbox's checkpoints, oldest first: id, label, created, files, bytes added."""
        checkpointer = _checkpointer(service)
        if sandbox_id is not None and (known := service.registry.get(sandbox_id)) is not None:
            if known.backend == service.backend.name:  # a destroyed sandbox's checkpoints are still listed
                return await checkpointer.list(known)
        return await checkpointer.list(await _resolve(service, ctx, sandbox_id, create=False))

    @tool(server, destructive=True)
    async def restore(
        checkpoint_id: Annotated[str, Field(description="a checkpoint_id from checkpoint or list_checkpoints")],
        in_place: Annotated[
            bool,
            Field(
                description="roll the checkpoint's own sandbox back (its processes are stopped) instead of a new one"
            ),
        ] = False,
    ) -> Restored:
        """Give a sandbox exactly a checkpoint's files: a new sandbox (default), or the same one rolled back.

        Processes are not restored: a new sandbox starts with none; in place, they are stopped."""
        return await _checkpointer(service).restore(checkpoint_id, in_place=in_place)


def run(http: str | None = None, token: str | None = None, stdio: str = "pipes") -> None:
    settings = SandboxSettings()
    server, _ = build_server(settings)
    serve(server, http, token=token, stdio=stdio)
