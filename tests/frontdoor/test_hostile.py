"""Hostile traffic at the front door: what a local process without the token can try."""

from __future__ import annotations

import resource
import socket
import time

import httpx

from tests.conftest import free_port
from tests.frontdoor.conftest import start_up, token_of

FLOOD = 1100  # more than the 1024 descriptors a process usually may open
HALF_HEAD = b"GET /sessions.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # and then nothing, ever


def slow_socket(port: int) -> socket.socket | None:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(HALF_HEAD)
    except OSError:  # a full backlog: the flood's problem, not ours
        s.close()
        return None
    return s


def test_slow_half_heads_neither_lock_out_token_holders_nor_flood_the_log(corral_env: dict[str, str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 500), hard))
    # `corral up` with the usual descriptor limit of a desktop session.
    up = start_up(corral_env, free_port(), prefix=["prlimit", "--nofile=1024:1024"])
    token = token_of(corral_env)
    attackers: list[socket.socket] = []
    try:
        # A head that never completes is closed after the header timeout.
        lone = slow_socket(up.port)
        assert lone is not None
        lone.settimeout(30)
        started = time.monotonic()
        assert lone.recv(100) == b"", "the server answered a half request head"
        assert 5 < time.monotonic() - started < 25
        lone.close()

        attackers = [s for s in (slow_socket(up.port) for _ in range(FLOOD)) if s is not None]
        assert len(attackers) > 1000
        with httpx.Client(base_url=up.base, timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
            for _ in range(3):  # each request on a fresh connection, while the flood holds its sockets
                started = time.monotonic()
                answer = http.get("/sessions.json", headers={"Connection": "close"})
                assert answer.status_code == 200, answer.text
                assert time.monotonic() - started < 3, "a token holder waited on the flood"
    finally:
        for s in attackers:
            s.close()
        assert up.stop() == 0
    notices = [line for line in up.lines if "closing connections" in line]
    assert 1 <= len(notices) <= 2, up.output  # said once, not once per connection
    assert "Traceback" not in up.output and "out of system resource" not in up.output, up.output

