"""Issue 10's crash test of the workspace: `corral run` of a task that writes files and starts a
background HTTP server in its default sandbox (real bubblewrap) is SIGKILLed at every event
boundary and woken each time with `corral wake`. After every wake the session finds the same
sandbox, its files and its server, and the task completes.

Two deployments: the sandbox server over stdio, launched by each harness and ending with it (as
`corral run` does by default: every wake talks to a new server), and one `corral serve sandbox
--http` that outlives every harness (as `corral up` runs it)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.auth import load_or_create_token
from corral.servers.session import Event
from tests.conftest import bearer_client, free_port, wait_listening, wait_until
from tests.harness.conftest import corral
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.harness.test_acceptance import corral_cmd, sandboxes
from tests.harness.test_cli import session_id
from tests.harness.test_crash import assert_valid_history, read_log
from tests.sandbox.procs import host_pids

pytestmark = pytest.mark.slow

PORT = 8123  # in the sandbox's own network namespace: nothing on the host can collide with it
FETCH = (
    "import time, urllib.request\n"
    "for _ in range(100):\n"
    "    try:\n"
    f"        print(urllib.request.urlopen('http://127.0.0.1:{PORT}/notes.txt', timeout=2).read().decode(), end='')\n"
    "        break\n"
    "    except OSError:\n"
    "        time.sleep(0.1)\n"
)
SERVE = f"python3 -m http.server {PORT} --bind 127.0.0.1"
CHECK = "cat more.txt; python3 check.py"
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("sandbox__write_file", {"path": "notes.txt", "content": "written by write_file\n"}),
    ("sandbox__write_file", {"path": "check.py", "content": FETCH}),
    ("sandbox__execute", {"command": "echo written by echo > more.txt"}),
    ("sandbox__execute", {"command": SERVE, "background": True}),
    ("sandbox__execute", {"command": CHECK}),
]


def results_by_step(body: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Each step's tool_result blocks in a request's history (a step is a tool call by its name and input)."""
    calls: dict[str, int] = {}
    out: dict[int, list[dict[str, Any]]] = {}
    for m in body["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b["type"] == "tool_use":
                calls[b["id"]] = STEPS.index((b["name"], b["input"]))
            elif b["type"] == "tool_result":
                out.setdefault(calls[b["tool_use_id"]], []).append(b)
    return out


def next_step(body: dict[str, Any]) -> Turn:
    """The model: do the first step without a successful result yet (an interrupted call, one the
    killed harness never ran, is asked for again, as a real model would), then end the turn."""
    results = results_by_step(body)
    for i, (name, args) in enumerate(STEPS):
        if not any(not r.get("is_error") for r in results.get(i, [])):
            return Turn([tool(name, args)])
    return Turn([text("All done.")])


def step_results(log: list[Event], step: int) -> list[dict[str, Any]]:
    """The successful results of one step, parsed."""
    name, args = STEPS[step]
    ids = {
        e.data["id"] for e in log if e.type == "agent.tool_use" and (e.data["name"], e.data["input"]) == (name, args)
    }
    return [
        json.loads(e.data["content"][0]["text"])
        for e in log
        if e.type == "agent.tool_result" and e.data["tool_use_id"] in ids and not e.data["is_error"]
    ]


def servers_of(home: str) -> list[int]:
    """Sandbox server processes of the install at `home` still alive (a killed harness's stdio
    server must end with its stdin, not linger)."""
    mine = f"CORRAL_HOME={home}".encode()
    pids = []
    for pid in host_pids(b"serve\0sandbox"):
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def kill_point(log: list[Event]) -> str:
    """Where a killed harness stopped: its last append of progress, named by type (and step)."""
    bookkeeping = ("session.status", "span.model_request", "sandbox.provisioned", "sandbox.checkpoint")
    last = [e for e in log if e.type not in bookkeeping][-1]
    if last.type == "agent.tool_use":
        return f"tool_use {STEPS.index((last.data['name'], last.data['input']))}"
    if last.type == "agent.tool_result":
        use = next(e for e in log if e.type == "agent.tool_use" and e.data["id"] == last.data["tool_use_id"])
        return f"tool_result {STEPS.index((use.data['name'], use.data['input']))}"
    return last.type


def run_killed_at_every_boundary(env: dict[str, str]) -> tuple[str, list[str]]:
    """`corral run`, then `corral wake` until the task is done; each process is SIGKILLed right
    after its first append of progress. Except: a process woken after a kill that left a call
    recorded but never run (every step here is a non-idempotent call) records it interrupted,
    asks the model again and runs the call: it is killed after that third append, else such a
    call could never run. So every boundary of the task, before and after each call ran, is a
    crash point once. Returns the session id and where each process was killed."""
    p = corral(["run", "WS-TASK: write files, serve them, check"], {**env, "CORRAL_KILL_AFTER_APPENDS": "1"})
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    sid = session_id(p.stdout)
    killed = [kill_point(read_log(env, sid))]
    for _ in range(40):
        n = "3" if killed[-1].startswith("tool_use") else "1"
        p = corral(["wake", sid], {**env, "CORRAL_KILL_AFTER_APPENDS": n})
        if p.returncode == 0:
            return sid, killed
        assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
        killed.append(kill_point(read_log(env, sid)))
    raise AssertionError(f"the task did not complete; killed at {killed}")


async def call(c: Client, tool: str, sid: str, **args: Any) -> dict[str, Any]:
    result = await c.call_tool(tool, args, meta={"corral/client": sid})  # as the harness sends it
    assert not result.is_error, result.content[0].text
    return result.structured_content


@pytest.fixture(params=["stdio", "http"])
def deployment(request: pytest.FixtureRequest, real_env: dict[str, str]) -> Iterator[tuple[dict[str, str], Any]]:
    """The harness's environment, and how to reach the sandbox server after the task: a new stdio
    server (as the next `corral wake` would start) or the one HTTP server every harness used."""
    env = {**real_env, "CORRAL_SERVERS": "sandbox"}
    if request.param == "stdio":
        command, *args = corral_cmd()
        yield env, lambda: Client(StdioServerParameters(command=command, args=[*args, "serve", "sandbox"], env=env))
        return
    port = free_port()
    server = subprocess.Popen(
        [*corral_cmd(), "serve", "sandbox", "--http", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, server)
        url = f"http://127.0.0.1:{port}/mcp"
        token = load_or_create_token(Path(env["CORRAL_HOME"]))
        yield (
            {**env, "CORRAL_SANDBOX_URL": url, "CORRAL_SERVER_TOKEN": token},
            lambda: bearer_client(url, env["CORRAL_HOME"]),
        )
        assert server.poll() is None, "the HTTP sandbox server died"
    finally:
        server.terminate()
        server.wait(30)


def test_sigkill_at_every_boundary_keeps_the_sandbox_its_files_and_its_server(
    deployment: tuple[dict[str, str], Any],
) -> None:
    env, sandbox_client = deployment
    with FakeAnthropic(Script({"WS-TASK": [next_step] * 30})) as fake:
        sid, killed = run_killed_at_every_boundary({**env, **fake.env()})
        assert fake.invalid == []
    every = [f"{kind} {i}" for i in range(len(STEPS)) for kind in ("tool_use", "tool_result")]
    assert killed == ["user.message", "session.tools", *every, "agent.message"]
    log = read_log(env, sid)
    assert_valid_history(log)
    assert [e.data["text"] for e in log if e.type == "agent.message"][-1] == "All done."
    assert [e.data["status"] for e in log if e.type == "session.status"][-1] == "idle"

    done = [step_results(log, i) for i in range(len(STEPS))]
    assert all(len(d) == 1 for d in done), done  # every step ran once (an interrupted one never ran)
    assert done[4][0]["stdout"] == "written by echo\nwritten by write_file\n"  # the files, and the server serving them
    provisioned = [e.data["sandbox_id"] for e in log if e.type == "sandbox.provisioned"]
    assert len(provisioned) == 1 and sandboxes(env) == 1, provisioned  # one sandbox, never a fresh one
    assert {d[0]["sandbox_id"] for d in done} == set(provisioned)
    with sqlite3.connect(Path(env["CORRAL_HOME"]) / "sandboxes" / "registry-bubblewrap.db") as db:
        bound = db.execute("SELECT client, sandbox_id FROM defaults").fetchall()
    assert bound == [(f"meta:{sid}", provisioned[0])]  # bound to the session, not to a server's lifetime
    started = done[3][0]["process_id"]
    stays = 1 if "CORRAL_SANDBOX_URL" in env else 0  # the HTTP server; no killed harness's stdio server
    wait_until(lambda: len(servers_of(env["CORRAL_HOME"])) == stays, "every killed harness's sandbox server to exit")

    async def the_server_outlives_every_harness() -> None:
        async with sandbox_client() as c:  # asked as the session
            procs = (await call(c, "processes", sid))["processes"]
            assert [(p["process_id"], p["command"], p["state"]) for p in procs] == [(started, SERVE, "running")]
            again = await call(c, "execute", sid, command="python3 check.py")
            assert (again["sandbox_id"], again["stdout"]) == (provisioned[0], "written by write_file\n")

    anyio.run(the_server_outlives_every_harness)
