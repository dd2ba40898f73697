"""The model seam: one streamed Messages API call in, one recorded response out.

    ModelClient (Protocol)   respond(request, on_text) -> ModelResponse
     ├── AnthropicModel      the real `anthropic` SDK, streaming; SDK retries off
     └── RetryingModel       wraps any ModelClient: backoff on 429/5xx/overloaded, each
                             failed attempt reported to `on_retry` (the loop records it)

Vendor errors become Corral errors here and nowhere else: 429, 5xx, 529 and connection
failures -> `Unavailable` (retryable); 401/403 -> `PolicyDenied`; other 4xx -> `InvalidArgument`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from corral.errors import CorralError, InvalidArgument, PolicyDenied, Unavailable

__all__ = ["ModelRequest", "ModelResponse", "ModelClient", "AnthropicModel", "RetryingModel", "ModelUnavailable"]

TextSink = Callable[[str], None]


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
    """A retryable API failure (429, 5xx, overloaded, connection)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, hint="the harness retries with backoff; `corral wake` resumes if it gave up")
        self.status = status
        self.retry_after = retry_after


class ModelClient(Protocol):
    async def respond(self, request: ModelRequest, on_text: TextSink) -> ModelResponse: ...


@dataclass
class AnthropicModel:
    """The Messages API through the official SDK, streamed so text shows as it arrives."""

    api_key: str
    base_url: str | None = None
    timeout_s: float = 600.0
    on_send: Callable[[], None] | None = None  # called as each request is handed to the HTTP client
    _client: Any = field(default=None, init=False, repr=False)
    _warming: threading.Thread | None = field(default=None, init=False, repr=False)

    def client(self) -> Any:
        warming = self._warming
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming = None
        if self._client is None:
            import anthropic  # imported on first use: the CLI's --help stays fast

            hooks = {"request": [self._sending]} if self.on_send else {}
            http = anthropic.DefaultAsyncHttpxClient(timeout=self.timeout_s, event_hooks=hooks)
            self._client = anthropic.AsyncAnthropic(api_key=self.api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s, http_client=http)
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
        import anthropic

        kwargs: dict[str, Any] = dict(model=request.model, max_tokens=request.max_tokens, system=request.system, messages=request.messages)
        if request.tools:
            kwargs["tools"] = request.tools
        if request.tool_choice:
            kwargs["tool_choice"] = request.tool_choice
        started = time.perf_counter()
        ttft: float | None = None
        try:
            async with self.client().messages.stream(**kwargs) as stream:
                async for event in stream:
                    if event.type == "text":
                        ttft = ttft if ttft is not None else (time.perf_counter() - started) * 1000
                        on_text(event.text)
                message = await stream.get_final_message()
        except anthropic.APIStatusError as err:
            raise _translate_status(err) from err
        except anthropic.APIConnectionError as err:
            raise ModelUnavailable(f"cannot reach the Anthropic API: {err}") from err
        except anthropic.APIError as err:  # e.g. an error event inside the SSE stream
            raise ModelUnavailable(f"the Anthropic API failed mid-stream: {err}") from err
        usage = message.usage
        return ModelResponse(
            message_id=message.id,
            content=[b.model_dump(mode="json", exclude_none=True) for b in message.content],
            stop_reason=message.stop_reason,
            usage={
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens or 0,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens or 0,
            },
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            ttft_ms=None if ttft is None else round(ttft, 2),
        )


def _translate_status(err: Any) -> CorralError:
    status = err.status_code
    body = err.body if isinstance(err.body, dict) else {}
    detail = body.get("error", {}).get("message") or err.message
    if status == 429 or status >= 500:
        retry_after = err.response.headers.get("retry-after")
        try:
            seconds = float(retry_after) if retry_after else None
        except ValueError:
            seconds = None
        return ModelUnavailable(f"Anthropic API {status}: {detail}", status=status, retry_after=seconds)
    if status in (401, 403):
        return PolicyDenied(f"Anthropic API {status}: {detail}", hint="check ANTHROPIC_API_KEY")
    return InvalidArgument(f"Anthropic API {status}: {detail}", hint="the request was refused; the session log shows what was sent")


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
                delay = min(self.max_delay_s, err.retry_after if err.retry_after is not None else self.base_s * 2 ** (attempt - 1))
                await self.on_retry(err, attempt, delay)
                await anyio.sleep(delay)
                attempt += 1
                continue
            response.attempts = attempt
            return response
