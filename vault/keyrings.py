"""Which keyring holds the secrets, chosen so that it fails closed.

- `auto`: the OS keyring (Secret Service, KWallet, macOS, Windows) when one answers; on a
  headless machine (no D-Bus session bus) our `EncryptedFileKeyring`. An OS keyring that is
  configured but does not answer is an error, not a silent switch to another store.
- `os` / `encrypted-file`: that one or an error.
- plaintext, null and fail backends are never picked; they are used only when named
  (`plaintext`, `null`, or a backend class path in CORRAL_VAULT_BACKEND).

Every call goes through `TimedKeyring`: it runs in a daemon thread with a deadline, so a
Secret Service that never answers costs `timeout_s`, not a hung proxy.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import keyring.backend
import keyring.errors
from cryptography.fernet import Fernet, InvalidToken

from corral.diskfull import naming_disk_full, write_atomically
from corral.errors import CorralError, InvalidArgument, Timeout, Unavailable

__all__ = ["INSECURE_NAMES", "Choice", "EncryptedFileKeyring", "TimedKeyring", "choose_backend"]

T = TypeVar("T")
SERVICE = "corral"
# Backends that store nothing, store in clear, or refuse everything: opt-in by name only.
INSECURE_NAMES = ("plaintext", "null", "fail", "chainer", "uncrypted", "insecure")
NAMED = {
    "null": "keyring.backends.null.Keyring",
    "plaintext": "keyrings.alt.file.PlaintextKeyring",
    "fail": "keyring.backends.fail.Keyring",
}


class EncryptedFileKeyring(keyring.backend.KeyringBackend):
    """Secrets in one Fernet-encrypted JSON file; the key in a 0600 file beside it.

    What it defends: the secrets file leaking alone (a backup, a grep, a paste). What it
    does not: a process running as the same user, which can read the key file too.
    """

    priority = 0.5  # below any real OS keyring

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.key_path = directory / "keyring.key"
        self.data_path = directory / "keyring.enc"

    def _fernet(self) -> Fernet:
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = self.key_path.stat().st_mode & 0o777
            if mode & 0o077:  # fail closed: a key others can read protects nothing
                raise Unavailable(
                    f"vault key file {self.key_path} has mode {mode:o}",
                    hint=f"run `chmod 600 {self.key_path}` if nobody else read it; otherwise rotate every secret",
                ) from None
            return Fernet(self.key_path.read_bytes().strip())
        try:  # a key file left empty (a full disk) would lock the vault for good: none or a whole one
            with naming_disk_full(self.directory), os.fdopen(fd, "wb") as out:
                out.write(Fernet.generate_key())
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            self.key_path.unlink(missing_ok=True)
            raise
        return Fernet(self.key_path.read_bytes().strip())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "keyring.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self, fernet: Fernet) -> dict[str, dict[str, str]]:
        try:
            blob = self.data_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return json.loads(fernet.decrypt(blob))
        except InvalidToken:
            raise Unavailable(
                f"{self.data_path} does not decrypt with {self.key_path}",
                hint="the key file was replaced; restore it or re-set every secret",
            ) from None

    def _save(self, fernet: Fernet, data: dict[str, dict[str, str]]) -> None:
        write_atomically(self.data_path, fernet.encrypt(json.dumps(data).encode()))

    def get_password(self, service: str, username: str) -> str | None:
        with self._locked():
            return self._load(self._fernet()).get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        with self._locked():
            fernet = self._fernet()
            data = self._load(fernet)
            data.setdefault(service, {})[username] = password
            self._save(fernet, data)

    def get_passwords(self, service: str, usernames: list[str]) -> dict[str, str]:
        """Several secrets with one decrypt (`get_password` per name would decrypt the file each time)."""
        with self._locked():
            stored = self._load(self._fernet()).get(service, {})
        return {name: stored[name] for name in usernames if name in stored}

    def set_passwords(self, service: str, passwords: dict[str, str]) -> None:
        """Several secrets with one decrypt and one write."""
        with self._locked():
            fernet = self._fernet()
            data = self._load(fernet)
            data.setdefault(service, {}).update(passwords)
            self._save(fernet, data)

    def delete_password(self, service: str, username: str) -> None:
        with self._locked():
            fernet = self._fernet()
            data = self._load(fernet)
            if username not in data.get(service, {}):
                raise keyring.errors.PasswordDeleteError(f"no secret for {username!r}")
            del data[service][username]
            self._save(fernet, data)


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread; raise Timeout if it has not returned in time.

    A daemon thread, not a pool: a call that never returns must not hold a worker or
    keep the process alive at exit.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def runner() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # not swallowed: re-raised in the caller's thread below
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=runner, name=f"keyring:{what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise Timeout(
            f"the keyring did not answer {what} within {timeout_s:g}s",
            hint="check the OS keyring (D-Bus Secret Service) or raise CORRAL_KEYRING_TIMEOUT_S",
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


class TimedKeyring:
    """The three keyring verbs the vault needs, each with a deadline and our error kinds."""

    def __init__(self, backend: keyring.backend.KeyringBackend, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return call_with_deadline(fn, self.timeout_s, what)
        except CorralError:
            raise
        except TimeoutError:  # the backend's own deadline (jeepney has one) fired before ours
            raise Timeout(
                f"the keyring {backend_name(self.backend)} did not answer {what} in time",
                hint="check the OS keyring (D-Bus Secret Service)",
            ) from None
        except Exception as err:  # vendor boundary: D-Bus, keyring and OS errors become one kind
            raise Unavailable(f"keyring {backend_name(self.backend)} failed on {what}: {type(err).__name__}") from None

    def get(self, name: str) -> str | None:
        return self._call("get", lambda: self.backend.get_password(SERVICE, name))

    def get_many(self, names: list[str]) -> dict[str, str]:
        """The stored secrets among `names`, in one call with one deadline (one decrypt where the backend can)."""

        def get_many() -> dict[str, str]:
            bulk = getattr(self.backend, "get_passwords", None)
            if bulk is not None:
                return bulk(SERVICE, names)
            found = {name: self.backend.get_password(SERVICE, name) for name in names}
            return {name: value for name, value in found.items() if value is not None}

        return self._call("get", get_many)

    def set(self, name: str, secret: str) -> None:
        self._call("set", lambda: self.backend.set_password(SERVICE, name, secret))

    def set_many(self, secrets: dict[str, str]) -> None:
        def set_many() -> None:
            bulk = getattr(self.backend, "set_passwords", None)
            if bulk is not None:
                return bulk(SERVICE, secrets)
            for name, secret in secrets.items():
                self.backend.set_password(SERVICE, name, secret)
            return None

        self._call("set", set_many)

    def delete(self, name: str) -> bool:
        """False when nothing was stored under that name."""

        def delete() -> bool:
            try:
                self.backend.delete_password(SERVICE, name)
            except keyring.errors.PasswordDeleteError:
                return False
            return True

        return self._call("delete", delete)


@dataclass(frozen=True)
class Choice:
    backend: keyring.backend.KeyringBackend
    name: str
    why: str
    insecure: bool = False


def backend_name(backend: Any) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_insecure(backend: Any) -> bool:
    """By name only: asking a backend its priority may talk to D-Bus (and hang)."""
    name = backend_name(backend).lower()
    return any(word in name for word in INSECURE_NAMES)


def _priority(backend: Any) -> float:
    try:
        return float(backend.priority)
    except Exception:  # keyring's own convention: a backend whose priority raises is not viable
        return 0.0


def os_keyrings(timeout_s: float) -> list[keyring.backend.KeyringBackend]:
    """Viable OS keyrings, best first. Probing a dead D-Bus must not hang: it has a deadline."""

    def probe() -> list[tuple[float, keyring.backend.KeyringBackend]]:
        found = keyring.backend.get_all_keyring()
        # OS keyrings only (keyring's own backends); third-party plugins are used only when named
        ranked = [
            (_priority(b), b) for b in found if backend_name(b).startswith("keyring.backends.") and not is_insecure(b)
        ]
        return sorted((r for r in ranked if r[0] > 0), key=lambda r: r[0], reverse=True)

    return [b for _, b in call_with_deadline(probe, timeout_s, "backend detection")]


def load_class(path: str, vault_dir: Path) -> keyring.backend.KeyringBackend:
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise InvalidArgument(
            f"CORRAL_VAULT_BACKEND={path}: cannot load that keyring backend ({type(err).__name__})",
            hint="pip install the package that provides it, or use auto",
        ) from None
    return cls(vault_dir) if cls is EncryptedFileKeyring else cls()


def choose_backend(setting: str, vault_dir: Path, timeout_s: float, bus_address: str | None) -> Choice:
    """Pick the backend for CORRAL_VAULT_BACKEND=`setting`; `bus_address` is DBUS_SESSION_BUS_ADDRESS."""
    setting = setting.strip()
    if setting == "encrypted-file":
        return Choice(EncryptedFileKeyring(vault_dir), "encrypted-file", "CORRAL_VAULT_BACKEND=encrypted-file")
    if setting in ("auto", "os"):
        return _choose_auto(setting, vault_dir, timeout_s, bus_address)
    path = NAMED.get(setting, setting)
    if "." not in path:
        raise InvalidArgument(
            f"CORRAL_VAULT_BACKEND={setting!r} is not a backend",
            hint="use auto, os, encrypted-file, plaintext, null or a keyring backend class path",
        )
    backend = load_class(path, vault_dir)
    insecure = is_insecure(backend)
    why = f"CORRAL_VAULT_BACKEND={setting} names it" + (
        " (an insecure backend, used because you named it)" if insecure else ""
    )
    return Choice(backend, backend_name(backend), why, insecure)


def _choose_auto(setting: str, vault_dir: Path, timeout_s: float, bus_address: str | None) -> Choice:
    try:
        candidates = os_keyrings(timeout_s)
    except TimeoutError:  # ours (Timeout) or the D-Bus library's own
        raise Unavailable(
            f"the OS keyring did not answer within {timeout_s:g}s (D-Bus at {bus_address or 'default address'})",
            hint="fix the Secret Service, or set CORRAL_VAULT_BACKEND=encrypted-file to use the file vault instead",
        ) from None
    if candidates:
        best = candidates[0]
        return Choice(best, backend_name(best), "an OS keyring is available (the best viable one keyring reports)")
    if setting == "os":
        raise Unavailable(
            "no OS keyring is available",
            hint="start a Secret Service (e.g. gnome-keyring) or use CORRAL_VAULT_BACKEND=encrypted-file",
        )
    reason = (
        "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)"
        if not bus_address
        else "no Secret Service or KWallet answers on D-Bus"
    )
    return Choice(
        EncryptedFileKeyring(vault_dir),
        "encrypted-file",
        f"headless machine: {reason}, so the encrypted file vault (key file mode 0600)",
    )
