"""The model seam: one streamed Messages API call in, one WHOLE response out.

    ModelClient (Protocol)   respond(request, on_text) -> ModelResponse
     ├── AnthropicModel      the real `anthropic` SDK, streaming; SDK retries off. It assembles
     │                       the response from the raw stream events itself and returns it only
     │                       if the stream completed (see `Assembly.whole()`)
     └── RetryingModel       wraps any ModelClient: backoff on retryable failures, each failed
                             attempt reported to `on_retry` (the loop records it)

A response counts only when its stream completed: `message_stop` arrived, `stop_reason` is
set, every block was closed, every tool input is valid JSON that the tool's schema accepts.
Anything else is a failed attempt (`ModelUnavailable`, `fault` says which) and is retried
like a 429/529. A stream that delivers no bytes for `idle_timeout_s` is abandoned.

Vendor errors become Corral errors here and nowhere else, by the API's `error.type` (an HTTP
error body or an `error` event mid-stream): rate_limit/api/overloaded/timeout errors, other
5xx and connection failures -> `ModelUnavailable` (retryable); authentication/permission ->
`PolicyDenied`; invalid_request/not_found/request_too_large/billing -> `InvalidArgument`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from corral.errors import CorralError, InvalidArgument, PolicyDenied, Unavailable

__all__ = [
    "AnthropicModel",
    "Assembly",
    "ContextWindowExceeded",
    "ModelClient",
    "ModelRequest",
    "ModelResponse",
    "ModelUnavailable",
    "RetryingModel",
    "UnknownStopReason",
    "api_error",
    "output_limit",
]

TextSink = Callable[[str], None]

# Stop reasons whose response is whole and usable as it is. `max_tokens`, `refusal`,
# `pause_turn` are whole too but the loop gives each its own behaviour;
# `model_context_window_exceeded` and anything unknown never reach the loop as a response.
STOP_REASONS = ("end_turn", "tool_use", "stop_sequence", "max_tokens", "refusal", "pause_turn")

# error.type as the API documents it -> retryable? (unknown types are treated as transient)
ERROR_TYPES = {
    "rate_limit_error": True,
    "api_error": True,
    "overloaded_error": True,
    "timeout_error": True,
    "invalid_request_error": False,
    "authentication_error": False,
    "permission_error": False,
    "not_found_error": False,
    "request_too_large": False,
    "billing_error": False,
}
STATUS_OF = {"rate_limit_error": 429, "api_error": 500, "overloaded_error": 529, "timeout_error": 504}

# The largest max_tokens each model family accepts (Anthropic's models overview), longest
# prefix first. A tool call cut by max_tokens is retried with max_tokens doubled up to this.
OUTPUT_LIMITS = (
    ("claude-opus-4-6", 128_000),
    ("claude-opus-4-5", 64_000),
    ("claude-opus-4", 32_000),
    ("claude-sonnet-4", 64_000),
    ("claude-haiku-4", 64_000),
    ("claude-3-7-sonnet", 64_000),
    ("claude-3-5", 8_192),
    ("claude-3", 4_096),
)
DEFAULT_OUTPUT_LIMIT = 32_000


def output_limit(model: str) -> int:
    return next((limit for prefix, limit in OUTPUT_LIMITS if model.startswith(prefix)), DEFAULT_OUTPUT_LIMIT)


@dataclass
class ModelRequest:
    model: str
    system: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    max_tokens: int
    tool_choice: dict[str, Any] | None = None


@dataclass
class ModelResponse:
    message_id: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: dict[str, int]
    latency_ms: float
    ttft_ms: float | None
    attempts: int = 1

    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]

    def text(self) -> str:
        return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")

    def cache_hit_rate(self) -> float:
        u = self.usage
        total = u.get("input_tokens", 0) + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0)
        return round(u.get("cache_read_input_tokens", 0) / total, 4) if total else 0.0


class ModelUnavailable(Unavailable):
    """A failed attempt worth retrying: an API error (429, 5xx, overloaded), a connection
    failure, or a response that did not arrive whole. `fault` names which; `arrived` says what
    of the response came before it broke; `grow` asks for a larger max_tokens."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        fault: str = "status",
        arrived: dict[str, Any] | None = None,
        grow: bool = False,
    ) -> None:
        super().__init__(message, hint="the harness retries with backoff; `corral wake` resumes if it gave up")
        self.status = status
        self.retry_after = retry_after
        self.fault = fault
        self.arrived = arrived
        self.grow = grow


class _Unusable:
    """A whole response the loop must not use as it is; `fault` and `arrived` go into its error event."""

    fault = ""

    def __init__(self, message: str, arrived: dict[str, Any]) -> None:
        super().__init__(message)  # type: ignore[call-arg]  # the CorralError it is mixed into
        self.arrived = arrived


class ContextWindowExceeded(_Unusable, InvalidArgument):
    """stop_reason `model_context_window_exceeded`: the loop compacts, then asks again."""

    fault = "context_window_exceeded"
    default_hint = "the harness compacts the context and retries; lower CORRAL_CONTEXT_BUDGET_TOKENS if this repeats"


class UnknownStopReason(_Unusable, Unavailable):
    """A stop_reason this harness does not know: recorded and surfaced, never guessed at."""

    fault = "unknown_stop_reason"
    default_hint = "the response was not acted on; upgrade corral, then `corral wake` asks again"


def api_error(
    error_type: str,
    status: int,
    detail: str,
    retry_after: float | None = None,
    *,
    fault: str = "status",
    arrived: dict[str, Any] | None = None,
) -> CorralError:
    """One API error (an HTTP error body, or an `error` event mid-stream) as a Corral error."""
    retryable = ERROR_TYPES.get(error_type, True) if error_type else (status == 429 or status >= 500)
    where = f"Anthropic API {status}" if status != 200 else "Anthropic API (mid-stream)"
    label = f"{where} {error_type}: {detail}" if error_type else f"{where}: {detail}"
    if retryable:
        return ModelUnavailable(
            label, status=STATUS_OF.get(error_type, status), retry_after=retry_after, fault=fault, arrived=arrived
        )
    if error_type in ("authentication_error", "permission_error") or status in (401, 403):
        hint = (
            "check ANTHROPIC_API_KEY"
            if error_type == "authentication_error" or status == 401
            else "this API key may not use this model or feature; check CORRAL_MODEL and the key's workspace"
        )
        return PolicyDenied(label, hint=hint)
    if error_type == "not_found_error":
        return InvalidArgument(label, hint="check CORRAL_MODEL and ANTHROPIC_BASE_URL")
    return InvalidArgument(
        label, hint="the request was refused; the session log shows what was sent (`corral sessions show`)"
    )


class ModelClient(Protocol):
    async def respond(self, request: ModelRequest, on_text: TextSink) -> ModelResponse: ...


@dataclass
class Assembly:
    """A response put together from the raw stream events, and the judge of whether it is whole."""

    message_id: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)
    raw_json: dict[int, str] = field(default_factory=dict)
    stop_reason: str | None = None
    stopped: bool = False  # message_stop arrived
    events: int = 0

    def feed(self, event: Any) -> str:
        """Take one stream event; return the text it adds (for the live view)."""
        self.events += 1
        kind = event.type
        if kind == "message_start":
            self.message_id = event.message.id
            self.usage.update(_usage(event.message.usage))
        elif kind == "content_block_start":
            self.blocks[event.index] = event.content_block.model_dump(mode="json", exclude_none=True)
            self.open.add(event.index)
            if self.blocks[event.index].get("type") == "tool_use":
                self.raw_json[event.index] = ""
        elif kind == "content_block_delta":
            return self._delta(event.index, event.delta)
        elif kind == "content_block_stop":
            self.open.discard(event.index)
        elif kind == "message_delta":
            self.stop_reason = event.delta.stop_reason
            self.usage.update({k: v for k, v in _usage(event.usage).items() if v})
        elif kind == "message_stop":
            self.stopped = True
        return ""

    def _delta(self, index: int, delta: Any) -> str:
        block = self.blocks.setdefault(index, {"type": "unknown"})
        if delta.type == "text_delta":
            block["text"] = block.get("text", "") + delta.text
            return delta.text
        if delta.type == "input_json_delta":
            self.raw_json[index] = self.raw_json.get(index, "") + delta.partial_json
        elif delta.type == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.thinking
        elif delta.type == "signature_delta":
            block["signature"] = delta.signature
        return ""

    def arrived(self) -> dict[str, Any]:
        """What came before the stream broke, short enough for an error event."""
        text = "".join(b.get("text", "") for _, b in sorted(self.blocks.items()) if b.get("type") == "text")
        return {
            "events": self.events,
            "message_id": self.message_id or None,
            "text": text[:200],
            "text_chars": len(text),
            "tool_uses": [b.get("name") for _, b in sorted(self.blocks.items()) if b.get("type") == "tool_use"],
            "open_blocks": len(self.open),
            "stop_reason": self.stop_reason,
            "message_stop": self.stopped,
        }

    def whole(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The content blocks if the response is whole, else raise the failed attempt's error."""
        if not self.stopped:
            raise self.broken("no_message_stop", "the stream ended without message_stop")
        if self.open:
            raise self.broken("unclosed_block", f"content block(s) {sorted(self.open)} were never closed")
        if self.stop_reason is None:
            raise self.broken("no_stop_reason", "the response has no stop_reason")
        content = [self._finish(i, b, tools) for i, b in sorted(self.blocks.items())]
        if self.stop_reason == "model_context_window_exceeded":
            raise ContextWindowExceeded("the response stopped at the model's context window", self.arrived())
        if self.stop_reason not in STOP_REASONS:
            raise UnknownStopReason(f"the response stopped for an unknown reason {self.stop_reason!r}", self.arrived())
        return content

    def _finish(self, index: int, block: dict[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
        if block.get("type") != "tool_use":
            return block
        if self.stop_reason == "max_tokens":  # its input was cut: never run it, ask for more room
            raise self.broken("max_tokens_in_tool_use", f"max_tokens cut the {block.get('name')} call", grow=True)
        raw = self.raw_json.get(index, "")
        try:
            value = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise self.broken(
                "invalid_tool_input", f"the {block.get('name')} input is not valid JSON: {raw[:80]!r}"
            ) from None
        problem = _schema_problem(block.get("name", ""), value, tools)
        if problem:
            raise self.broken("invalid_tool_input", problem)
        return {**block, "input": value}

    def broken(self, fault: str, message: str, grow: bool = False) -> ModelUnavailable:
        return ModelUnavailable(f"incomplete response: {message}", fault=fault, arrived=self.arrived(), grow=grow)


def _schema_problem(name: str, value: Any, tools: list[dict[str, Any]]) -> str | None:
    if not isinstance(value, dict):
        return f"the {name} input is not a JSON object"
    schema = next((t.get("input_schema") for t in tools if t.get("name") == name), None)
    if schema is None:  # a tool that does not exist: a whole answer; the router tells the model (not_found)
        return None
    import jsonschema  # the MCP SDK's validator, loaded only when a tool call arrives

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    return None if error is None else f"the {name} input does not match its schema: {error.message}"


USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _usage(usage: Any) -> dict[str, int]:
    return {k: int(getattr(usage, k, None) or 0) for k in USAGE_KEYS if hasattr(usage, k)}


@dataclass
class AnthropicModel:
    """The Messages API through the official SDK, streamed so text shows as it arrives."""

    api_key: str
    base_url: str | None = None
    timeout_s: float = 600.0
    on_send: Callable[[], None] | None = None  # called as each request is handed to the HTTP client
    idle_timeout_s: float = 90.0  # no byte for this long: the stream is abandoned (a read timeout)
    _client: Any = field(default=None, init=False, repr=False)
    _warming: threading.Thread | None = field(default=None, init=False, repr=False)

    def client(self) -> Any:
        warming = self._warming
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming = None
        if self._client is None:
            import anthropic  # imported on first use: the CLI's --help stays fast
            import httpx2

            hooks = {"request": [self._sending]} if self.on_send else {}
            # The read timeout bounds the wait for any next byte (headers, event, ping): a stalled stream.
            timeout = httpx2.Timeout(self.timeout_s, read=min(self.idle_timeout_s, self.timeout_s))
            http = anthropic.DefaultAsyncHttpxClient(timeout=timeout, event_hooks=hooks)
            self._client = anthropic.AsyncAnthropic(
                api_key=self.api_key, base_url=self.base_url, max_retries=0, timeout=timeout, http_client=http
            )
        return self._client

    async def _sending(self, _request: Any) -> None:
        if self.on_send:
            self.on_send()

    def warm_up(self) -> None:
        """Start building the SDK client in a thread: loading the CA bundle for TLS is ~0.1 s
        of GIL-free work that would otherwise sit in front of the first request."""
        if self._client is None and self._warming is None:
            self._warming = threading.Thread(target=self.client, name="anthropic-client", daemon=True)
            self._warming.start()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def respond(self, request: ModelRequest, on_text: TextSink) -> ModelResponse:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "system": request.system,
            "messages": request.messages,
        }
        if request.tools:
            kwargs["tools"] = request.tools
        if request.tool_choice:
            kwargs["tool_choice"] = request.tool_choice
        started = time.perf_counter()
        ttft: float | None = None
        got = Assembly()
        async with _translated(got):
            stream = await self.client().messages.create(**kwargs, stream=True)
            async with stream:
                async for event in stream:
                    delta = got.feed(event)
                    if delta:
                        ttft = ttft if ttft is not None else (time.perf_counter() - started) * 1000
                        on_text(delta)
        content = got.whole(request.tools)
        return ModelResponse(
            message_id=got.message_id,
            content=content,
            stop_reason=got.stop_reason,
            usage={k: got.usage.get(k, 0) for k in USAGE_KEYS},
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            ttft_ms=None if ttft is None else round(ttft, 2),
        )


@asynccontextmanager
async def _translated(got: Assembly) -> AsyncIterator[None]:
    """Vendor and transport exceptions raised while a response streams -> Corral errors."""
    import anthropic
    import httpx2

    try:
        yield
    except anthropic.APIStatusError as err:  # an HTTP error, or an `error` event mid-stream
        raise _translate_status(err, got) from err
    except (anthropic.APITimeoutError, httpx2.TimeoutException) as err:
        raise got.broken("stalled", "no bytes arrived within the idle timeout (CORRAL_MODEL_IDLE_TIMEOUT_S)") from err
    except anthropic.APIConnectionError as err:
        raise ModelUnavailable(f"cannot reach the Anthropic API: {err}", fault="connection") from err
    except (anthropic.APIError, httpx2.HTTPError) as err:  # the connection broke mid-stream
        raise got.broken("dropped", f"the stream broke: {type(err).__name__}: {err}") from err


def _translate_status(err: Any, got: Assembly) -> CorralError:
    status = err.status_code
    body = err.body if isinstance(err.body, dict) else {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    detail = error.get("message") or err.message
    retry_after = err.response.headers.get("retry-after")
    try:
        seconds = float(retry_after) if retry_after else None
    except ValueError:
        seconds = None
    mid_stream = got.events > 0 or status == 200
    return api_error(
        str(error.get("type") or ""),
        status,
        detail,
        seconds,
        fault="stream_error" if mid_stream else "status",
        arrived=got.arrived() if mid_stream else None,
    )


RetryHook = Callable[[ModelUnavailable, int, float], Awaitable[None]]


@dataclass
class RetryingModel:
    """Retries retryable failures with exponential backoff; a retry-after header wins (capped)."""

    inner: ModelClient
    retries: int
    base_s: float
    on_retry: RetryHook
    max_delay_s: float = 60.0

    async def respond(self, request: ModelRequest, on_text: TextSink) -> ModelResponse:
        attempt = 1
        while True:
            try:
                response = await self.inner.respond(request, on_text)
            except ModelUnavailable as err:
                if attempt > self.retries:
                    raise
                if err.grow:  # a tool call cut by max_tokens: the same request with more room, at once
                    request = replace(request, max_tokens=_more_room(request))
                    delay = 0.0
                else:
                    delay = min(
                        self.max_delay_s,
                        err.retry_after if err.retry_after is not None else self.base_s * 2 ** (attempt - 1),
                    )
                await self.on_retry(err, attempt, delay)
                await anyio.sleep(delay)
                attempt += 1
                continue
            response.attempts = attempt
            return response


def _more_room(request: ModelRequest) -> int:
    limit = max(output_limit(request.model), request.max_tokens)
    if request.max_tokens >= limit:
        raise InvalidArgument(
            f"a tool call does not fit in {request.model}'s output limit of {limit} tokens",
            hint="ask for smaller steps (e.g. write a large file in parts)",
        )
    return min(limit, request.max_tokens * 2)
