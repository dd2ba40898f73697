"""The credential proxy: a plain object the MCP tools (and the git gateway) call.

`http_request` = check (policy, URL, headers, body) -> resolve and check the address ->
inject the secret -> send to the pinned address, never following redirects -> read the
response within caps -> redact -> audit. Every error leaving this module is redacted.
"""

from __future__ import annotations

import base64
import bisect
import json as jsonlib
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import anyio
import httpcore
import httpx

from corral.errors import CorralError, InvalidArgument, NotFound, Timeout, Unavailable
from corral.servers.credentials.audit import AuditLog, monotonic_ms
from corral.servers.credentials.netguard import (
    Resolver,
    SystemResolver,
    Target,
    check_policy,
    has_ctl,
    parse_target,
    resolve_checked,
)
from corral.servers.credentials.results import (
    CredentialInfo,
    CredentialPage,
    HttpResult,
)
from corral.servers.credentials.transport import PinnedTransport, pinned
from corral.vault.config import VaultSettings
from corral.vault.policy import TOKEN, Credential
from corral.vault.redact import Redactor
from corral.vault.store import Vault

__all__ = ["Proxy", "Snapshot", "Snapshots", "read_redacted"]

log = logging.getLogger("corral.credentials")
# Headers a client may not set: they would change where or how the request goes.
FORBIDDEN = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "expect",
}
DECODABLE = {"", "identity", "gzip", "x-gzip", "deflate"}  # encodings we decode (and so can redact inside)
PIECE = 64 * 1024  # most decoded bytes produced per step: a gzip bomb inflates no faster than we count
LIST_LIMIT, LIST_LIMIT_MAX = (
    25,
    500,
)  # list_credentials page: default, largest (a client validates each item against the schema: ~0.2-0.8 ms)
DROPPED_RESPONSE = {"content-encoding", "content-length", "transfer-encoding"}  # the body we return is decoded


@dataclass(frozen=True)
class Snapshot:
    """Policies and secrets as of one vault stamp (reloaded when `corral vault set/rm` runs)."""

    stamp: tuple[int, int]
    credentials: dict[str, Credential]
    secrets: dict[str, str]
    redactor: Redactor
    listing: list[CredentialInfo]  # what list_credentials shows, sorted by name, built once per reload
    names: list[str]  # the listing's names, for paging by cursor

    @classmethod
    def load(cls, vault: Vault) -> Snapshot:
        """One read of the policies, one keyring call for every secret, one redactor build."""
        stamp = vault.stamp()
        creds = {c.name: c for c in vault.list()}
        secrets = vault.secrets(creds.values())
        listing = [
            CredentialInfo(**c.public(), has_secret=c.name in secrets)
            for c in sorted(creds.values(), key=lambda c: c.name)
        ]
        return cls(stamp, creds, secrets, Redactor(secrets.values()), listing, [c.name for c in listing])

    def page(self, limit: int, cursor: str | None) -> CredentialPage:
        """`limit` credentials after the name `cursor`; `next_cursor` is set when more follow."""
        start = bisect.bisect_right(self.names, cursor) if cursor else 0
        items = self.listing[start : start + limit]
        more = start + limit < len(self.listing)
        return CredentialPage(
            credentials=items, next_cursor=items[-1].name if more and items else None, total=len(self.listing)
        )


class Snapshots:
    """The vault as of its last change, shared by every Proxy of one server: one read per change."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.current: Snapshot | None = None
        self._lock = threading.Lock()  # two threads noticing one change read the vault once

    def fresh(self) -> Snapshot | None:
        snap = self.current
        return snap if snap is not None and snap.stamp == self.vault.stamp() else None

    def get_sync(self) -> Snapshot:
        with self._lock:
            snap = self.fresh()
            if snap is None:
                snap = self.current = Snapshot.load(self.vault)
            return snap


class Proxy:
    def __init__(
        self,
        vault: Vault,
        settings: VaultSettings,
        resolver: Resolver | None = None,
        connector: httpcore.AsyncNetworkBackend | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.vault = vault
        self.settings = settings
        self.resolver = resolver or SystemResolver()
        self.connector = connector
        self.audit = AuditLog(vault.directory / "audit.jsonl")
        self.snapshots = snapshots or Snapshots(vault)  # shared with the git gateway's Proxy by `assemble`
        self._clients: dict[str, httpx.AsyncClient] = {}

    # -- vault snapshot -------------------------------------------------------------
    def snapshot_sync(self) -> Snapshot:
        return self.snapshots.get_sync()

    async def snapshot(self) -> Snapshot:
        snap = self.snapshots.fresh()
        if snap is not None:
            return snap
        # keyring calls block (with a deadline) and the redactor build is CPU work: off the event loop
        return await anyio.to_thread.run_sync(self.snapshot_sync)

    def redactor(self) -> Redactor:
        """The current redactor, without blocking on the keyring (logging filters use this)."""
        snap = self.snapshots.current
        return snap.redactor if snap else Redactor()

    def client(self, cred: Credential) -> httpx.AsyncClient:
        """One pool per credential and address policy: a pooled connection is reused only under the policy that checked it."""
        key = f"{cred.name}/{cred.allow_private}"
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                transport=PinnedTransport(self.connector),
                follow_redirects=False,
                trust_env=False,
                timeout=self.settings.proxy_timeout_s,
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # no state carried between callers
            )
            self._clients[key] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # -- tools ------------------------------------------------------------------------
    async def list_credentials(self, limit: int = LIST_LIMIT, cursor: str | None = None) -> CredentialPage:
        """One page of the credentials, by name; the listing is built once per vault change."""
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise InvalidArgument(f"limit must be between 1 and {LIST_LIMIT_MAX}")
        return (await self.snapshot()).page(limit, cursor)

    async def http_request(
        self,
        credential: str,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: str | None = None,
        json: Any = None,
        timeout_s: float | None = None,
        *,
        who: str = "unknown",
    ) -> HttpResult:
        start = time.monotonic()
        audit: dict[str, Any] = {
            "who": who,
            "credential": credential,
            "method": method,
            "host": None,
            "path": None,
            "status": None,
            "bytes": 0,
        }
        try:
            snap = await self.snapshot()
        except CorralError as err:  # the keyring failed: nothing was sent, and there is no secret to redact
            self.audit_line(None, audit, start, "error", err.kind)
            raise
        try:
            result = await self._request(snap, audit, credential, method, url, headers, body, json, timeout_s)
        except CorralError as err:
            self.audit_line(
                snap,
                audit,
                start,
                "denied" if err.kind in ("policy_denied", "invalid_argument", "not_found") else "error",
                err.kind,
            )
            raise type(err)(snap.redactor.text(err.message), hint=snap.redactor.text(err.hint)) from None
        except Exception:  # a bug: still one audit line; the MCP shell logs it (redacted) and reports `unavailable`
            self.audit_line(snap, audit, start, "error", "unexpected")
            raise
        self.audit_line(snap, audit, start, "ok", None)
        return HttpResult(**result)

    def audit_line(
        self, snap: Snapshot | None, audit: dict[str, Any], start: float, outcome: str, error: str | None
    ) -> None:
        audit.update(outcome=outcome, duration_ms=monotonic_ms(start))
        if error:
            audit["error"] = error
        self.audit.write(snap.redactor if snap else self.redactor(), **audit)
        log.info(
            "%r %r %s%s -> %s",
            audit["credential"],
            audit["method"],
            audit["host"] or "-",
            audit["path"] or "",
            audit["status"] or outcome,
        )

    async def prepare(
        self, snap: Snapshot, audit: dict, credential: str, method: str, url: str, headers: dict[str, str] | None
    ) -> tuple[Credential, Target, str, httpx.URL, dict[str, str]]:
        """Every check, then the secret: (credential, target, checked address, URL to send, headers to send)."""
        method = method.upper()
        if not TOKEN.match(method):
            raise InvalidArgument("the method must be an HTTP token such as GET or POST (no spaces, CR or LF)")
        target = parse_target(url)
        audit.update(method=method, host=target.host, path=target.path)
        cred = snap.credentials.get(credential)
        if cred is None:
            raise self._unknown(snap, credential)
        check_policy(cred, target, method)
        out_headers = clean_headers(headers or {}, cred)
        ip = await resolve_checked(target, self.resolver, cred.allow_private)
        secret = snap.secrets.get(cred.name)
        if secret is None:
            raise Unavailable(
                f"credential {cred.name!r} has no secret in the keyring",
                hint=f"run `corral vault set {cred.name}` again",
            )
        return cred, target, ip, inject(cred, secret, target, out_headers), out_headers

    async def _request(
        self,
        snap: Snapshot,
        audit: dict,
        credential: str,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        body: str | None,
        json: Any,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        timeout = check_timeout(timeout_s, self.settings.proxy_timeout_s)
        headers = dict(headers or {})
        content = encode_body(body, json, headers, self.settings.proxy_max_request_bytes)
        cred, target, ip, send_url, out_headers = await self.prepare(snap, audit, credential, method, url, headers)
        try:
            with anyio.fail_after(timeout), pinned(target.pin_host, target.port, ip):
                async with self.client(cred).stream(
                    audit["method"], send_url, headers=out_headers, content=content, timeout=timeout
                ) as resp:
                    audit["status"] = resp.status_code
                    result = await read_response(resp, snap.redactor, self.settings)
        except TimeoutError:
            raise Timeout(
                f"{target.host} did not answer within {timeout:g}s", hint="retry, or pass a larger timeout_s"
            ) from None
        except httpx.TimeoutException as err:
            raise Timeout(f"{target.host} timed out: {err}", hint="retry, or pass a larger timeout_s") from None
        except httpx.HTTPError as err:
            raise Unavailable(f"request to {target.host}:{target.port} failed: {type(err).__name__}: {err}") from None
        audit["bytes"] = result["body_bytes"]
        return result

    @staticmethod
    def _unknown(snap: Snapshot, name: str) -> CorralError:
        known = ", ".join(sorted(snap.credentials)) or "none"
        return NotFound(
            f"no credential named {name!r}", hint=f"known credentials: {known}; list_credentials shows them"
        )


def check_timeout(timeout_s: float | None, default: float) -> float:
    if timeout_s is None:
        return default
    if not 0 < timeout_s <= 600:
        raise InvalidArgument("timeout_s must be > 0 and <= 600")
    return float(timeout_s)


def clean_headers(headers: dict[str, str], cred: Credential) -> dict[str, str]:
    """The client's headers, minus the credential's own header (replaced, never passed through)."""
    injected = cred.injected_header()
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(value, str) or not TOKEN.match(name):
            raise InvalidArgument(f"header name {name!r} is not an HTTP token (CR, LF, spaces and ':' are refused)")
        if has_ctl(value.replace("\t", " ")):
            raise InvalidArgument(f"header {name!r} has CR, LF or another control character in its value")
        if not value.isascii():
            raise InvalidArgument(f"header {name!r} has non-ASCII characters; percent-encode or base64 them")
        lower = name.lower()
        if lower in FORBIDDEN:
            raise InvalidArgument(f"header {name!r} is set by the proxy, not the client")
        if lower == injected or lower == "accept-encoding":
            continue
        out[name] = value
    out["Accept-Encoding"] = "gzip, deflate"  # only what we can decode, and so redact inside
    return out


def encode_body(body: str | None, json: Any, headers: dict[str, str], cap: int) -> bytes | None:
    if body is not None and json is not None:
        raise InvalidArgument("pass body or json, not both")
    if json is not None:
        content = jsonlib.dumps(json).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif body is not None:
        content = body.encode()
    else:
        return None
    if len(content) > cap:
        raise InvalidArgument(
            f"the request body is {len(content)} bytes; the cap is {cap} (CORRAL_PROXY_MAX_REQUEST_BYTES)",
            hint="send a smaller body",
        )
    return content


def inject(cred: Credential, secret: str, target: Target, headers: dict[str, str]) -> httpx.URL:
    """Add the secret per the policy's kind; returns the URL to send (query kind changes it)."""
    if cred.kind == "bearer":
        headers["Authorization"] = f"Bearer {secret}"
    elif cred.kind in ("basic", "git"):
        token = base64.b64encode(f"{cred.username or ''}:{secret}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif cred.kind == "header":
        headers[cred.header or ""] = cred.template.replace("{secret}", secret)
    elif cred.kind == "query":
        return target.url.copy_set_param(cred.query_param or "", secret)
    return target.url


async def read_response(resp: httpx.Response, redactor: Redactor, settings: VaultSettings) -> dict[str, Any]:
    """Status, redacted headers, and the body: decoded, capped, redacted, with totals.

    Reading awaits the network; decoding and redacting are CPU work and run in a worker
    thread (`anyio.to_thread`), so one large response never stalls the server's other calls.
    """
    encoding = resp.headers.get("content-encoding", "").strip().lower()
    encodings = [e.strip() for e in encoding.split(",") if e.strip() not in ("", "identity")]
    headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in DROPPED_RESPONSE]
    result: dict[str, Any] = {"status": resp.status_code}
    if len(encodings) > 1 or not set(encodings) <= DECODABLE:
        # Compressed in a way we cannot decode means we cannot redact inside: withhold it.
        result["headers"] = redact_headers(headers, redactor)
        result.update(
            body="",
            body_encoding="text",
            body_bytes=0,
            truncated=True,
            body_withheld=f"content-encoding {encoding!r} cannot be decoded for redaction",
        )
        return result
    cap, keep = settings.proxy_max_response_bytes, settings.proxy_max_response_bytes + redactor.longest
    buf, total, exact = bytearray(), 0, True
    async for chunk in decoded(resp, encodings[0] if encodings else ""):
        total += len(chunk)
        if len(buf) < keep:
            buf += chunk[: keep - len(buf)]
        if total >= settings.proxy_drain_bytes:
            exact = False  # stop reading: a bottomless (or gzip-bomb) body is counted up to here
            break
    truncated = total > cap
    # whole buffer at once: a secret split across chunks is still found
    body, result["headers"] = await anyio.to_thread.run_sync(_finish, bytes(buf), cap, truncated, headers, redactor)
    result.update(body, body_bytes=total, body_bytes_exact=exact, truncated=truncated)
    return result


async def read_redacted(resp: httpx.Response, redactor: Redactor, limit: int) -> bytes:
    """The whole body, decoded and redacted (in a worker thread); Unavailable past `limit` bytes or
    in an encoding we cannot decode (and so cannot redact inside)."""
    encoding = resp.headers.get("content-encoding", "").strip().lower().replace("identity", "")
    if encoding not in DECODABLE:
        raise Unavailable(f"the upstream's content-encoding {encoding!r} cannot be decoded for redaction; withheld")
    buf = bytearray()
    async for chunk in decoded(resp, encoding):
        buf += chunk
        if len(buf) > limit:
            raise Unavailable(
                f"the upstream's answer is over {limit} bytes (CORRAL_PROXY_DRAIN_BYTES); too large to redact"
            )
    return await anyio.to_thread.run_sync(redactor.bytes, bytes(buf))


def redact_headers(headers: list[tuple[str, str]], redactor: Redactor) -> list[list[str]]:
    return [[redactor.text(k), redactor.text(v)] for k, v in headers]


def _finish(
    buf: bytes, cap: int, truncated: bool, headers: list[tuple[str, str]], redactor: Redactor
) -> tuple[dict[str, Any], list[list[str]]]:
    """The CPU half of `read_response` (runs in a worker thread)."""
    data = redactor.capped(buf, cap) if truncated else redactor.bytes(buf)
    return _body(data, truncated), redact_headers(headers, redactor)


async def decoded(resp: httpx.Response, encoding: str) -> AsyncIterator[bytes]:
    """The body decoded in pieces of at most PIECE bytes (httpx would inflate a whole raw chunk at once).

    Each piece is inflated in a worker thread: a gzip bomb is CPU work, not event-loop work.
    """
    if not encoding:
        async for raw in resp.aiter_raw():
            yield raw
        return
    inflater: zlib._Decompress | None = None
    async for raw in resp.aiter_raw():
        if inflater is None:  # deflate is zlib-wrapped by the RFC, raw in practice (0x78 starts a zlib header)
            wbits = (
                16 + zlib.MAX_WBITS
                if encoding != "deflate"
                else zlib.MAX_WBITS
                if raw[:1] == b"\x78"
                else -zlib.MAX_WBITS
            )
            inflater = zlib.decompressobj(wbits)
        data = raw
        try:
            while data:
                yield await anyio.to_thread.run_sync(inflater.decompress, data, PIECE)
                data = inflater.unconsumed_tail
        except zlib.error as err:
            raise Unavailable(f"the upstream's {encoding} body does not decode: {err}") from None
    if inflater is not None:
        yield inflater.flush()


def _body(data: bytes, truncated: bool) -> dict[str, Any]:
    try:
        return {"body": data.decode("utf-8"), "body_encoding": "text"}
    except UnicodeDecodeError as err:
        if truncated and err.start >= len(data) - 3:  # a character cut by the cap
            return {"body": data[: err.start].decode("utf-8", "replace"), "body_encoding": "text"}
    return {"body": base64.b64encode(data).decode(), "body_encoding": "base64"}
