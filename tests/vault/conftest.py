"""Run `corral vault ...` as a user would: the real CLI entry point and a real vault dir, no D-Bus.

`cli(...)` runs `corral.cli.main` in this process (env and stdin set as a shell would);
`cli.sub(...)` runs a real subprocess where a process boundary matters.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main


class Cli:
    def __init__(self, home: Path, monkeypatch, capsys) -> None:
        self.home = home
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "CORRAL_HOME": str(home / "corral"),
            "CORRAL_KEYRING_TIMEOUT_S": "1",
        }
        monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
        for key in [k for k in os.environ if k.startswith("CORRAL_")]:
            monkeypatch.delenv(key)
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def __call__(
        self, *args: str, stdin: str = "", extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        with self.monkeypatch.context() as mp:
            for key, value in (extra_env or {}).items():
                mp.setenv(key, value)
            mp.setattr(sys, "stdin", io.StringIO(stdin))
            self.capsys.readouterr()
            try:
                code = main(["vault", *args])
            except SystemExit as exit:  # argparse
                code = exit.code
            out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    def sub(
        self, *args: str, stdin: str = "", extra_env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral.cli", "vault", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(extra_env or {})},
            check=False,
        )

    @property
    def vault_dir(self) -> Path:
        return self.home / "corral" / "vault"


@pytest.fixture
def cli(tmp_path: Path, monkeypatch, capsys) -> Cli:
    return Cli(tmp_path, monkeypatch, capsys)
