"""Corral's stdio transport (`servers/stdio_pipes.py`), driven by the SDK's own stdio client.

A stray print (ours or a child's) must never reach the wire; messages bigger than a
pipe's buffer must pass whole in both directions; EOF ends the server; a terminal is
left alone (the SDK's transport serves it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.stdio_pipes import PipeLines, PipeWriter

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


def noisy(transport: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "tests.frontdoor.noisy_server", transport],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("transport", ["pipes", "sdk"])
async def test_prints_miss_the_wire_and_big_messages_pass_whole(transport):
    async with Client(noisy(transport)) as client:
        r = await client.call_tool("shout", {"text": "hello"})
        assert not r.is_error and r.content[0].text == "heard hello"
        payload = "".join(chr(0x41 + i % 26) for i in range(300_000)) + "é✓"  # > 64 KiB pipe buffer, multi-byte tail
        r = await client.call_tool("echo_big", {"payload": payload})
        assert r.content[0].text == payload * 2
        r = await client.call_tool("shout", {"text": "again"})  # the wire is still in step
        assert r.content[0].text == "heard again"


def test_stray_output_goes_to_stderr(tmp_path):
    # The same server driven by hand: one request line in, the answers out, the prints on stderr.
    init = '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}'
    notified = '{"jsonrpc":"2.0","method":"notifications/initialized"}'
    call = '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shout","arguments":{"text":"x"}}}'
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.frontdoor.noisy_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "err", "w"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    try:
        proc.stdin.write("\n".join([init, notified, call]) + "\n")
        proc.stdin.flush()
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        proc.stdin.close()  # EOF ends the server cleanly
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    lines += proc.stdout.read().splitlines()
    assert all(line.startswith('{"') for line in lines if line.strip()), lines  # nothing but JSON-RPC on the wire
    assert '"id":2' in lines[1] and "heard x" in lines[1], lines
    err = (tmp_path / "err").read_text()
    assert "python says x" in err and "child says x" in err


def test_lines_split_across_reads_and_a_last_unterminated_line():
    r, w = os.pipe()
    lines = PipeLines(r)

    async def read_all() -> list[str]:
        return [line async for line in lines]

    os.write(w, b"first\nsec")
    os.write(w, "ond\nthird ✓".encode())
    os.close(w)
    assert anyio.run(read_all) == ["first\n", "second\n", "third ✓"]
    os.close(r)


def test_a_full_pipe_waits_instead_of_blocking_or_dropping():
    r, w = os.pipe()
    writer = PipeWriter(w)
    payload = "x" * (1 << 20) + "\n"  # 16 times a pipe's buffer
    got = bytearray()

    async def main() -> None:
        async def drain() -> None:
            os.set_blocking(r, False)
            while len(got) < len(payload):
                try:
                    got.extend(os.read(r, 1 << 16))
                except BlockingIOError:
                    await anyio.wait_readable(r)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await writer.write(payload)

    anyio.run(main)
    assert bytes(got) == payload.encode()
    os.close(r)
    os.close(w)


def test_a_terminal_or_file_is_not_made_non_blocking(tmp_path):
    probe = "from corral.servers.stdio_pipes import wire_is_pipes; import sys; sys.stderr.write(str(wire_is_pipes()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    piped = subprocess.run(
        [sys.executable, "-c", probe],
        stdin=subprocess.PIPE,
        capture_output=True,
        env=env,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.stderr == "True"
    with open(tmp_path / "file", "w") as f:
        filed = subprocess.run(
            [sys.executable, "-c", probe],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            timeout=60,
            check=False,
        )
    assert filed.stderr == "False"
