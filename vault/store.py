"""The vault: named credentials = a policy in plain config + a secret in the keyring.

Policies live in `$CORRAL_HOME/vault/credentials.json` (not secret, but mode 0600 anyway);
secrets live in the chosen keyring under service "corral", username = credential name.
"""

from __future__ import annotations

import builtins  # `Vault.list` shadows the type in the class body
import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import ValidationError

from corral.diskfull import write_atomically
from corral.errors import InvalidArgument, NotFound, Unavailable
from corral.vault.keyrings import TimedKeyring
from corral.vault.policy import Credential

__all__ = ["MIN_SECRET_CHARS", "Vault", "check_secret"]

MIN_SECRET_CHARS = 8  # shorter secrets would make redaction mangle ordinary output


def check_secret(secret: str) -> str:
    """Refuse secrets that cannot be injected or redacted safely; never echo them."""
    secret = secret.strip("\r\n")
    if len(secret) < MIN_SECRET_CHARS:
        raise InvalidArgument(
            f"the secret is {len(secret)} characters; at least {MIN_SECRET_CHARS} are required so redaction cannot mangle ordinary output"
        )
    if any(c in secret for c in "\r\n\0"):
        raise InvalidArgument("the secret contains CR, LF or NUL; it would reach a header")
    if not secret.isprintable():
        raise InvalidArgument("the secret contains control characters")
    return secret


class Vault:
    def __init__(self, directory: Path, keyring: TimedKeyring) -> None:
        self.directory = directory
        self.keyring = keyring
        self.path = directory / "credentials.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / "credentials.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def stamp(self) -> tuple[int, int]:
        """Changes whenever a credential is set or removed (the proxy reloads on change)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def _read(self) -> dict[str, Credential]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise Unavailable(f"cannot read {self.path}: {type(err).__name__}", hint="fix or remove the file") from None
        try:
            return {name: Credential.model_validate(item) for name, item in raw.get("credentials", {}).items()}
        except ValidationError as err:
            raise Unavailable(f"{self.path} holds an invalid policy: {err.errors()[0]['msg']}") from None

    def _write(self, creds: dict[str, Credential]) -> None:
        data = {"version": 1, "credentials": {n: c.model_dump(exclude_none=True) for n, c in sorted(creds.items())}}
        write_atomically(self.path, json.dumps(data, indent=2).encode())

    def list(self) -> list[Credential]:
        return sorted(self._read().values(), key=lambda c: c.name)

    def get(self, name: str) -> Credential:
        creds = self._read()
        if name not in creds:
            known = ", ".join(sorted(creds)) or "none"
            raise NotFound(
                f"no credential named {name!r}", hint=f"known credentials: {known}; list_credentials shows them"
            )
        return creds[name]

    def secret(self, name: str) -> str:
        value = self.keyring.get(name)
        if value is None:
            raise NotFound(
                f"credential {name!r} has a policy but no secret in the keyring",
                hint=f"run `corral vault set {name} ...` again",
            )
        return value

    def set(self, credential: Credential, secret: str) -> None:
        """Store the secret first, then the policy: a policy never points at a missing secret for long."""
        secret = check_secret(secret)
        with self._locked():
            self.keyring.set(credential.name, secret)
            creds = self._read()
            creds[credential.name] = credential
            self._write(creds)

    def set_many(self, items: builtins.list[tuple[Credential, str]]) -> None:
        """`set` for many credentials: one keyring write, one policy write (imports, benchmarks)."""
        checked = {cred.name: check_secret(secret) for cred, secret in items}
        with self._locked():
            self.keyring.set_many(checked)
            creds = self._read()
            creds.update((cred.name, cred) for cred, _ in items)
            self._write(creds)

    def remove(self, name: str) -> None:
        with self._locked():
            creds = self._read()
            had_secret = self.keyring.delete(name)
            if name not in creds and not had_secret:
                raise NotFound(f"no credential named {name!r}")
            creds.pop(name, None)
            self._write(creds)

    def secrets(self, creds: Iterable[Credential] | None = None) -> dict[str, str]:
        """Every stored secret by name (for redaction); policies without a secret are skipped.

        `creds`: the policies the caller already read (saves reading the policy file again).
        One keyring call for all of them (one decrypt of the encrypted file, not one per secret).
        """
        names = [cred.name for cred in (self.list() if creds is None else creds)]
        return self.keyring.get_many(names) if names else {}
