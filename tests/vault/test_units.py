"""The vault's pure parts: host normalisation and matching, redaction forms, deadlines, the file keyring."""

from __future__ import annotations

import base64
import json
import threading
import time
from urllib.parse import quote, quote_plus

import keyring.errors
import pytest

from corral.errors import Timeout
from corral.vault.keyrings import (
    EncryptedFileKeyring,
    call_with_deadline,
    choose_backend,
)
from corral.vault.policy import Credential, host_matches, normalize_host
from corral.vault.redact import Redactor
from tests.credentials.encoders import ENCODERS, ODD_SECRET


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("API.Example.COM.", "api.example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("2852039166", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("169.254.43518", "169.254.169.254"),
        ("127.1", "127.0.0.1"),
        ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe"),
        ("[::1]", "::1"),
    ],
)
def test_normalize_host(raw, norm):
    assert normalize_host(raw) == norm


@pytest.mark.parametrize(
    "bad", ["", "a..b", "%61pi.com", "a_b.com", "fe80::1%eth0", "a.com/x", "user@a.com", "1.2.3.256", "-a.com"]
)
def test_normalize_host_refuses(bad):
    with pytest.raises(ValueError):
        normalize_host(bad)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("api.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("evilexample.com", False),
        ("example.com.evil", False),
        ("api.example.com.evil.net", False),
    ],
)
def test_wildcard_matching(host, ok):
    cred = Credential(name="w", hosts=["*.example.com", "exact.org"])
    assert host_matches(host, cred.hosts) is ok
    assert host_matches("exact.org", cred.hosts) and not host_matches("sub.exact.org", cred.hosts)


SECRET = "s3cr3t-Value_with/odd+chars=="


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "user:", "Bearer "])
def test_redactor_finds_base64_at_every_alignment(prefix):
    r = Redactor([SECRET])
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode((prefix + SECRET + "tail").encode()).decode()
        out = r.text(f"x {text} y")
        assert "[REDACTED]" in out
        # what is left around the mark encodes the prefix and suffix, plus at most 2 bytes of the secret each side
        left = len(out) - len("x  y") - len("[REDACTED]")
        assert left <= len(encode((prefix + "tail").encode())) + 6


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        quote(SECRET, safe=""),
        quote_plus(SECRET),
        quote(SECRET, safe="").lower(),
        SECRET.encode().hex(),
        SECRET.encode().hex().upper(),
        '"' + SECRET.replace("/", "\\/") + '"',
    ],
)
def test_redactor_forms(form):
    assert SECRET not in Redactor([SECRET]).text(f"<{form}>")
    assert "[REDACTED]" in Redactor([SECRET]).text(f"<{form}>")


def test_redactor_leaves_ordinary_text_alone_and_handles_bytes():
    r = Redactor([SECRET])
    assert r.text("nothing to see here, 12345678") == "nothing to see here, 12345678"
    assert r.bytes(b"\x00\xff" + SECRET.encode() + b"\x00") == b"\x00\xff[REDACTED]\x00"
    assert r.bytes(SECRET.encode("utf-16-le")) == b"[REDACTED]"
    assert not Redactor() and Redactor().text(SECRET) == SECRET


def test_call_with_deadline_times_out_without_hanging():
    start = time.monotonic()
    with pytest.raises(Timeout):
        call_with_deadline(lambda: time.sleep(30), 0.2, "get")
    assert time.monotonic() - start < 2
    assert call_with_deadline(lambda: 42, 1, "get") == 42
    with pytest.raises(KeyError):
        call_with_deadline(lambda: {}["x"], 1, "get")


def test_encrypted_file_keyring_through_keyrings_interface(tmp_path):
    ring = EncryptedFileKeyring(tmp_path)
    assert ring.get_password("corral", "a") is None
    ring.set_password("corral", "a", "secret-one-1234")
    assert EncryptedFileKeyring(tmp_path).get_password("corral", "a") == "secret-one-1234"
    with pytest.raises(keyring.errors.PasswordDeleteError):
        ring.delete_password("corral", "missing")
    ring.delete_password("corral", "a")
    assert ring.get_password("corral", "a") is None
    assert (tmp_path / "keyring.key").stat().st_mode & 0o777 == 0o600


def test_encrypted_file_keyring_concurrent_writers_lose_nothing(tmp_path):
    ring = EncryptedFileKeyring(tmp_path)
    threads = [
        threading.Thread(target=ring.set_password, args=("corral", f"k{i}", f"value-{i:08d}")) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ring.get_password("corral", f"k{i}") == f"value-{i:08d}" for i in range(16))


def test_auto_choice_without_dbus_is_the_encrypted_file(tmp_path):
    choice = choose_backend("auto", tmp_path, 2, None)
    assert choice.name == "encrypted-file" and not choice.insecure and "DBUS_SESSION_BUS_ADDRESS unset" in choice.why
    null = choose_backend("null", tmp_path, 2, None)
    assert null.insecure and "names it" in null.why


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("secret", [ODD_SECRET, "plain-secret-0123456789", "a&b<c>d'e*f~g!h(i)j k"])
def test_redactor_covers_what_real_encoders_write(encoder, secret):
    encoded = ENCODERS[encoder](secret)
    out = Redactor([secret]).text(f"before {encoded} after")
    assert "[REDACTED]" in out and out.startswith("before ") and out.endswith(" after"), out
    assert encoded not in out
    # nothing of the secret is left: no 6 consecutive characters of it, in the encoder's form either
    for n in range(len(secret) - 5):
        piece = secret[n : n + 6]
        assert piece not in out and ENCODERS[encoder](piece).strip('"') not in out, (piece, out)


def _leaks(secret_form: bytes, out: bytes, shortest: int = 5) -> list[bytes]:
    """Prefixes of `secret_form` longer than a few bytes that are in `out`."""
    return [secret_form[:n] for n in range(shortest, len(secret_form) + 1) if secret_form[:n] in out]


@pytest.mark.parametrize("form", ["raw", "json", "url", "basic"])
def test_cap_never_exposes_part_of_a_secret_at_any_cut(form):
    """Copies before the cut shorten the redacted text; the cut is still made where the
    original is cut, so whatever lands on it is redacted whole (every cut point is tried)."""
    secret = "sk-live-" + "Zq8xW2vLm9Tr4pKc7Ye1Nd5Hg3Bf6Js0"  # 40 characters, as in the report
    encoded = {
        "raw": secret.encode(),
        "json": json.dumps(secret + "/&").encode(),
        "url": quote(secret + " ?&=", safe="").encode(),
        "basic": base64.b64encode(f"x-access-token:{secret}".encode()),
    }[form]
    r = Redactor([secret])
    data = b"head " + b" ".join([encoded] * 60) + b" tail" * 20  # 60 copies shorten the text by more than `longest`
    # the secret's own bytes in the encoding (for basic: after the 20 base64 characters of "x-access-token:")
    checked = {encoded[20:] if form == "basic" else encoded.strip(b'"'), secret.encode()}
    for cap in range(1, len(data) - 90, 7 if form == "url" else 3):
        out = r.capped(data[: cap + r.longest], cap)
        assert out.startswith(data[: min(cap, 5)])
        for piece in checked:
            assert not _leaks(piece, out), (cap, out[-60:])


def test_secrets_sharing_a_long_prefix_are_each_redacted_whole():
    """The automaton holds the first bytes of each form; two secrets that begin alike are still
    each redacted to their own end, in every form, side by side and overlapping."""
    short, long = "sk-proj-AAAAAAAAAAAA-one", "sk-proj-AAAAAAAAAAAA-and-a-much-longer-second-secret"
    r = Redactor([short, long])
    for text in (
        f"{short} {long}",
        f"{long}{short}",
        base64.b64encode(f"u:{long}".encode()).decode(),
        long.encode().hex(),
        quote(long, safe=""),
    ):
        out = r.text(f"<{text}>")
        assert "[REDACTED]" in out and "second" not in out and "AAAAAAAA" not in out, out
        assert "7365636f6e64" not in out  # "second" in hex
