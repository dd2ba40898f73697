"""Harness benchmark, against the fake Anthropic API (tests/harness/fake_anthropic.py).

    python3 benchmarks/harness.py [--trials N] [--delay-ms D]

1. Wake on a 10,000-event session -> first model request (target <= 150 ms), beside:
   - the same wake when neither the log nor an earlier run has the tool definitions (it must
     wait for the MCP servers — sandbox, session, credentials over stdio — to list them);
   - the CLI: `corral wake` as a process (Python start-up and imports included).
2. Time to first token of a new session, lazy vs eager provisioning (eager = a sandbox is
   provisioned before the first model call), on the Docker backend, with the sandbox server
   already running over streamable HTTP (as `corral up` runs it): p50 and p95 of each. Both
   start from a warm tool-listing cache (a warm-up run fills it), as every run after the first.
3. Prompt-cache hit rate of steady-state turns (the fake bills cache reads by prefix).
4. What a broken response costs (issue 17), at the DEFAULT settings (idle timeout 90 s, first
   backoff 1 s): a two-turn task whose first response breaks once by each fault, beside the
   same task unbroken. A stall costs the idle timeout plus one backoff (the SDK's default was
   to wait 10 minutes).

Numbers are noisy on a shared machine; the table says what was measured. JSON goes to
benchmarks/results/harness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table
from corral.harness.events import ev
from corral.harness.run import run_session
from corral.harness.tools import ToolOutcome
from corral.harness.view import NullView
from corral.servers.session import open_store
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Fault, Script, Turn, text, tool

TOOLS = [
    {
        "name": f"sandbox__tool{i}",
        "description": "a tool " * 20,
        "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
        "annotations": {"read_only": i % 2 == 0, "idempotent": False, "destructive": False},
    }
    for i in range(8)
]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


# -- 1. wake on 10,000 events -----------------------------------------------------------


def build_long_session(store_path: Path, n_events: int, *, compact_every: int | None, with_tools: bool) -> str:
    """A session as a long task leaves it: turns of (text, tool_use, span, tool_result), a
    compaction every `compact_every` events, ending on a tool result (the model is next)."""
    store = open_store(str(store_path))
    try:
        sid = store.create({"task": "bench"}).session_id
        head = [
            ev("session.status", status="running", writer="hrn_x"),
            ev("user.message", text="WAKE-BENCH: a long task"),
        ]
        if with_tools:
            head.append(ev("session.tools", tools=TOOLS, system="You are a benchmark agent."))
        store.append(sid, head)
        pos, turn, batch = len(head), 0, []
        last_compaction = 0
        while pos + len(batch) < n_events:
            p = pos + len(batch)
            if (
                compact_every
                and p - last_compaction >= compact_every
                and batch
                and batch[-1].type == "agent.tool_result"
            ):
                batch.append(
                    ev(
                        "context.compacted",
                        start=0,
                        end=p - 4,
                        summary="WAKE-BENCH summary of the work so far " * 40,
                        todo=None,
                    )
                )
                last_compaction = p
                continue
            mid, tid = f"msg_{turn}", f"toolu_{turn}"
            batch += [
                ev("agent.message", message_id=mid, text=f"thinking about step {turn} " * 8),
                ev("agent.tool_use", message_id=mid, id=tid, name=f"sandbox__tool{turn % 8}", input={"x": "y" * 100}),
                ev("span.model_request", message_id=mid, purpose="turn", usage={"input_tokens": 10}),
                ev(
                    "agent.tool_result",
                    tool_use_id=tid,
                    name=f"sandbox__tool{turn % 8}",
                    content=[{"type": "text", "text": "out " * 120}],
                    is_error=False,
                ),
            ]
            turn += 1
            if len(batch) >= 400:
                pos += len(store.append(sid, batch))
                batch = []
        if batch:
            pos += len(store.append(sid, batch))
        return sid
    finally:
        store.close()


async def wake_to_first_request(env: dict[str, str], sid: str) -> float:
    with FakeAnthropic(Script({"WAKE-BENCH": [lambda body: Turn([text("ok")])] * 100000})) as fake:
        e = {**env, **fake.env()}
        settings = settings_from(e)
        started = time.time()
        await run_session(settings, task=None, session_id=sid, view=NullView(), env=e)
        return (fake.requests[0].received - started) * 1000


def harness_work(db: Path, sid: str) -> float:
    """The harness's own part of a wake: read what the context needs, build the request."""
    from corral.harness.context import build_messages, estimate_tokens, system_blocks, with_cache_breakpoints
    from corral.harness.events import SessionLog
    from corral.harness.tools import ToolDef

    started = time.perf_counter()
    store = open_store(str(db))
    try:
        log = SessionLog.load(store, sid)
        defs = [ToolDef.from_record(t).api() for t in log.tools.data["tools"]]
        messages = build_messages(log.compaction, log.tail)
        estimate_tokens(log.tools.data["system"], defs, messages)
        json.dumps(
            {
                "system": system_blocks(log.tools.data["system"]),
                "tools": defs,
                "messages": with_cache_breakpoints(messages),
            }
        )
        return (time.perf_counter() - started) * 1000
    finally:
        store.close()


def cli_wake_to_first_request(env: dict[str, str], sid: str) -> float:
    with FakeAnthropic(Script({"WAKE-BENCH": [lambda body: Turn([text("ok")])] * 100000})) as fake:
        started = time.time()
        subprocess.run(
            [sys.executable, "-m", "corral.cli", "wake", sid],
            env={**env, **fake.env()},
            cwd=ROOT,
            capture_output=True,
            timeout=300,
            check=True,
        )
        return (fake.requests[0].received - started) * 1000


def bench_wake(env: dict[str, str], trials: int) -> dict[str, Any]:
    db = Path(env["CORRAL_HOME"]) / "sessions.db"
    rows: dict[str, list[float]] = {
        "recorded tools (in-process)": [],
        "of which: read log + build request": [],
        "no recorded tools: waits for servers": [],
        "`corral wake` process": [],
    }
    anyio.run(
        wake_to_first_request, env, build_long_session(db, 10_000, compact_every=1000, with_tools=True)
    )  # warm-up: imports
    for _ in range(trials):
        sid = build_long_session(db, 10_000, compact_every=1000, with_tools=True)
        rows["of which: read log + build request"].append(harness_work(db, sid))
        rows["recorded tools (in-process)"].append(anyio.run(wake_to_first_request, env, sid))
        sid = build_long_session(db, 10_000, compact_every=1000, with_tools=False)
        for cached in (Path(env["CORRAL_HOME"]) / "harness").glob("tools-*.json"):
            cached.unlink()  # nor a listing saved by an earlier run: the servers must answer first
        rows["no recorded tools: waits for servers"].append(anyio.run(wake_to_first_request, env, sid))
    rows["python -c 'import anthropic' (part of the process figure)"] = []
    for _ in range(max(1, trials // 3)):
        sid = build_long_session(db, 10_000, compact_every=1000, with_tools=True)
        rows["`corral wake` process"].append(cli_wake_to_first_request(env, sid))
        started = time.time()
        subprocess.run([sys.executable, "-c", "import anthropic"], check=True, timeout=120)
        rows["python -c 'import anthropic' (part of the process figure)"].append((time.time() - started) * 1000)
    return {k: {"p50_ms": round(pct(v, 50), 1), "p95_ms": round(pct(v, 95), 1), "n": len(v)} for k, v in rows.items()}


# -- 2. TTFT lazy vs eager on Docker ---------------------------------------------------------


class FirstToken(NullView):
    def __init__(self) -> None:
        self.at: float | None = None

    def text(self, delta: str) -> None:
        if self.at is None:
            self.at = time.time()

    def tool_end(self, name: str, outcome: ToolOutcome, duration_ms: float) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sandbox_server(env: dict[str, str], backend: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    e = {**env, "CORRAL_SANDBOX_BACKEND": backend}
    if backend == "docker":
        e["CORRAL_SANDBOX_IMAGE"] = "corral-sandbox-test:latest"
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "sandbox", "--http", f"127.0.0.1:{port}"],
        env=e,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the sandbox server did not start")


async def destroy_all(url: str, token: str) -> None:
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(url, http_client=http)) as c:
        listed = (await c.call_tool("list_sandboxes", {})).structured_content or {}
        for sb in listed.get("sandboxes", []):
            if sb.get("state") == "running":
                await c.call_tool("destroy", {"sandbox_id": sb["sandbox_id"]})


def token(env: dict[str, str]) -> str:
    """The install's bearer token (`corral serve X --http` requires it)."""
    return (Path(env["CORRAL_HOME"]) / "token").read_text().strip()


async def ttft(env: dict[str, str], url: str, eager: bool, delay_s: float) -> float:
    view = FirstToken()
    with FakeAnthropic(Script({"TTFT-BENCH": [Turn([text("hello from the model")])]}), delay_s=delay_s) as fake:
        e = {
            **env,
            **fake.env(),
            "CORRAL_SERVERS": "sandbox",
            "CORRAL_SANDBOX_URL": url,
            "CORRAL_SERVER_TOKEN": token(env),
        }
        started = time.time()
        await run_session(settings_from(e, eager_sandbox=eager), task="TTFT-BENCH", session_id=None, view=view, env=e)
    assert view.at is not None
    return (view.at - started) * 1000


def bench_ttft(env: dict[str, str], trials: int, delay_s: float) -> dict[str, Any]:
    backend = (
        "docker"
        if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        else "bubblewrap"
    )
    proc, url = start_sandbox_server(env, backend)
    lazy: list[float] = []
    eager: list[float] = []
    try:
        anyio.run(ttft, env, url, False, delay_s)  # warm-up: imports, first connection
        for _ in range(trials):
            lazy.append(anyio.run(ttft, env, url, False, delay_s))
            eager.append(anyio.run(ttft, env, url, True, delay_s))
            anyio.run(destroy_all, url, token(env))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {"backend": backend, "response_delay_ms": delay_s * 1000}
    for name, v in (("lazy", lazy), ("eager", eager)):
        out[name] = {"p50_ms": round(pct(v, 50), 1), "p95_ms": round(pct(v, 95), 1), "n": len(v)}
    out["p50_reduction"] = round(1 - out["lazy"]["p50_ms"] / out["eager"]["p50_ms"], 3)
    out["p95_reduction"] = round(1 - out["lazy"]["p95_ms"] / out["eager"]["p95_ms"], 3)
    return out


# -- 3. cache hit rate --------------------------------------------------------------------


def bench_cache(env: dict[str, str]) -> dict[str, Any]:
    turns = [Turn([tool("todo", {"items": [{"text": "step", "status": "in_progress"}]})])]
    turns += [
        Turn([text(f"step {i} " * 30), tool("todo", {"items": [{"text": f"step {i}", "status": "in_progress"}]})])
        for i in range(10)
    ]
    turns.append(Turn([text("done")]))
    with FakeAnthropic(Script({"CACHE-BENCH": turns})) as fake:
        e = {**env, **fake.env(), "CORRAL_SERVERS": ""}
        out = anyio.run(
            lambda: run_session(settings_from(e), task="CACHE-BENCH", session_id=None, view=NullView(), env=e)
        )
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        spans = [x.data for x in store.select(out.session_id, types=["span.model_request"])]
    finally:
        store.close()
    rates = [s["cache_hit_rate"] for s in spans]
    return {
        "turns": len(rates),
        "first_turn": rates[0],
        "steady_state_mean": round(statistics.mean(rates[2:]), 3),
        "min_steady": min(rates[2:]),
    }


# -- 4. what a broken response costs ----------------------------------------------------

FAULTS = {
    "stall": Fault("stall", stall_s=600.0),
    "drop": Fault("drop"),
    "error_event (overloaded)": Fault("error_event"),
    "no message_stop": Fault("no_message_stop"),
    "invalid tool JSON": Fault("bad_json"),
    "max_tokens in tool call": None,
}


def broken_run_s(env: dict[str, str], name: str | None) -> float:
    first = Turn([text("Planning."), tool("todo", {"items": [{"text": "step", "status": "in_progress"}]})])
    if name is None:
        turns: list[Any] = [first, Turn([text("done")])]
    elif FAULTS[name] is None:
        turns = [Turn(first.blocks, needs_tokens=16_000), Turn([text("done")])]
    else:
        turns = [[Turn(first.blocks, fault=FAULTS[name]), first], Turn([text("done")])]
    with FakeAnthropic(Script({"FAULT-BENCH": turns})) as fake:
        e = {**env, **fake.env(), "CORRAL_SERVERS": ""}
        started = time.perf_counter()
        anyio.run(lambda: run_session(settings_from(e), task="FAULT-BENCH", session_id=None, view=NullView(), env=e))
        return time.perf_counter() - started


def bench_faults(env: dict[str, str]) -> dict[str, Any]:
    clean = min(broken_run_s(env, None) for _ in range(3))
    return {"unbroken_s": round(clean, 2), **{name: round(broken_run_s(env, name), 2) for name in FAULTS}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=300.0, help="the fake API's fixed response delay")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    sandbox_dir = Path(tempfile.gettempdir()) / "corral-test-sandboxes" / uuid.uuid4().hex[:12]
    sandbox_dir.parent.mkdir(mode=0o711, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "ANTHROPIC_"))}
    env.update(
        CORRAL_HOME=str(home),
        CORRAL_VAULT_BACKEND="encrypted-file",
        CORRAL_SANDBOX_DIR=str(sandbox_dir),
        PYTHONPATH=str(ROOT),
    )
    try:
        results = {
            "wake_10k_events": bench_wake(env, args.trials),
            "ttft_new_session": bench_ttft(env, args.trials, args.delay_ms / 1000),
            "cache_hit_rate": bench_cache(env),
            "broken_response_s": bench_faults(env),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(sandbox_dir, ignore_errors=True)
    print_table(results)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    table = Table("harness")
    wake = results["wake_10k_events"]
    rec = wake["recorded tools (in-process)"]
    table.add(
        "wake 10k-event session -> first model request: p50",
        f"{rec['p50_ms']:.0f} ms",
        f"no recorded tools {wake['no recorded tools: waits for servers']['p50_ms']:.0f} ms",
        "<= 150 ms",
        rec["p50_ms"] <= 150,
    )
    table.add(
        "wake 10k-event session -> first model request: p95",
        f"{rec['p95_ms']:.0f} ms",
        f"no recorded tools {wake['no recorded tools: waits for servers']['p95_ms']:.0f} ms",
        "<= 150 ms",
        rec["p95_ms"] <= 150,
    )
    proc = wake["`corral wake` process"]
    table.add(
        "`corral wake` as a new process -> first request: p50",
        f"{proc['p50_ms']:.0f} ms",
        "interpreter + imports included",
    )
    tt = results["ttft_new_session"]
    table.add(
        f"TTFT new session, lazy vs eager ({tt['backend']}): p50",
        f"{tt['lazy']['p50_ms']:.0f} ms (-{tt['p50_reduction']:.0%})",
        f"eager {tt['eager']['p50_ms']:.0f} ms",
        ">= 60% lower",
        tt["p50_reduction"] >= 0.6,
    )
    table.add(
        f"TTFT new session, lazy vs eager ({tt['backend']}): p95",
        f"{tt['lazy']['p95_ms']:.0f} ms (-{tt['p95_reduction']:.0%})",
        f"eager {tt['eager']['p95_ms']:.0f} ms",
        ">= 90% lower",
        tt["p95_reduction"] >= 0.9,
    )
    c = results["cache_hit_rate"]
    table.add(
        "prompt-cache hit rate, steady-state turns",
        f"{c['steady_state_mean']:.0%} (min {c['min_steady']:.0%})",
        f"first turn {c['first_turn']:.0%}",
    )
    f = results["broken_response_s"]
    for name in FAULTS:
        target = "~ idle timeout 90 s + 1 s backoff" if name == "stall" else "~ 1 s backoff"
        table.add(
            f"task with one broken response: {name}",
            f"{f[name]:.1f} s (+{f[name] - f['unbroken_s']:.1f} s)",
            f"unbroken {f['unbroken_s']:.1f} s",
            target,
        )
    table.save(results)
    return 0


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="harness (fake Anthropic API; shared, noisy machine)")
    for col in ("figure", "p50 ms", "p95 ms", "n", "note"):
        t.add_column(col)
    for name, v in r["wake_10k_events"].items():
        note = (
            "target <= 150 ms"
            if name.startswith("recorded")
            else ("context" if name.startswith(("python", "of which")) else "baseline")
        )
        t.add_row(f"wake 10k events -> first request: {name}", str(v["p50_ms"]), str(v["p95_ms"]), str(v["n"]), note)
    tt = r["ttft_new_session"]
    for name in ("lazy", "eager"):
        v = tt[name]
        t.add_row(
            f"TTFT new session, {name} ({tt['backend']}, delay {tt['response_delay_ms']:.0f} ms)",
            str(v["p50_ms"]),
            str(v["p95_ms"]),
            str(v["n"]),
            "baseline"
            if name == "eager"
            else f"p50 -{tt['p50_reduction']:.0%}, p95 -{tt['p95_reduction']:.0%} (target 60%/90%)",
        )
    c = r["cache_hit_rate"]
    t.add_row(
        "cache hit rate, steady-state turns",
        f"{c['steady_state_mean']:.0%}",
        f"min {c['min_steady']:.0%}",
        str(c["turns"]),
        f"first turn {c['first_turn']:.0%}",
    )
    Console().print(t)


if __name__ == "__main__":
    sys.exit(main())
