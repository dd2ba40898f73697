"""A fake Anthropic Messages API: a real HTTP server on 127.0.0.1 speaking the real wire format.

    POST /v1/messages   JSON or SSE stream (message_start, content_block_start/delta/stop with
                        text_delta and input_json_delta, message_delta, message_stop); errors as
                        the API sends them: {"type": "error", "error": {"type", "message"}}
                        with 400/401/429/500/529 (and retry-after when scripted)

Scripted per test: a `Script` maps conversations (named by a substring of their first user
message) to turns; the turn a request asks for is the number of assistant messages it carries,
so a woken harness that re-asks a recorded turn is counted (`fake.counts[(conv, turn)]`).
A turn entry may be a list: the Nth request for that turn gets the Nth item (the last repeats),
which scripts "429, then 529, then the answer".

Faults (a `Turn`'s `fault`, see `Fault`): the stream drops after N bytes, carries an `error`
event mid-stream, stalls after `message_start`, sends a tool input that is not valid JSON, or
ends without `message_stop`; a `Turn` with `needs_tokens` is cut by max_tokens inside its tool
call when the request's max_tokens is smaller. `req.whole` says whether a reply arrived whole.
Every request's history is checked as the real API would (`invalid_history`): a bad one is
answered 400 and kept in `fake.invalid`.

Prompt caching is simulated honestly: every cache_control breakpoint's prefix (tools, system,
message blocks) is hashed; a later request whose breakpoint prefix matches reads it from the
"cache" and is billed as cache_read_input_tokens, so usage tells whether a harness's requests
are cache-stable. Tokens are counted as JSON characters / 4.

Use it from tests and benchmarks:

    with FakeAnthropic(Script({"TASK": [Turn([tool("x__y", {})]), Turn([text("done")])]})) as fake:
        env = {"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": "test-key"}
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeAnthropic", "Script", "Turn", "ApiError", "Fault", "text", "tool", "Request", "invalid_history"]


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool(name: str, input: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "name": name, "input": input, **({"id": id} if id else {})}


@dataclass
class Fault:
    """How a streamed reply breaks.

    drop             the connection closes after `after_bytes` of the body (None: half of it)
    error_event      an `error` event of `error_type` after half of the events, then the stream ends
    stall            headers and message_start, then silence for `stall_s`, then the connection closes
    bad_json         every tool input's input_json_delta is cut in half (the stream ends normally)
    no_message_stop  everything but message_stop
    """

    kind: str
    after_bytes: int | None = None
    error_type: str = "overloaded_error"
    message: str = "Overloaded"
    stall_s: float = 30.0


@dataclass
class Turn:
    blocks: list[dict[str, Any]]
    stop_reason: str | None = None  # default: tool_use if any tool block, else end_turn
    delay_s: float | None = None  # overrides the server's delay for this reply
    fault: Fault | None = None
    needs_tokens: int | None = None  # a request with less max_tokens gets its tool call cut by max_tokens


@dataclass
class ApiError:
    status: int
    type: str = ""
    message: str = ""
    retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        kinds = {
            400: "invalid_request_error",
            401: "authentication_error",
            429: "rate_limit_error",
            500: "api_error",
            529: "overloaded_error",
        }
        kind = self.type or kinds.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message or kind.replace("_", " ")}}


Reply = Turn | ApiError
Entry = Reply | list[Reply] | Callable[[dict[str, Any]], Reply]


def invalid_history(body: dict[str, Any]) -> str | None:
    """What the real API would refuse in a request's messages (None: nothing).

    As the real API does, consecutive messages of one role count as one turn (Claude Code,
    for one, sends its reminders as a user message of their own)."""
    messages = body.get("messages", [])
    if messages and messages[0]["role"] != "user":
        return "message 0: the first message must use the user role"
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        if not content:
            return f"message {i}: empty content"
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"] = [*turns[-1]["content"], *content]
        else:
            turns.append({"role": m["role"], "content": content})
    pending: set[str] = set()
    for i, m in enumerate(turns):
        content = m["content"]
        results = {b["tool_use_id"] for b in content if b.get("type") == "tool_result"}
        if m["role"] == "user" and results != pending:
            return f"message {i}: tool_result ids {sorted(results)} do not answer the tool_use ids {sorted(pending)}"
        pending = set()
        for b in content:
            if b.get("type") == "tool_use":
                if not isinstance(b.get("input"), dict):
                    return f"message {i}: tool_use input must be an object"
                pending.add(b["id"])
            if b.get("type") == "text" and not b.get("text"):
                return f"message {i}: text content blocks must be non-empty"
    return None


def first_user_text(body: dict[str, Any]) -> str:
    for m in body.get("messages", []):
        if m["role"] == "user":
            content = m["content"]
            if isinstance(content, str):
                return content
            return "".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


class Script:
    """Conversations by name (a substring of the first user message) -> their turns."""

    def __init__(self, conversations: dict[str, list[Entry]], summary: str = "SUMMARY: work so far.") -> None:
        self.conversations = conversations
        self.summary = summary

    def key(self, body: dict[str, Any]) -> tuple[str, int | str]:
        first = first_user_text(body)
        conv = next((name for name in self.conversations if name in first), "?")
        if (body.get("tool_choice") or {}).get("type") == "none":
            return conv, "compaction"
        return conv, self.turns_so_far(body)

    @staticmethod
    def turns_so_far(body: dict[str, Any]) -> int:
        """Assistant turns before this request, counting those a compaction summary stands for."""
        found = re.search(r"\[fake-turns:(\d+)\]", first_user_text(body))
        return (int(found.group(1)) if found else 0) + sum(
            1 for m in body.get("messages", []) if m["role"] == "assistant"
        )

    def reply(self, body: dict[str, Any], key: tuple[str, int | str], nth: int) -> Reply:
        conv, turn = key
        if turn == "compaction":  # the summary names the conversation and how many turns it covers
            return Turn([text(f"{conv} {self.summary} [fake-turns:{self.turns_so_far(body)}]")])
        turns = self.conversations.get(conv)
        if turns is None or not isinstance(turn, int) or turn >= len(turns):
            return ApiError(400, message=f"fake: no scripted turn {turn} for conversation {conv!r}")
        entry = turns[turn]
        if callable(entry):
            return entry(body)
        if isinstance(entry, list):
            return entry[min(nth, len(entry) - 1)]
        return entry


@dataclass
class Request:
    key: tuple[str, int | str]
    body: dict[str, Any]
    received: float  # time.time()
    usage: dict[str, int] = field(default_factory=dict)
    status: int = 200
    whole: bool = False  # the reply was delivered complete (a whole response or a whole error)


class _Cache:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def usage(self, body: dict[str, Any], output_tokens: int) -> dict[str, int]:
        blocks: list[tuple[Any, bool]] = []
        for t in body.get("tools", []):
            blocks.append((t, "cache_control" in t))
        system = body.get("system", [])
        for b in [{"type": "text", "text": system}] if isinstance(system, str) else system:
            blocks.append((b, "cache_control" in b))
        for m in body.get("messages", []):
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for b in content:
                blocks.append(({"role": m["role"], **b}, "cache_control" in b))
        h = hashlib.sha256()
        total = 0
        marks: list[tuple[str, int]] = []
        for block, mark in blocks:
            clean = {k: v for k, v in block.items() if k != "cache_control"}
            data = json.dumps(clean, sort_keys=True)
            h.update(data.encode())
            total += max(1, len(data) // 4)
            if mark:
                marks.append((h.hexdigest(), total))
        with self.lock:
            read = max((tokens for digest, tokens in marks if digest in self.seen), default=0)
            written = max(0, max((tokens for _, tokens in marks), default=0) - read)
            self.seen.update(digest for digest, _ in marks)
        return {
            "input_tokens": total - read - written,
            "output_tokens": output_tokens,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": written,
        }


class FakeAnthropic:
    def __init__(
        self,
        script: Script,
        *,
        delay_s: float = 0.0,
        on_request: Callable[[Request], None] | None = None,
        port: int = 0,
    ) -> None:
        self.script = script
        self.delay_s = delay_s
        self.on_request = on_request
        self.requests: list[Request] = []
        self.invalid: list[str] = []  # histories the real API would have refused
        self.counts: Counter[tuple[str, int | str]] = Counter()
        self._lock = threading.Lock()
        self._cache = _Cache()
        self._ids = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {"ANTHROPIC_BASE_URL": self.url, "ANTHROPIC_API_KEY": "test-key-not-real"}

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:06d}"

    def _take(self, body: dict[str, Any]) -> tuple[Request, Reply]:
        key = self.script.key(body)
        with self._lock:
            nth = self.counts[key]
            self.counts[key] += 1
            req = Request(key=key, body=body, received=time.time())
            self.requests.append(req)
        return req, self.script.reply(body, key, nth)

    def _message(self, body: dict[str, Any], turn: Turn, req: Request) -> dict[str, Any]:
        content = []
        for i, b in enumerate(turn.blocks):
            if b["type"] == "tool_use":
                slug = re.sub(r"[^A-Za-z0-9_-]", "_", f"{req.key[0]}_{req.key[1]}")[:40]
                content.append({**b, "id": b.get("id") or f"toolu_{slug}_{i}_{self._next_id('')}"})
            else:
                content.append(b)
        stop = turn.stop_reason or ("tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn")
        out_tokens = max(1, len(json.dumps(content)) // 4)
        req.usage = self._cache.usage(body, out_tokens)
        return {
            "id": self._next_id("msg_fake"),
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "fake"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": req.usage,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("request-id", fake._next_id("req_fake"))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # http.server's naming
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.split("?")[0] != "/v1/messages":
                    self._json(404, ApiError(404, "not_found_error", f"no route {self.path}").body())
                    return
                if not (self.headers.get("x-api-key") or self.headers.get("authorization")):
                    self._json(401, ApiError(401, message="x-api-key header is required").body())
                    return
                problem = invalid_history(body)
                if problem:
                    fake.invalid.append(problem)
                    self._json(400, ApiError(400, message=f"messages: {problem}").body())
                    return
                req, reply = fake._take(body)
                if fake.on_request:
                    fake.on_request(req)
                delay = reply.delay_s if isinstance(reply, Turn) and reply.delay_s is not None else fake.delay_s
                if delay:
                    time.sleep(delay)
                if isinstance(reply, ApiError):
                    req.status = reply.status
                    headers = {} if reply.retry_after is None else {"retry-after": str(reply.retry_after)}
                    headers["x-should-retry"] = "true" if reply.status in (429, 500, 529) else "false"
                    self._json(reply.status, reply.body(), headers)
                    req.whole = True
                    return
                message = fake._message(body, reply, req)
                cut = reply.needs_tokens is not None and body.get("max_tokens", 0) < reply.needs_tokens
                if cut:
                    message["stop_reason"] = "max_tokens"
                fault = Fault("bad_json") if cut else reply.fault
                if (
                    fault is not None
                    and fault.kind == "bad_json"
                    and not any(b["type"] == "tool_use" for b in message["content"])
                ):
                    fault = None  # no tool input to break: the reply goes out whole
                if body.get("stream"):
                    req.whole = self._stream(message, fault) and fault is None
                else:
                    self._json(200, message)
                    req.whole = True

            @staticmethod
            def _chunk(name: str, data: dict[str, Any]) -> bytes:
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                return f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"

            def _stream(self, message: dict[str, Any], fault: Fault | None) -> bool:
                """Send the reply as SSE, broken as `fault` says; False if the connection was cut."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("request-id", fake._next_id("req_fake"))
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = _events(message, fault)
                body = b"".join(self._chunk(n, d) for n, d in events) + b"0\r\n\r\n"
                if fault is not None and fault.kind == "drop":
                    cut = len(body) // 2 if fault.after_bytes is None else fault.after_bytes
                    self.wfile.write(body[:cut])
                    return self._cut()
                for name, data in events:
                    self.wfile.write(self._chunk(name, data))
                    self.wfile.flush()
                    if fault is not None and fault.kind == "stall" and name == "message_start":
                        time.sleep(fault.stall_s)
                        return self._cut()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return True

            def _cut(self) -> bool:
                """Close the connection mid-body, as a network failure would."""
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the client already gave up on it
                return False

        return Handler


def _events(message: dict[str, Any], fault: Fault | None) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of a streamed reply (as the API sends them), with `fault` applied."""
    kind = fault.kind if fault else None
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    out: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            out.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                )
            )
            for piece in re.findall(r"\S+\s*|\s+", block["text"]) or [""]:
                out.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": piece}},
                    )
                )
        else:
            empty = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            out.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty}))
            raw = json.dumps(block["input"])
            if kind == "bad_json":
                raw = raw[: len(raw) // 2]
            for j in range(0, len(raw), 40):
                out.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": raw[j : j + 40]},
                        },
                    )
                )
        out.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    out.append(("message_stop", {"type": "message_stop"}))
    if kind == "error_event":
        assert fault is not None
        out = out[: max(2, len(out) // 2)] + [
            ("error", {"type": "error", "error": {"type": fault.error_type, "message": fault.message}})
        ]
    elif kind == "no_message_stop":
        out = out[:-1]
    return out
