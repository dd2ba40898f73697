"""Harness test plumbing: a settings factory pointed at a tmp data dir, the toolbox server
and the fake Anthropic API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.harness.config import HarnessSettings
from tests.sandbox.procs import kill_sandboxes_under

ROOT = Path(__file__).resolve().parents[2]
TOOLBOX = f"{sys.executable} -m tests.harness.toolbox"


@pytest.fixture
def toolbox_dir(tmp_path: Path) -> Path:
    d = tmp_path / "toolbox"
    d.mkdir()
    return d


@pytest.fixture
def env(tmp_path: Path, toolbox_dir: Path) -> dict[str, str]:
    """The environment a `corral` subprocess (and the servers it launches) runs with."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "ANTHROPIC_"))}
    e.update(
        CORRAL_HOME=str(tmp_path / "home"),
        CORRAL_SERVERS="toolbox",
        CORRAL_EXTRA_SERVERS=f'{{"toolbox": "{TOOLBOX}"}}',
        CORRAL_RETRY_BASE_S="0.05",
        CORRAL_CONNECT_TIMEOUT_S="60",
        TOOLBOX_DIR=str(toolbox_dir),
        PYTHONPATH=str(ROOT),
    )
    return e


@pytest.fixture
def cp_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The harness with only `tests/harness/cpbox.py`, a sandbox-shaped server that records its calls."""
    box = tmp_path / "cpbox"
    box.mkdir()
    return {
        **env,
        "CORRAL_SERVERS": "cpbox",
        "CORRAL_EXTRA_SERVERS": f'{{"cpbox": "{sys.executable} -m tests.harness.cpbox"}}',
        "CPBOX_DIR": str(box),
    }


@pytest.fixture
def real_env(env: dict[str, str], needs_bwrap) -> Iterator[dict[str, str]]:
    """The default servers (sandbox on bubblewrap, session, credentials) over stdio."""
    base = Path(tempfile.gettempdir()) / "corral-test-sandboxes"  # the sandbox uid must traverse it (tmp_path is 0700)
    base.mkdir(mode=0o711, exist_ok=True)
    root = base / uuid.uuid4().hex[:12]
    e = {k: v for k, v in env.items() if k not in ("CORRAL_SERVERS", "CORRAL_EXTRA_SERVERS")}
    e.update(CORRAL_VAULT_BACKEND="encrypted-file", CORRAL_SANDBOX_DIR=str(root), CORRAL_SANDBOX_REAP_INTERVAL_S="3600")
    yield e
    kill_sandboxes_under(root)  # live sandboxes outlive their server by design: end them
    shutil.rmtree(root, ignore_errors=True)


def settings_from(env: dict[str, str], **over: Any) -> HarnessSettings:
    """Settings as the CLI would read them from `env` (tests run in-process too)."""
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        s = HarnessSettings()
    finally:
        os.environ.clear()
        os.environ.update(old)
    for k, v in over.items():
        setattr(s, k, v)
    return s


def corral(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
