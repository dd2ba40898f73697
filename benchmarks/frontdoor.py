"""Front-door benchmark (issue 6): `corral up` start-up, and what its door costs per MCP call.

    python3 benchmarks/frontdoor.py [--calls 300] [--starts 3]

- start-up: `corral up` spawned until its banner (all three servers checked over HTTP),
  beside `corral --version` (the interpreter and the CLI's imports alone);
- per call: `get_session` over streamable HTTP through `http_app` (bearer token, Host/Origin
  guard, mount), beside the SDK's bare `streamable_http_app` for the same server, both in
  this process on loopback. Numbers are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import httpx2
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from benchmarks.common import Table, summary
from corral.servers.mcp_shell import http_app, transport_security
from corral.servers.session import open_store
from corral.servers.session.server import build_server

CORRAL = str(Path(sys.executable).parent / "corral")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_s(home: Path, n: int) -> tuple[list[float], list[float]]:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    ups, bare = [], []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([CORRAL, "--version"], env=env, capture_output=True, check=True, timeout=60)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        proc = subprocess.Popen(
            [CORRAL, "up", "--port", str(free_port())],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        ups.append(time.perf_counter() - t)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return ups, bare


def serve_in_thread(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server


async def call_latency_ms(url: str, token: str | None, session_id: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers))) as client:
        out = []
        for i in range(n + 10):
            t = time.perf_counter()
            result = await client.call_tool("get_session", {"session_id": session_id})
            assert not result.is_error
            if i >= 10:  # warm-up
                out.append((time.perf_counter() - t) * 1000)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # before MCPServer() would set up INFO logging
    table = Table("frontdoor")
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        print("corral up (noisy: a shared 2-core machine)")
        ups, bare = startup_s(home / "up", args.starts)
        table.add(
            "corral up: spawn -> banner (3 servers health-checked), p50",
            f"{summary(ups)['p50']:.2f} s",
            f"corral --version {summary(bare)['p50']:.2f} s",
        )

        store = open_store(str(home / "bench.db"))
        sid = store.create({}).session_id
        guarded_port, bare_port, token = free_port(), free_port(), "t" * 43
        guarded = serve_in_thread(
            http_app({"session": build_server(store)}, host="127.0.0.1", port=guarded_port, token=token), guarded_port
        )
        plain_app = build_server(store).streamable_http_app(
            transport_security=transport_security("127.0.0.1", bare_port)
        )
        plain = serve_in_thread(plain_app, bare_port)
        through: list[float] = []
        direct: list[float] = []
        for _ in range(3):  # interleaved rounds, so drift in the machine's load hits both alike
            through += anyio.run(
                call_latency_ms, f"http://127.0.0.1:{guarded_port}/session/mcp", token, sid, args.calls // 3
            )
            direct += anyio.run(call_latency_ms, f"http://127.0.0.1:{bare_port}/mcp", None, sid, args.calls // 3)
        for p in ("p50", "p95"):
            table.add(
                f"get_session over HTTP through corral's door: {p}",
                f"{summary(through)[p]:.2f} ms",
                f"bare SDK app {summary(direct)[p]:.2f} ms",
            )
        guarded.should_exit = plain.should_exit = True
        time.sleep(0.5)
        store.close()
    print(f"  -> {table.save()}")


if __name__ == "__main__":
    main()
