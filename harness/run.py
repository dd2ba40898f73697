"""Wiring: settings -> store, session log, MCP connections, model client, agent.

`corral run` and `corral wake` both come here; the only difference is whether a task
starts a new turn. Nothing here holds state the log does not have.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio

from corral.errors import CorralError, Unavailable
from corral.harness import events as E
from corral.harness.agent import Agent, AgentConfig
from corral.harness.checkpoints import Checkpointing, Checkpoints
from corral.harness.config import HarnessSettings
from corral.harness.events import KillAfterAppends, SessionLog, ev
from corral.harness.local import Subagents, TodoTools
from corral.harness.mcp import MCPTools
from corral.harness.model import AnthropicModel, ModelClient
from corral.harness.tools import CachedListing, Prefixed, Router, SandboxLifecycle, TimeLimited, Toolset, read_only
from corral.harness.view import View
from corral.servers.session import EventStore

SYSTEM = """\
You are an autonomous agent driven by Corral's reference harness. Your session id is {session_id}.
Tools are named <server>__<tool>:
- sandbox__*: run code and edit files in a disposable sandbox; one is created on first use. If a call
  says the sandbox is lost, provision a fresh one and redo what is needed.
- credentials__*: call external HTTP APIs with stored credentials that you never see; list_credentials
  shows what exists and where each may be used. A refusal tells you why.
- session__*: read this session's log (get_events, slice, rewind); use them to reread anything your
  context no longer shows.
Keep a plan with the todo tool for multi-step work. Use spawn_subagent for independent subtasks.
When the task is done, end your turn with a short summary of the result."""

SUBAGENT_SYSTEM = """\
You are a subagent driven by Corral's reference harness, working on one subtask for a parent agent.
Your session id is {session_id}. Tools are named <server>__<tool> (sandbox__*, credentials__*, session__*).
When done, end your turn with a short summary (a few lines) of what you did and found: the parent sees only that."""


@dataclass
class Outcome:
    session_id: str
    text: str


def open_harness_store(settings: HarnessSettings) -> EventStore:
    store = settings.open_store()
    return KillAfterAppends(store, settings.kill_after_appends) if settings.kill_after_appends else store  # type: ignore[return-value]


def mcp_toolsets(
    settings: HarnessSettings,
    tg: anyio.abc.TaskGroup,
    env: dict[str, str],
    errlog: TextIO | None,
    log: SessionLog,
    checkpoints: Checkpoints,
) -> list[Toolset]:
    out: list[Toolset] = []
    known = {e.data.get("sandbox_id") for e in log.tail if e.type == E.SANDBOX_PROVISIONED}

    def meta() -> dict[str, str]:  # the session's hands follow it, at the state its log names
        return {"corral/client": log.session_id, **checkpoints.meta()}

    for name, target in settings.server_targets().items():
        conn = MCPTools(
            name,
            target,
            task_group=tg,
            env=env,
            connect_timeout_s=settings.connect_timeout_s,
            errlog=errlog,
            token=settings.server_token,
            meta=meta,
        )
        # Each MCP call on its own clock: a checkpoint after a call never eats into the call's time.
        timed = TimeLimited(conn, settings.tool_timeout_s)
        # Any server listing a `checkpoint` tool is a sandbox server (Checkpointing asks its listing).
        toolset: Toolset = Prefixed(Checkpointing(timed, checkpoints), name)
        if name == "sandbox":
            toolset = SandboxLifecycle(toolset, known)
        if name == "session":
            toolset = read_only(toolset)  # the model reads its log; only the harness writes it (one writer)
        out.append(toolset)
    return out


async def run_session(
    settings: HarnessSettings,
    *,
    task: str | None,
    session_id: str | None,
    view: View,
    env: dict[str, str] | None = None,
    model: ModelClient | None = None,
    on_session: Callable[[str], None] | None = None,
    store: EventStore | None = None,
) -> Outcome:
    # `store`: a caller-owned store (the worker pool passes its leased one); else opened and closed here.
    first_send = anyio.Event()
    own_model = None
    if model is None:
        own_model = model = AnthropicModel(
            settings.anthropic_api_key,
            settings.anthropic_base_url,
            settings.model_timeout_s,
            first_send.set,
            idle_timeout_s=settings.model_idle_timeout_s,
        )
    if own_model is None:
        first_send.set()
    if own_model is not None:
        own_model.warm_up()  # overlaps reading the log
    owned = store is None
    store = open_harness_store(settings) if store is None else store
    try:
        log = (
            SessionLog.load(store, session_id)
            if session_id
            else SessionLog.create(store, metadata={"task": (task or "")[:200]})
        )
        view.session(log.session_id, resumed=session_id is not None)
        if on_session:
            on_session(log.session_id)
        return await _run(
            settings,
            store,
            log,
            model,
            task=task,
            resumed=session_id is not None,
            view=view,
            env=env,
            first_send=first_send,
        )
    finally:
        if own_model is not None:
            with anyio.CancelScope(shield=True):
                await own_model.aclose()
        if owned:
            store.close()


async def _run(
    settings: HarnessSettings,
    store: EventStore,
    log: SessionLog,
    model: ModelClient,
    *,
    task: str | None,
    resumed: bool,
    view: View,
    env: dict[str, str] | None,
    first_send: anyio.Event,
) -> Outcome:
    config = AgentConfig.of(settings)
    logs = settings.data_dir() / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "servers.log", "a", encoding="utf-8") as errlog, _first_error():
        async with anyio.create_task_group() as tg:
            checkpoints = Checkpoints.load(store, log.session_id, enabled=config.checkpoints == "each-call")
            connected = Router(
                mcp_toolsets(settings, tg, dict(env if env is not None else os.environ), errlog, log, checkpoints)
            )
            servers = CachedListing(connected, tools_cache(settings), tg, first_send)

            def make_child(child: SessionLog, label: str) -> Agent:
                return Agent(
                    child,
                    model,
                    Router([servers, TodoTools()]),
                    config,
                    view.child(label),
                    SUBAGENT_SYSTEM.format(session_id=child.session_id),
                )

            tools = Router(
                [servers, TodoTools(), Subagents(log, make_child, settings.subagent_summary_chars, checkpoints)]
            )
            agent = Agent(log, model, tools, config, view, SYSTEM.format(session_id=log.session_id))
            if log.tools is not None:  # the first request uses the recorded tools; the servers connect behind it
                tg.start_soon(_connect_after, first_send, servers)
            if settings.eager_sandbox:
                provisioned = await tools.call("sandbox__provision", {})
                if provisioned.is_error:
                    raise Unavailable(
                        f"eager provisioning failed: {provisioned.text}",
                        hint="unset CORRAL_EAGER_SANDBOX to provision lazily",
                    )
            try:
                text = await agent.run(task, reason="wake" if resumed and not task else "run")
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    _stopped(log)
                raise
            tg.cancel_scope.cancel()  # ends the MCP connections (their subprocesses exit)
    return Outcome(log.session_id, text)


def tools_cache(settings: HarnessSettings) -> Path:
    """Where the last tool listing of this exact server set is kept (see `CachedListing`)."""
    key = hashlib.sha256(json.dumps(settings.server_targets(), sort_keys=True).encode()).hexdigest()[:16]
    folder = settings.data_dir() / "harness"
    folder.mkdir(exist_ok=True)
    return folder / f"tools-{key}.json"


async def _connect_after(first_send: anyio.Event, servers: Toolset) -> None:
    """Connect the MCP servers once the first request is on its way: starting their processes
    earlier would compete with it for the CPU; later would make the first tool call wait."""
    with anyio.move_on_after(5):
        await first_send.wait()
        await anyio.sleep(0.05)  # the hook fires as the request is handed over; let it reach the wire
    await servers.tools()


@contextmanager
def _first_error() -> Iterator[None]:
    """The task group wraps a failure in an ExceptionGroup; the CLI wants the error itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        raise next((e for e in leaves if isinstance(e, CorralError | KeyboardInterrupt)), leaves[0]) from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _stopped(log: SessionLog) -> None:
    try:
        log.append(
            [ev(E.STATUS, status="stopped", writer=log.writer, reason="interrupted by the user; `corral wake` resumes")]
        )
    except E.WriterLost:
        pass  # another harness owns the session now: nothing of ours to record
