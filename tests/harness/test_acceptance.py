"""The issue's "done when": `corral run` completes a scripted multi-step task that provisions a
sandbox (real bubblewrap, lazily), writes and runs code, uses a credential through the proxy
(a real vault, a real loopback upstream) and spawns a subagent — all against the fake API.
Also: a refused credential is told to the model; a sandbox killed mid-task is replaced."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.credentials.upstream import Upstream
from tests.harness.conftest import corral
from tests.harness.fake_anthropic import (
    FakeAnthropic,
    Fault,
    Request,
    Script,
    Turn,
    text,
    tool,
)
from tests.harness.scripts import PLAN
from tests.harness.test_cli import session_id
from tests.harness.test_crash import assert_valid_history, read_log
from tests.sandbox.procs import bwrap_pids

SECRET = "sk-acceptance-" + uuid.uuid4().hex


def add_credential(env: dict[str, str], port: int, *, allow_private: bool) -> None:
    args = [
        "vault",
        "set",
        "api",
        "--host",
        "127.0.0.1",
        "--scheme",
        "http",
        "--port",
        str(port),
        "--method",
        "GET",
        "--description",
        "the test API",
    ] + (["--allow-private"] if allow_private else [])
    p = subprocess.run([*corral_cmd(), *args], env=env, input=SECRET, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def corral_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "corral.cli"]


def sandboxes(env: dict[str, str]) -> int:
    db = Path(env["CORRAL_HOME"]) / "sandboxes" / "registry-bubblewrap.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM sandboxes").fetchone()[0]
        except sqlite3.OperationalError:  # the server has not created its table yet
            return 0


def last_result(body: dict[str, Any]) -> dict[str, Any]:
    return [b for b in body["messages"][-1]["content"] if b["type"] == "tool_result"][-1]


def result_json(body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(last_result(body)["content"][0]["text"])


def test_run_provisions_writes_runs_uses_a_credential_and_spawns_a_subagent(real_env: dict[str, str]) -> None:
    with Upstream() as upstream:
        add_credential(real_env, int(upstream.url("/").split(":")[2].split("/")[0]), allow_private=True)
        script = Script(
            {
                "ACCEPT-TASK": [
                    Turn([text("Let me plan."), tool("todo", PLAN)]),
                    Turn([tool("sandbox__write_file", {"path": "answer.sh", "content": "echo $((6 * 7))\n"})]),
                    Turn([tool("sandbox__execute", {"command": "sh answer.sh"})]),
                    Turn(
                        [
                            tool("credentials__list_credentials", {}),
                            tool(
                                "credentials__http_request",
                                {"credential": "api", "method": "GET", "url": upstream.url("/echo")},
                            ),
                        ]
                    ),
                    Turn([tool("spawn_subagent", {"task": "ACCEPT-SUB: look at the sandbox files"})]),
                    Turn([text("Finished: the script printed 42, the API answered, the subagent saw the file.")]),
                ],
                "ACCEPT-SUB": [Turn([tool("sandbox__list_files", {})]), Turn([text("the sandbox has answer.sh")])],
            }
        )
        at_first_request: list[int] = []

        def observe(req: Request) -> None:
            if not at_first_request:
                at_first_request.append(sandboxes(real_env))

        with FakeAnthropic(script, on_request=observe) as fake:
            p = corral(["run", "ACCEPT-TASK: compute and report"], {**real_env, **fake.env()}, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Finished: the script printed 42" in p.stdout
        sid = session_id(p.stdout)
        assert upstream.seen[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"  # the proxy added it upstream
    assert at_first_request == [0]  # lazy: no sandbox when the first model request went out
    assert sandboxes(real_env) == 1
    log = read_log(real_env, sid)
    assert_valid_history(log)
    assert SECRET not in json.dumps([e.data for e in log])  # the model never saw the secret
    by_name = {e.data["name"]: e.data for e in log if e.type == "agent.tool_result"}
    assert all(not r["is_error"] for r in by_name.values()), by_name
    assert json.loads(by_name["sandbox__execute"]["content"][0]["text"])["stdout"].strip() == "42"
    assert json.loads(by_name["credentials__http_request"]["content"][0]["text"])["status"] == 200
    assert by_name["spawn_subagent"]["content"][0]["text"] == "the sandbox has answer.sh"
    child = by_name["spawn_subagent"]["subagent"]
    listed = next(e.data for e in read_log(real_env, child) if e.type == "agent.tool_result")
    assert "answer.sh" in listed["content"][0]["text"]
    assert max(fake.counts.values()) == 1
    provisioned = [e.data for e in log if e.type == "sandbox.provisioned"]
    assert (
        len(provisioned) == 1 and provisioned[0]["via"] == "sandbox__write_file"
    )  # lazily, by the first call that needed it


def test_a_refused_credential_is_told_to_the_model(real_env: dict[str, str]) -> None:
    with Upstream() as upstream:
        add_credential(real_env, int(upstream.url("/").split(":")[2].split("/")[0]), allow_private=False)
        seen: list[dict[str, Any]] = []

        def react(body: dict[str, Any]) -> Turn:
            seen.append(last_result(body))
            return Turn([text("The credential was refused; I will not retry.")])

        script = Script(
            {
                "REFUSE-TASK": [
                    Turn(
                        [
                            tool(
                                "credentials__http_request",
                                {"credential": "api", "method": "GET", "url": upstream.url("/echo")},
                            )
                        ]
                    ),
                    react,
                ]
            }
        )
        with FakeAnthropic(script) as fake:
            p = corral(["run", "REFUSE-TASK"], {**real_env, **fake.env()}, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert upstream.seen == []  # nothing reached the upstream
    assert seen[0]["is_error"] and "policy_denied: address 127.0.0.1" in seen[0]["content"][0]["text"]
    assert "policy_denied" in p.stdout  # the terminal view shows the error too


def kill_when_running(sandbox_id: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = bwrap_pids(sandbox_id)
        if pids:
            time.sleep(0.3)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def test_a_sandbox_killed_mid_task_is_replaced_by_the_model(real_env: dict[str, str]) -> None:
    def run_long(body: dict[str, Any]) -> Turn:
        sid = result_json(body)["sandbox_id"]
        threading.Thread(target=kill_when_running, args=(sid,), daemon=True).start()
        return Turn([tool("sandbox__execute", {"sandbox_id": sid, "command": "sleep 30; echo never"})])

    def reprovision(body: dict[str, Any]) -> Turn:
        lost = last_result(body)
        assert lost["is_error"] and "sandbox_lost" in lost["content"][0]["text"], lost
        return Turn([tool("sandbox__provision", {})])

    def rerun(body: dict[str, Any]) -> Turn:
        return Turn(
            [tool("sandbox__execute", {"sandbox_id": result_json(body)["sandbox_id"], "command": "echo recovered"})]
        )

    script = Script(
        {
            "LOST-TASK": [
                Turn([tool("sandbox__provision", {})]),
                run_long,
                reprovision,
                rerun,
                Turn([text("re-provisioned and finished")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        p = corral(["run", "LOST-TASK"], {**real_env, **fake.env()}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    log = read_log(real_env, session_id(p.stdout))
    assert_valid_history(log)
    execs = [e.data for e in log if e.type == "agent.tool_result" and e.data["name"] == "sandbox__execute"]
    assert (
        execs[0]["is_error"] and "sandbox_lost" in execs[0]["content"][0]["text"] and execs[0]["duration_ms"] < 25_000
    )
    assert json.loads(execs[1]["content"][0]["text"])["stdout"].strip() == "recovered"
    assert [e.type for e in log if e.type.startswith("sandbox.")] == [
        "sandbox.provisioned",
        "sandbox.checkpoint",
        "sandbox.lost",  # no checkpoint of a lost sandbox
        "sandbox.provisioned",
        "sandbox.checkpoint",
        "sandbox.checkpoint",
    ]
    # sandboxes the model provisioned itself are not its default: a fork would not restore them as such
    assert [e.data["default"] for e in log if e.type == "sandbox.checkpoint"] == [False, False, False]
    assert max(fake.counts.values()) == 1


def test_run_over_streamable_http_against_corral_up_with_its_token(real_env: dict[str, str]) -> None:
    """The servers as `corral up` serves them (one port, bearer token), the harness as an HTTP client."""
    import socket
    import sys

    from tests.harness.conftest import ROOT

    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "up", "--port", str(port)],
        env=real_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        token_file = Path(real_env["CORRAL_HOME"]) / "token"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                if token_file.exists():
                    break
            except OSError:
                time.sleep(0.3)
        base = f"http://127.0.0.1:{port}"
        e = {
            **real_env,
            "CORRAL_SANDBOX_URL": f"{base}/sandbox/mcp",
            "CORRAL_SESSION_URL": f"{base}/session/mcp",
            "CORRAL_CREDENTIALS_URL": f"{base}/credentials/mcp",
            "CORRAL_SERVER_TOKEN": token_file.read_text().strip(),
        }
        script = Script(
            {
                "HTTP-TASK": [
                    Turn([tool("sandbox__execute", {"command": "echo over-http"})]),
                    Turn([tool("credentials__list_credentials", {}), tool("session__list_sessions", {})]),
                    Turn([text("all three answered over HTTP")]),
                ]
            }
        )
        with FakeAnthropic(script) as fake:
            p = corral(["run", "HTTP-TASK"], {**e, **fake.env()}, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        log = read_log(real_env, session_id(p.stdout))
        results = {x.data["name"]: x.data for x in log if x.type == "agent.tool_result"}
        assert all(not r["is_error"] for r in results.values()), results
        assert json.loads(results["sandbox__execute"]["content"][0]["text"])["stdout"].strip() == "over-http"
        assert_valid_history(log)
        # a wrong token is refused: the model is told the server is unavailable, the run still ends cleanly
        with FakeAnthropic(
            Script(
                {
                    "BADTOKEN": [
                        Turn([tool("sandbox__execute", {"command": "true"})]),
                        Turn([text("could not reach it")]),
                    ]
                }
            )
        ) as fake:
            p = corral(["run", "BADTOKEN"], {**e, **fake.env(), "CORRAL_SERVER_TOKEN": "wrong"}, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        failed = next(x.data for x in read_log(real_env, session_id(p.stdout)) if x.type == "agent.tool_result")
        assert failed["is_error"] and failed["content"][0]["text"].startswith(("unavailable:", "not_found:")), failed
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


def test_every_response_first_breaks_yet_each_command_runs_once(real_env: dict[str, str]) -> None:
    """Issue 17 on a real sandbox: every response of a multi-step task first arrives broken (a
    different fault each), the task still completes and each step's command runs exactly once."""
    step = "echo ran >> runs.txt; wc -l < runs.txt"
    steps = [
        (
            Turn([text("Writing the step."), tool("sandbox__write_file", {"path": "step.sh", "content": step + "\n"})]),
            Fault("drop"),
        ),
        (Turn([tool("sandbox__execute", {"command": "sh step.sh"})]), Fault("error_event")),
        (Turn([tool("sandbox__execute", {"command": "sh step.sh"})], needs_tokens=10_000), None),  # cut by max_tokens
        (Turn([tool("sandbox__execute", {"command": "sh step.sh"})]), Fault("bad_json")),
        (Turn([tool("sandbox__read_file", {"path": "runs.txt"})]), Fault("stall", stall_s=20.0)),
        (Turn([text("Three steps ran, once each.")]), Fault("no_message_stop")),
    ]
    script = Script({"FLAKY-TASK": [[replace(t, fault=f), t] if f else t for t, f in steps]})
    with FakeAnthropic(script) as fake:
        p = corral(
            ["run", "FLAKY-TASK: run the step three times"],
            {**real_env, **fake.env(), "CORRAL_MODEL_IDLE_TIMEOUT_S": "1"},
            timeout=300,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("✗ attempt 1 failed") == 6
    log = read_log(real_env, session_id(p.stdout))
    assert_valid_history(log)
    results = [e.data for e in log if e.type == "agent.tool_result"]
    assert not [r for r in results if r["is_error"]], results
    assert [
        json.loads(r["content"][0]["text"])["stdout"].strip() for r in results if r["name"] == "sandbox__execute"
    ] == ["1", "2", "3"]
    assert "ran\nran\nran" in results[-1]["content"][0]["text"].replace("\\n", "\n")
    failed = [e.data["fault"] for e in log if e.type == "session.error"]
    assert failed == [
        "dropped",
        "stream_error",
        "max_tokens_in_tool_use",
        "invalid_tool_input",
        "stalled",
        "no_message_stop",
    ]
    assert fake.invalid == [] and len([r for r in fake.requests if r.whole]) == len(steps)


def test_the_sessions_hands_follow_it_across_harness_and_server_restarts(real_env: dict[str, str]) -> None:
    """Issue 10 item 6: a second `corral run --session` (a new harness, a new stdio sandbox
    server) finds the default sandbox of the first: its files and its running server."""
    serve = "echo kept > notes.txt; nohup python3 -m http.server 8090 --bind 127.0.0.1 >/dev/null 2>&1 & sleep 0.5"
    fetch = "cat notes.txt; python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8090/').status)\""
    seen: list[dict[str, Any]] = []

    def check(body: dict[str, Any]) -> Turn:
        seen.append(result_json(body))
        return Turn([text("found them")])

    script = Script({"HANDS-TASK": [
        Turn([tool("sandbox__execute", {"command": serve})]), Turn([text("started")]),
        Turn([tool("sandbox__execute", {"command": fetch})]), check,
    ]})  # fmt: skip
    with FakeAnthropic(script) as fake:
        first = corral(["run", "HANDS-TASK: start"], {**real_env, **fake.env()}, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        sid = session_id(first.stdout)
        second = corral(["run", "--session", sid, "go on"], {**real_env, **fake.env()}, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
    assert seen and seen[0]["stdout"] == "kept\n200\n", seen
    assert sandboxes(real_env) == 1
    with sqlite3.connect(Path(real_env["CORRAL_HOME"]) / "sandboxes" / "registry-bubblewrap.db") as conn:
        assert conn.execute("SELECT client FROM defaults").fetchall() == [(f"meta:{sid}",)]  # bound to the session
