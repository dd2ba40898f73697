"""A real HTTP server on 127.0.0.1 that echoes what it received, in several encodings, and redirects."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

from tests.credentials.encoders import ENCODERS


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b"\0" * (20 << 20), compresslevel=9)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _echo(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items()), "body": body}
        )
        return json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        echo = self._echo()
        auth = self.headers.get("Authorization", "")
        if url.path == "/echo":
            self._send(200, echo, {"Content-Type": "application/json", "X-Echo-Auth": auth})
        elif url.path == "/echo-b64":
            self._send(
                200,
                base64.b64encode(echo) + b"\n" + base64.urlsafe_b64encode(echo),
                {"X-Echo-B64": base64.b64encode(auth.encode()).decode()},
            )
        elif url.path == "/echo-hex":
            self._send(200, echo.hex().encode() + b"\n" + echo.hex().upper().encode())
        elif url.path == "/echo-gzip":
            self._send(200, gzip.compress(echo), {"Content-Encoding": "gzip", "Content-Type": "application/json"})
        elif url.path == "/echo-br":
            self._send(200, echo, {"Content-Encoding": "br"})  # claims an encoding the proxy cannot decode
        elif url.path == "/echo-chunked":
            self._chunked(echo, int(q.get("size", "3")))
        elif url.path == "/set-cookie":
            self._send(200, b"ok", {"Set-Cookie": "session=abc123; Path=/"})
        elif url.path == "/redirect":
            self._send(int(q.get("code", "302")), b"moved", {"Location": q["to"]})
        elif url.path == "/slow":
            time.sleep(float(q.get("s", "2")))
            self._send(200, b"late")
        elif url.path == "/bomb":  # ~20 KB on the wire, 20 MB decoded
            self._send(200, _bomb(), {"Content-Encoding": "gzip"})
        elif url.path == "/reflect":  # the `k` query parameter as a real encoder would write it
            self._send(200, ENCODERS[q["form"]](q["k"]).encode(), {"Content-Type": "text/plain; charset=utf-8"})
        elif url.path == "/copies":  # pad, then the bearer secret n times
            secret = auth.removeprefix("Bearer ").encode()
            self._send(200, b"p" * int(q.get("pad", "0")) + b" ".join([secret] * int(q.get("n", "1"))))
        elif url.path == "/big":
            self._send(200, b"x" * int(q["n"]))
        else:
            self._send(404, b"not found")

    def _chunked(self, data: bytes, size: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), size):
            part = data[i : i + size]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_POST = do_PUT = do_DELETE = do_GET


class Upstream:
    """A threaded HTTP server on 127.0.0.1 for the length of a `with` block; `seen` is what it got."""

    def __init__(self, handler: type[BaseHTTPRequestHandler] = Handler) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.seen = []
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def seen(self) -> list[dict]:
        return self.server.seen

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
