"""Replace every copy of a stored secret with `[REDACTED]`.

Forms covered, for each secret: raw (UTF-8, UTF-16), JSON-escaped, URL-encoded (quote,
quote_plus, any case of the escapes), hex (any case), and base64 / base64url at all three
byte alignments, so the secret is found inside the base64 of a larger string too (e.g. a
`Basic` header of `user:secret`). Double encodings (base64 of hex, ...) are not covered.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

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


def _alternation(forms: Iterable[bytes]) -> bytes:
    return b"|".join(re.escape(f) for f in sorted(set(forms), key=len, reverse=True))


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        exact: set[bytes] = set()
        folded: set[bytes] = set()
        for secret in secrets:
            e, f = secret_forms(secret)
            exact |= e
            folded |= f
        self._exact = re.compile(_alternation(exact)) if exact else None
        self._folded = re.compile(_alternation(folded), re.IGNORECASE) if folded else None
        self.longest = max((len(f) for f in exact | folded), default=0)

    def __bool__(self) -> bool:
        return self._exact is not None

    def bytes(self, data: bytes) -> bytes:
        if self._exact is None:
            return data
        data = self._exact.sub(MARK, data)
        return self._folded.sub(MARK, data) if self._folded else data

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
