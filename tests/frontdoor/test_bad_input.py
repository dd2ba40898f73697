"""Every bad input gets a clear error, on every transport.

Over real stdio a line the server cannot use (a lone surrogate, data nested 300 deep, a
5,000-digit number, not JSON at all) is answered at once with a JSON-RPC error, with the
request's id when one can be found, and the server keeps serving. Arguments of the wrong
type, missing ones and numbers past what a store holds come back as one line
``invalid_argument: <what> (<what to do>)`` from every server, as every other error does.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp.client import Client

from corral.servers.session import open_store
from corral.servers.session.server import build_server
from tests.conftest import free_port, wait_listening
from tests.frontdoor.conftest import CORRAL, make_env, token_of

pytestmark = pytest.mark.anyio
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}


class RawStdio:
    """`corral serve NAME` spoken to in raw lines, as a buggy or hostile client would."""

    def __init__(self, name: str, env: dict[str, str], errlog: Path) -> None:
        self.err = errlog.open("w")
        self.proc = subprocess.Popen(
            [CORRAL, "serve", name], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        assert self.ask(json.dumps(INIT).encode())["id"] == 0
        self.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def ask(self, line: bytes, seconds: float = 20) -> dict:
        """Send one line; the next line on the wire is its answer (or the test fails: no answer)."""
        self.send(line)
        try:
            return json.loads(self.lines.get(timeout=seconds))
        except queue.Empty:
            exited = "" if self.proc.poll() is None else f" (the server exited with status {self.proc.returncode})"
            raise AssertionError(f"no answer within {seconds}s to {line[:80]!r}{exited}") from None

    def call(self, request_id: int, tool: str, arguments: dict) -> dict:
        return self.ask(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": {"name": tool, "arguments": arguments},
                }
            ).encode()
        )

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(20) == 0
        self.err.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    sandboxes = (
        Path(tempfile.gettempdir()) / "corral-test-sandboxes"
    )  # the sandbox uid must traverse it (tmp_path is 0700)
    sandboxes.mkdir(mode=0o711, exist_ok=True)
    env = {
        **make_env(tmp_path),
        "CORRAL_VAULT_BACKEND": "encrypted-file",
        "CORRAL_SANDBOX_DIR": str(sandboxes / tmp_path.name),
    }
    started: list[RawStdio] = []

    def start(name: str) -> RawStdio:
        started.append(RawStdio(name, env, tmp_path / f"{name}.err"))
        return started[-1]

    yield start
    for raw in started:
        raw.close()
    shutil.rmtree(env["CORRAL_SANDBOX_DIR"], ignore_errors=True)


def test_stdio_answers_every_line_it_cannot_use_and_keeps_serving(serve) -> None:
    raw = serve("session")
    call = '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"list_sessions","arguments":{"limit":%s}}}'
    refused = {
        1: (call % (1, '"\\ud800"')).encode(),  # a lone surrogate
        2: (call % (2, "[" * 300 + "1" + "]" * 300)).encode(),  # nested 300 deep
        3: (call % (3, "9" * 5000)).encode(),  # a 5,000-digit number
        4: b'{"jsonrpc":"2.0","id":4,"method":17}',  # JSON, but no JSON-RPC request
    }
    for request_id, line in refused.items():
        answer = raw.ask(line)
        assert answer["id"] == request_id and answer["error"]["code"] == -32600, answer  # the client hears at once
        assert answer["error"]["message"].startswith("Invalid request: "), answer
    for line in (b"this is not json", b'{"jsonrpc":"2.0","id":5,', b"\xff\xfe{", b"[" * 100_000):
        answer = raw.ask(line)
        assert (
            answer == {"jsonrpc": "2.0", "id": None, "error": answer["error"]} and answer["error"]["code"] == -32700
        ), answer
    ok = raw.call(6, "list_sessions", {"limit": 5})  # still in step: the next answer is this call's
    assert ok["id"] == 6 and ok["result"]["isError"] is False, ok


@pytest.mark.requires("bwrap")  # `corral serve sandbox` starts on bubblewrap
def test_wrong_and_missing_arguments_are_invalid_argument_on_every_server(serve) -> None:
    calls = {
        "session": (
            "get_events",
            {"session_id": 5, "after": "x"},
            ["session_id: Input should be a valid string (got 5)", "after: Input should be a valid integer"],
        ),
        "sandbox": (
            "execute",
            {"timeout_s": "soon"},
            ["command is missing", "timeout_s: Input should be a valid number"],
        ),
        "credentials": ("http_request", {"credential": "c", "method": "GET"}, ["url is missing"]),
    }
    for request_id, (name, (tool, arguments, said)) in enumerate(calls.items()):
        answer = serve(name).call(request_id, tool, arguments)
        assert answer["result"]["isError"] is True, answer
        text = answer["result"]["content"][0]["text"]
        assert text.startswith(f"Error executing tool {tool}: invalid_argument: "), text
        assert all(s in text for s in said), text
        assert (
            text.endswith(f"(call {tool} with the arguments its input schema describes)")
            and "pydantic" not in text
            and "\n" not in text
        ), text


async def test_numbers_past_a_position_are_invalid_argument(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'sessions.db'}")
    async with Client(build_server(store)) as client:
        sid = (await client.call_tool("create_session", {})).structured_content["session_id"]
        for order in ("asc", "desc"):
            result = await client.call_tool("get_events", {"session_id": sid, "after": 2**63, "order": order})
            text = result.content[0].text
            assert result.is_error and "invalid_argument: after 9223372036854775808 is out of range" in text, text
        result = await client.call_tool("get_events", {"session_id": sid, "after": 2**63 - 2})
        assert not result.is_error and json.loads(result.content[0].text)["events"] == []
        missing = await client.call_tool("get_events", {})
        assert missing.is_error and "invalid_argument: session_id is missing" in missing.content[0].text


def test_http_answers_the_same_bad_arguments_the_same_way(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [CORRAL, "serve", "session", "--http", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc)
        headers = {
            "Authorization": f"Bearer {token_of(env)}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=20) as http:
            init = http.post("/mcp", json=INIT)
            session = {"mcp-session-id": init.headers["mcp-session-id"]} if "mcp-session-id" in init.headers else {}
            http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "get_events", "arguments": {"session_id": "s", "after": "x"}},
            }
            answer = http.post("/mcp", json=body, headers=session)
        data = next(json.loads(line[5:]) for line in answer.text.splitlines() if line.startswith("data:"))
        text = data["result"]["content"][0]["text"]
        assert text.startswith(
            "Error executing tool get_events: invalid_argument: after: Input should be a valid integer"
        ), text
    finally:
        proc.terminate()
        proc.wait(20)
