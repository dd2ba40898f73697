"""What real encoders write for a string: JSON (Python, Go, PHP, any mix of \\uXXXX) and URL
encoding (encodeURIComponent, Java URLEncoder, PHP urlencode/rawurlencode, any mix of %XX).

Each is written from the encoder's documented character set, so a test can hand the
redactor exactly what that encoder would put on the wire.
"""

from __future__ import annotations

import json
import random
import re
from urllib.parse import quote, quote_plus

# & < > ' * ~ ! ( ) space / + " \ and non-ASCII (BMP and beyond): every character an encoder treats specially
ODD_SECRET = "s3cr&t<x>'q*~!(p) a/b+c\"d\\é€😀-z"


def go_json(s: str) -> str:
    """encoding/json: non-ASCII raw, `<`, `>`, `&`, U+2028/9 as \\u escapes (lower-case hex)."""
    out = json.dumps(s, ensure_ascii=False)
    for ch in "&<>\u2028\u2029":
        out = out.replace(ch, f"\\u{ord(ch):04x}")
    return out


def php_json(s: str) -> str:
    """json_encode with JSON_HEX_TAG|JSON_HEX_AMP|JSON_HEX_APOS|JSON_HEX_QUOT: upper-case hex, `\\/`."""
    out = json.dumps(s).replace("/", "\\/")
    for ch in "<>&'":
        out = out.replace(ch, f"\\u{ord(ch):04X}")
    return out.replace('\\"', "\\u0022")


def mixed_json(s: str, seed: int) -> str:
    """Any character as \\uXXXX (random case) or literal, as a hand-rolled encoder may write."""
    rng = random.Random(seed)
    out = []
    for ch in s:
        units = [ch]
        if ord(ch) >= 0x10000:
            hi, lo = divmod(ord(ch) - 0x10000, 0x400)
            units = [chr(0xD800 + hi), chr(0xDC00 + lo)]
        if rng.random() < 0.5 or ch in '"\\' or len(units) == 2:
            hexes = ["".join(c.upper() if rng.random() < 0.5 else c for c in f"{ord(u):04x}") for u in units]
            out.append("".join(f"\\u{h}" for h in hexes))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def encode_uri_component(s: str) -> str:
    return quote(s, safe="-_.!~*'()")


def java_url_encoder(s: str) -> str:
    """URLEncoder.encode(s, UTF_8): keeps a-zA-Z0-9 . - * _, space as +, `~` escaped."""
    return quote_plus(s, safe="*").replace("~", "%7E")


def php_urlencode(s: str) -> str:
    """urlencode: keeps a-zA-Z0-9 - _ ., space as +, everything else escaped."""
    return quote_plus(s, safe="").replace("~", "%7E")


def php_rawurlencode(s: str) -> str:
    return quote(s, safe="-_.~")


def lower_hex(encoded: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)


def mixed_percent(s: str, seed: int) -> str:
    """Each byte escaped or not at random (where legal), escapes in random case."""
    rng = random.Random(seed)
    out = []
    for b in s.encode():
        if chr(b).isalnum() and b < 128 and rng.random() < 0.5:
            out.append(chr(b))
        else:
            esc = f"%{b:02x}"
            out.append(esc.upper() if rng.random() < 0.5 else esc)
    return "".join(out)


ENCODERS = {
    "python json": json.dumps,
    "python json, no ascii escapes": lambda s: json.dumps(s, ensure_ascii=False),
    "go encoding/json": go_json,
    "php json_encode (HEX flags)": php_json,
    "json, random \\u mix 1": lambda s: mixed_json(s, 1),
    "json, random \\u mix 2": lambda s: mixed_json(s, 2),
    "encodeURIComponent": encode_uri_component,
    "java URLEncoder": java_url_encoder,
    "php urlencode": php_urlencode,
    "php rawurlencode": php_rawurlencode,
    "lower-case %xx": lambda s: lower_hex(encode_uri_component(s)),
    "random %xx mix": lambda s: mixed_percent(s, 3),
    "encodeURIComponent inside go json": lambda s: go_json("next=" + encode_uri_component(s)),
    "php urlencode inside php json": lambda s: php_json("q=" + php_urlencode(s)),
}
