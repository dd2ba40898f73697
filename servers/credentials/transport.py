"""An httpx transport that connects only to addresses the proxy has checked.

The request URL keeps its host name (so Host and TLS SNI/certificate checks are right);
the network backend ignores the name and dials the IP that `netguard` pinned for this
(host, port) in the current task. A connection nothing pinned is refused: fail closed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator

import httpcore
import httpx

__all__ = ["LoopbackOnly", "PinnedTransport", "pinned"]

_PINS: contextvars.ContextVar[dict[tuple[str, int], str] | None] = contextvars.ContextVar("corral_pins", default=None)


@contextlib.contextmanager
def pinned(host: str, port: int, ip: str) -> Iterator[None]:
    """Within this block (this task), connections to host:port go to `ip` and nowhere else."""
    token = _PINS.set({(host, port): ip})
    try:
        yield
    finally:
        _PINS.reset(token)


class PinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pins = _PINS.get() or {}
        ip = pins.get((host.lower().rstrip("."), port))
        if ip is None:
            raise httpcore.ConnectError(f"refusing to connect to {host}:{port}: no checked address pinned")
        return await self.inner.connect_tcp(
            ip, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an upstream")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class LoopbackOnly(httpcore.AsyncNetworkBackend):
    """A connector for tests and benchmarks: dials loopback only and records every attempt."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.attempts: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.attempts.append((host, port))
        if host not in ("127.0.0.1", "::1"):
            raise httpcore.ConnectError(f"test connector: {host} is not loopback")
        return await self.inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _map_error(
    err: httpcore.TimeoutException | httpcore.NetworkError | httpcore.ProtocolError | httpcore.UnsupportedProtocol,
) -> httpx.TransportError:
    if isinstance(err, httpcore.TimeoutException):
        return httpx.TimeoutException(str(err))
    if isinstance(err, httpcore.ConnectError):
        return httpx.ConnectError(str(err))
    if isinstance(err, httpcore.ProtocolError):
        return httpx.RemoteProtocolError(str(err))
    return httpx.TransportError(str(err))


_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self.inner:
                yield part
        except _ERRORS as err:
            raise _map_error(err) from None

    async def aclose(self) -> None:
        await self.inner.aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """httpx -> httpcore, with the pinning network backend; no proxies, no env."""

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or ssl.create_default_context(),
            max_connections=50,
            max_keepalive_connections=10,
            keepalive_expiry=30.0,
            network_backend=PinnedBackend(inner or httpcore.AnyIOBackend()),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        req = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            resp = await self._pool.handle_async_request(req)
        except _ERRORS as err:
            raise _map_error(err) from None
        return httpx.Response(
            status_code=resp.status, headers=resp.headers, stream=_Stream(resp.stream), extensions=resp.extensions
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
