"""A scripted Messages API and an upstream for `http_request`, run as a process of its own.

    python -m tests.frontdoor.claude_api WORKDIR API_PORT UPSTREAM_PORT SECRET PREFIX

Claude Code runs inside a private network namespace; the fake API must listen in that
namespace too, so the test starts this module there (`Netns.prefix`). It scripts a task that
calls three Corral tools through Claude Code (PREFIX is `mcp__corral-` as Claude Code names
them), then writes every request Claude Code sent, one JSON object a line, to
WORKDIR/requests.jsonl. The upstream answers `upstream-ok` only when the proxy injected the
secret, and echoes the secret back so the redaction on the way to Claude Code is exercised.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.harness.fake_anthropic import FakeAnthropic, Request, Script, Turn, text, tool

TASK = "CORRAL-CC-TASK"


def script(prefix: str, upstream_port: int) -> Script:
    return Script(
        {
            TASK: [
                Turn([tool(f"{prefix}sandbox__execute", {"command": "echo corral-cc > note.txt && cat note.txt"})]),
                Turn([tool(f"{prefix}sandbox__read_file", {"path": "note.txt"})]),
                Turn(
                    [
                        tool(
                            f"{prefix}credentials__http_request",
                            {"credential": "echo", "method": "GET", "url": f"http://127.0.0.1:{upstream_port}/probe"},
                        )
                    ]
                ),
                Turn([text("all three tools answered")]),
            ]
        }
    )


def upstream(port: int, secret: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # http.server's naming
            authorised = self.headers.get("Authorization") == f"Bearer {secret}"
            body = (
                f"upstream-ok; you sent {self.headers.get('Authorization')}" if authorised else "no secret"
            ).encode()
            self.send_response(200 if authorised else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    workdir, api_port, upstream_port, secret, prefix = (
        Path(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
    )
    log = (workdir / "requests.jsonl").open("a", encoding="utf-8")
    lock = threading.Lock()

    def record(req: Request) -> None:
        with lock:
            log.write(json.dumps(req.body) + "\n")
            log.flush()

    upstream(upstream_port, secret)
    with FakeAnthropic(script(prefix, upstream_port), on_request=record, port=api_port):
        (workdir / "ready").write_text("ok")
        threading.Event().wait()  # until the test kills this process


if __name__ == "__main__":
    main()
