"""Replace every copy of a stored secret with `[REDACTED]`.

Forms covered, for each secret: raw (UTF-8, UTF-16), JSON-escaped, URL-encoded (quote,
quote_plus, any case of the escapes), hex (any case), and base64 / base64url at all three
byte alignments, so the secret is found inside the base64 of a larger string too (e.g. a
`Basic` header of `user:secret`). Double encodings (base64 of hex, ...) are not covered.

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
import json
import logging
from collections.abc import Iterable
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


def secret_forms(secret: str) -> tuple[set[bytes], set[bytes]]:
    """(case-sensitive forms, case-insensitive forms) of one secret."""
    raw = secret.encode()
    as_json = json.dumps(secret)[1:-1]
    # JSON may also escape "/" as "\/" (PHP, some Java encoders); json.dumps never does.
    exact = {raw, secret.encode("utf-16-le"), secret.encode("utf-16-be"), as_json.encode(), as_json.replace("/", "\\/").encode()}
    exact |= _b64_cores(raw)
    folded = {quote(secret, safe="").encode(), quote_plus(secret).encode(), quote(secret).encode(), raw.hex().encode()}
    return exact, folded


def _matcher(forms: Iterable[bytes]) -> BytesAhoCorasick | None:
    patterns = sorted(set(forms))
    return BytesAhoCorasick(patterns, matchkind=MatchKind.LeftmostLongest) if patterns else None


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
    parts, last = [], 0
    for start, end in spans:
        parts += (data[last:start], MARK)
        last = end
    parts.append(data[last:])
    return b"".join(parts)


class Redactor:
    """All forms of a set of secrets, found in one pass per case (exact, and ASCII-case-folded)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        exact: set[bytes] = set()
        folded: set[bytes] = set()
        for secret in secrets:
            e, f = secret_forms(secret)
            exact |= e
            folded |= {x.lower() for x in f}
        self._exact = _matcher(exact)
        self._folded = _matcher(folded)
        self.longest = max((len(f) for f in exact | folded), default=0)

    def __bool__(self) -> bool:
        return self._exact is not None

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where copies of secrets are in `data` (byte offsets, merged)."""
        if self._exact is None:
            return []
        found = [(s, e) for _, s, e in self._exact.find_matches_as_indexes(data)]
        if self._folded is not None:  # bytes.lower() folds ASCII only: offsets stay put
            found += [(s, e) for _, s, e in self._folded.find_matches_as_indexes(data.lower())]
        return merge(found)

    def bytes(self, data: bytes) -> bytes:
        return replace(data, self.spans(data))

    def text(self, text: str) -> str:
        if self._exact is None:
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
