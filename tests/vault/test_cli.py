"""`corral vault set|list|rm|doctor` through the real CLI, on this headless machine."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time

import pytest

SECRET = "ghp_Cli-Test-Secret-0123456789"


def stored_files(cli) -> bytes:
    return b"".join(p.read_bytes() for p in cli.vault_dir.iterdir() if p.is_file())


def test_set_list_rm_roundtrip_never_shows_the_value(cli):
    done = cli.sub(
        "set",
        "gh",
        "--host",
        "api.github.com",
        "--host",
        "*.githubusercontent.com",
        "--method",
        "post",
        "--description",
        "GitHub",
        stdin=SECRET + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr

    listed = cli("list")
    assert (
        listed.returncode == 0
        and "gh" in listed.stdout
        and "api.github.com" in listed.stdout
        and SECRET not in listed.stdout
    )
    data = json.loads(cli("list", "--json").stdout)
    assert data == [
        {
            "name": "gh",
            "kind": "bearer",
            "hosts": ["*.githubusercontent.com", "api.github.com"],
            "methods": ["POST"],
            "ports": [443],
            "schemes": ["https"],
            "allow_private": False,
            "template": "{secret}",
            "description": "GitHub",
        }
    ]

    raw = stored_files(cli)  # encrypted at rest: no raw, base64 or hex copy in any vault file
    for form in (SECRET.encode(), base64.b64encode(SECRET.encode()), SECRET.encode().hex().encode()):
        assert form not in raw
    for name in ("keyring.key", "keyring.enc", "credentials.json"):
        assert (cli.vault_dir / name).stat().st_mode & 0o777 == 0o600
    assert cli.vault_dir.stat().st_mode & 0o777 == 0o700

    assert cli("rm", "gh").returncode == 0
    assert json.loads(cli("list", "--json").stdout) == []
    again = cli.sub("rm", "gh")
    assert again.returncode == 1 and again.stderr.startswith("corral: not_found") and "Traceback" not in again.stderr


def test_secret_never_from_argv(cli):
    done = cli("set", "gh", "--host", "a.example.com", "--secret", SECRET)
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr
    assert not (cli.vault_dir / "credentials.json").exists()


@pytest.mark.parametrize(
    ("secret", "why"),
    [("short", "at least 8"), ("", "at least 8"), ("abcd\nefghijkl", "CR, LF"), ("abc\x01defghijk", "control")],
)
def test_bad_secrets_refused_and_nothing_stored(cli, secret, why):
    done = cli("set", "x", "--host", "a.example.com", stdin=secret)
    assert done.returncode == 1 and done.stderr.startswith("corral: invalid_argument") and why in done.stderr
    assert secret.strip() not in done.stderr or not secret
    assert json.loads(cli("list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--host", "a..b"], "invalid host"),
        (["--host", "evil.com/path"], "invalid host"),
        (["--host", "a.*.com"], "wildcard"),
        (["--kind", "header", "--host", "a.com"], "--header"),
        (["--kind", "query", "--host", "a.com"], "--query-param"),
        (["--host", "a.com", "--port", "70000"], "ports"),
        (["--host", "a.com", "--method", "GET X"], "methods"),
    ],
)
def test_bad_policies_refused_before_reading_the_secret(cli, args, why):
    done = cli("set", "x", *args, stdin=SECRET)
    assert done.returncode == 1 and "invalid_argument" in done.stderr and why in done.stderr, done.stderr
    assert not (cli.vault_dir / "keyring.enc").exists()


def test_hidden_prompt_when_stdin_is_a_terminal(cli):
    """A real terminal (pty): the CLI prompts with echo off; the secret never shows on screen."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI, with the pty as its controlling terminal
        os.execve(
            sys.executable,
            [sys.executable, "-m", "corral.cli", "vault", "set", "tty", "--host", "a.example.com"],
            cli.env,
        )
    screen = b""
    deadline = time.monotonic() + 60
    while b"input hidden" not in screen and time.monotonic() < deadline:
        screen += os.read(fd, 1024)
    os.write(fd, SECRET.encode() + b"\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert b"stored tty" in screen and SECRET.encode() not in screen  # echo was off
    assert "tty" in cli("list").stdout


def test_doctor_on_a_headless_machine_picks_the_encrypted_file(cli):
    cli("set", "gh", "--host", "api.github.com", stdin=SECRET)
    done = cli("doctor")
    assert done.returncode == 0, done.stderr
    assert "backend: encrypted-file" in done.stdout
    assert "no D-Bus session bus" in done.stdout and "mode 600" in done.stdout and "gh: secret present" in done.stdout


def test_doctor_reports_a_missing_secret(cli):
    cli("set", "gh", "--host", "api.github.com", stdin=SECRET)
    (cli.vault_dir / "keyring.enc").unlink()
    done = cli("doctor")
    assert done.returncode == 1 and "SECRET MISSING" in done.stdout


def test_key_file_readable_by_others_fails_closed(cli):
    cli("set", "gh", "--host", "api.github.com", stdin=SECRET)
    (cli.vault_dir / "keyring.key").chmod(0o644)
    done = cli("set", "gh2", "--host", "api.github.com", stdin=SECRET)
    assert done.returncode == 1 and "unavailable" in done.stderr and "mode 644" in done.stderr
    assert "gh2" not in cli("list").stdout


def test_corrupt_policy_file_is_one_clear_error(cli):
    cli("set", "gh", "--host", "api.github.com", stdin=SECRET)
    (cli.vault_dir / "credentials.json").write_text("{not json")
    done = cli("list")
    assert (
        done.returncode == 1
        and done.stderr.startswith("corral: unavailable: cannot read")
        and "Traceback" not in done.stderr
    )


def test_replaced_key_fails_closed(cli):
    cli("set", "gh", "--host", "api.github.com", stdin=SECRET)
    key = cli.vault_dir / "keyring.key"
    key.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))
    done = cli("doctor")
    assert done.returncode == 1 and "does not decrypt" in done.stdout


@pytest.mark.parametrize(
    ("backend", "expect", "code"),
    [
        ("null", "backend: keyring.backends.null.Keyring", 0),
        ("keyring.backends.fail.Keyring", "insecure", 0),
        ("plaintext", "cannot load that keyring backend", 1),
        ("bogus", "is not a backend", 1),
        ("corral.vault.keyrings.EncryptedFileKeyring", "backend: corral.vault.keyrings.EncryptedFileKeyring", 0),
    ],
)
def test_insecure_backends_only_by_name(cli, backend, expect, code):
    done = cli("doctor", extra_env={"CORRAL_VAULT_BACKEND": backend})
    assert done.returncode == code, done.stdout + done.stderr
    assert expect in done.stdout + done.stderr
    if backend == "null":
        assert "does not protect secrets" in done.stdout


@pytest.fixture
def silent_bus(tmp_path):
    """A D-Bus address whose socket accepts connections and never says a word: a hung Secret Service."""
    path = tmp_path / "bus"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"unix:path={path}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def test_hung_secret_service_times_out_and_fails_closed(cli, silent_bus):
    start = time.monotonic()
    done = cli.sub("doctor", extra_env={"DBUS_SESSION_BUS_ADDRESS": silent_bus}, timeout=30)
    assert done.returncode == 1 and "did not answer within 1s" in done.stderr, done.stderr
    assert "encrypted-file" in done.stderr  # says how to choose the file vault on purpose; did not switch silently
    assert time.monotonic() - start < 20


def test_hung_secret_service_named_explicitly_times_out_on_set(cli, silent_bus):
    env = {"DBUS_SESSION_BUS_ADDRESS": silent_bus, "CORRAL_VAULT_BACKEND": "keyring.backends.SecretService.Keyring"}
    done = cli.sub("set", "gh", "--host", "api.github.com", stdin=SECRET, extra_env=env, timeout=30)
    assert done.returncode == 1 and done.stderr.startswith("corral: timeout"), done.stderr
    assert SECRET not in done.stderr
    assert not (cli.vault_dir / "credentials.json").exists()  # no policy without its secret
