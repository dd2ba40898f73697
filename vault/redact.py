"""Replace every copy of a stored secret with `[REDACTED]`.

What is found, for each secret:
- raw (UTF-8, UTF-16 LE/BE) and hex (any case);
- base64 / base64url at all three byte alignments, so the secret is found inside the base64
  of a larger string too (e.g. a `Basic` header of `user:secret`);
- whatever a JSON encoder or a URL encoder makes of it, because the text is also read the
  way their decoders read it (`views`): with JSON escapes undone (`\\uXXXX` in any mix and
  case, as Go's encoding/json writes `\\u0026` for `&` and PHP `\\/` for `/`), with
  `%XX` undone (encodeURIComponent, Java's URLEncoder, PHP's urlencode/rawurlencode, Python's
  quote: each leaves a different set of characters unescaped, and the view does not care
  which), with `+` read as a space as form encoders write it, and URL-encoding inside JSON.
Every form is matched ignoring ASCII case (a case variant of a secret is redacted too).
Not covered: double encodings (base64 of hex, ...), JSON inside URL-encoding, HTML entities.

Every secret of the vault is covered in every response, not only the one the request
injected: an upstream may echo any secret it has ever been sent (by another credential,
another client, an earlier request) or hold one itself (a token API, a secrets store).
That costs nothing per secret: all forms of all secrets go into one Aho-Corasick automaton
(`ahocorasick_rs`, Rust, leftmost-longest, the GIL released while it scans), so a scan costs
the length of the text, not the number of credentials. (`pyahocorasick`'s leftmost-longest
`iter_long` misses matches - a fuzz against `re` found some in 1 of 700 inputs - and its
overlapping `iter` enumerates every match in Python.) Building the automaton is paid once per
vault change, off the event loop (`Proxy.snapshot`).
"""

from __future__ import annotations

import base64
import bisect
import builtins  # `Redactor.bytes` shadows the type in the class body
import json
import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus

from ahocorasick_rs import BytesAhoCorasick, MatchKind

__all__ = ["MARK", "RedactingFilter", "Redactor", "secret_forms"]

MARK = b"[REDACTED]"


def _b64_cores(raw: bytes) -> set[bytes]:
    """The part of base64(prefix + raw + suffix) that depends only on raw, for each alignment."""
    cores: set[bytes] = set()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\0" * shift + raw)
            start = (8 * shift + 5) // 6  # first char whose 6 bits all come from `raw`
            end = (8 * (shift + len(raw))) // 6  # last char with all 6 bits known
            core = enc[start:end]
            if len(core) >= 6:
                cores.add(core)
    return cores


def matched_forms(secret: str) -> set[bytes]:
    """What the automaton holds for one secret (lower case); the views supply JSON and URL forms."""
    raw = secret.encode()
    forms = {raw, secret.encode("utf-16-le"), secret.encode("utf-16-be"), raw.hex().encode()} | _b64_cores(raw)
    return {f.lower() for f in forms}


def secret_forms(secret: str) -> tuple[set[bytes], set[bytes]]:
    """(case-sensitive, case-insensitive) literal forms of one secret that common encoders write.

    What tests search outputs for; the redactor covers all of them (and any mix) through views.
    """
    raw = secret.encode()
    as_json = json.dumps(secret)[1:-1]
    go_json = as_json.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    # JSON may also escape "/" as "\/" (PHP, some Java encoders) and "'" as \u0027; json.dumps never does.
    exact = {
        raw,
        secret.encode("utf-16-le"),
        secret.encode("utf-16-be"),
        as_json.encode(),
        as_json.replace("/", "\\/").encode(),
        go_json.encode(),
        go_json.replace("'", "\\u0027").encode(),
    }
    exact |= _b64_cores(raw)
    folded = {quote(secret, safe="").encode(), quote_plus(secret).encode(), quote(secret).encode(), raw.hex().encode()}
    folded |= {
        quote(secret, safe="-_.!~*'()").encode(),
        quote_plus(secret, safe="*").replace("~", "%7E").encode(),
        quote_plus(secret, safe="").replace("~", "%7E").encode(),
    }
    return exact, folded


ANCHOR = 16  # bytes of each form the automaton holds (see `Redactor`)


class View:
    """`data` as a decoder reads it, with each escape undone, and the way back to the original offsets."""

    def __init__(
        self,
        data: bytes,
        escapes: re.Pattern[bytes] | None = None,
        decode: Callable[[bytes], bytes] | None = None,
        parent: View | None = None,
    ) -> None:
        self.parent = parent
        # per escape: where its decoded bytes start and end in this view, where it was in the parent
        self.vstart: list[int] = []
        self.vend: list[int] = []
        self.ostart: list[int] = []
        self.oend: list[int] = []
        if escapes is None or decode is None:
            self.data = data
            return
        pieces, last, at = [], 0, 0
        for m in escapes.finditer(data):
            start, end = m.span()
            pieces.append(data[last:start])
            at += start - last
            decoded = decode(m.group())
            pieces.append(decoded)
            self.vstart.append(at)
            at += len(decoded)
            self.vend.append(at)
            self.ostart.append(start)
            self.oend.append(end)
            last = end
        pieces.append(data[last:])
        self.data = b"".join(pieces)

    def start(self, at: int) -> int:
        """Offset in the original text of the byte at `at` here (the escape's start if inside one)."""
        i = bisect.bisect_right(self.vstart, at) - 1
        out = at if i < 0 else self.ostart[i] if at < self.vend[i] else self.oend[i] + at - self.vend[i]
        return self.parent.start(out) if self.parent else out

    def end(self, at: int) -> int:
        """Original offset just past the byte before `at` here (an escape's end if inside one)."""
        last = at - 1
        i = bisect.bisect_right(self.vstart, last) - 1
        out = at if i < 0 else self.oend[i] if last < self.vend[i] else self.oend[i] + at - self.vend[i]
        return self.parent.end(out) if self.parent else out


_JSON_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\[\"\\/bfnrt]"
)
_JSON_SIMPLE = {
    b'\\"': b'"',
    b"\\\\": b"\\",
    b"\\/": b"/",
    b"\\b": b"\b",
    b"\\f": b"\f",
    b"\\n": b"\n",
    b"\\r": b"\r",
    b"\\t": b"\t",
}
_PERCENT = re.compile(rb"%[0-9a-fA-F]{2}")
_PERCENT_PLUS = re.compile(rb"%[0-9a-fA-F]{2}|\+")


def _json_unescape(escape: bytes) -> bytes:
    if len(escape) == 2:
        return _JSON_SIMPLE[escape]
    code = int(escape[2:6], 16)
    if len(escape) == 12:  # a surrogate pair: one character outside the BMP
        code = 0x10000 + ((code - 0xD800) << 10) + (int(escape[8:12], 16) - 0xDC00)
    return chr(code).encode("utf-8", "surrogatepass")


def _percent_unescape(escape: bytes) -> bytes:
    return b" " if escape == b"+" else bytes([int(escape[1:], 16)])


def views(data: bytes, plus: bool) -> list[View]:
    """The text as sent, as a JSON decoder reads it, and as a URL decoder reads either of those.

    A view is built only where it can differ (a backslash, a percent sign); `plus` (some
    secret has a space) adds the form-encoding reading of `+`.
    """
    out = [View(data)]
    if b"\\" in data:
        out.append(View(data, _JSON_ESCAPE, _json_unescape))
    if b"%" in data or (plus and b"+" in data):
        for base in list(out):
            out.append(View(base.data, _PERCENT, _percent_unescape, base))
            if plus:
                out.append(View(base.data, _PERCENT_PLUS, _percent_unescape, base))
    return out


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping spans joined (two matchers may find overlapping copies)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def replace(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """`data` with each (merged) span replaced by MARK."""
    if not spans:
        return data
    parts: list[bytes] = []
    last = 0
    for start, end in spans:
        parts += (data[last:start], MARK)
        last = end
    parts.append(data[last:])
    return b"".join(parts)


class Redactor:
    """All forms of a set of secrets, found in one pass per view of the text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        secrets = list(secrets)
        # The automaton holds only the first ANCHOR bytes of each form (its build time grows with
        # the bytes it holds: 1,000 secrets' full forms took ~200 ms, their anchors a quarter of
        # that). Every occurrence of an anchor is found (overlapping search) and redacted as far
        # as the longest form it starts: a superset of every full copy, plus the rare text that
        # begins like an encoded secret and then differs - redacting it too costs nothing.
        reach: dict[bytes, int] = {}
        for secret in secrets:
            for form in matched_forms(secret):
                reach[form[:ANCHOR]] = max(reach.get(form[:ANCHOR], 0), len(form))
        anchors = sorted(reach)
        self._reach = [reach[a] for a in anchors]
        self._matcher = BytesAhoCorasick(anchors, matchkind=MatchKind.Standard) if anchors else None
        self._plus = any(" " in secret for secret in secrets)
        # the most bytes one copy can take in a text: every byte as a \\u00XX of a %XX
        self.longest = 18 * max((len(secret.encode()) for secret in secrets), default=0)

    def __bool__(self) -> bool:
        return self._matcher is not None

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where copies of secrets are in `data` (byte offsets, merged)."""
        if self._matcher is None:
            return []
        found: list[tuple[int, int]] = []
        for view in views(data, self._plus):
            hits = self._matcher.find_matches_as_indexes(
                view.data.lower(), overlapping=True
            )  # ASCII folding: offsets stay put
            size = len(view.data)
            found += [(view.start(s), view.end(min(size, s + self._reach[i]))) for i, s, _ in hits]
        return merge(found)

    def bytes(self, data: bytes) -> bytes:
        return replace(data, self.spans(data))

    def capped(self, data: builtins.bytes, cap: int) -> builtins.bytes:
        """The first `cap` bytes of `data`, redacted, cut where the ORIGINAL text is cut.

        Cutting after redaction would let the shortened text pull in bytes from past the
        window, and the cut could land inside a copy that was never matched. Here a copy
        that starts before the cut is found whole in `data` (the caller reads `longest`
        bytes more than `cap`) and is replaced whole, even where it runs past the cut.
        """
        spans = [span for span in self.spans(data) if span[0] < cap]
        end = max(cap, spans[-1][1]) if spans else cap
        return replace(data[:end], spans)

    def text(self, text: str) -> str:
        if self._matcher is None:
            return text
        return self.bytes(text.encode("utf-8", "surrogatepass")).decode("utf-8", "replace")


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and traceback) through the redactor before any handler sees it."""

    def __init__(self, redactor_source) -> None:
        super().__init__()
        self.source = redactor_source  # () -> Redactor: the current set of secrets

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.source()
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = redactor.text(message)
        record.args = None
        return True
