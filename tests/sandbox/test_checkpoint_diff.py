"""`corral sessions diff ID --at A --to B`: which files changed between two positions of a
session's log, read from the checkpoints the log names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from corral.servers.session import open_store

from .conftest import Harness, call

pytestmark = pytest.mark.anyio


def corral(h: Harness, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_HOME": str(h.settings.home), "CORRAL_SANDBOX_DIR": str(h.settings.sandbox_dir)}
    env.pop("CORRAL_SESSION_STORE", None)
    env.pop("CORRAL_CHECKPOINT_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


async def test_diff_names_what_changed_between_two_positions(bw: Harness) -> None:
    store = open_store(str(bw.settings.data_dir() / "sessions.db"))
    sid = store.create({"title": "diff demo"}).session_id
    async with bw.client() as c:
        box = (await call(c, "provision"))["sandbox_id"]
        steps = [
            "echo a > a.txt && echo b > b.txt && echo hi > /root/.note",
            "echo A > a.txt && rm b.txt && mkdir -p new/dir",
            "touch a.txt",  # only its mtime: not a change
        ]
        for command in steps:
            await call(c, "execute", sandbox_id=box, command=command)
            taken = await call(c, "checkpoint", sandbox_id=box)
            store.append_one(sid, "agent.tool_result", {"tool_use_id": "t", "name": "execute", "content": []})
            store.append_one(
                sid, "sandbox.checkpoint", {"sandbox_id": box, "checkpoint_id": taken["checkpoint_id"], "at": "now"}
            )
    # Positions: 0 result, 1 checkpoint of step 1; 2, 3 step 2; 4, 5 step 3.
    done = corral(bw, "sessions", "diff", sid, "--at", "1", "--to", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "M /workspace/a.txt",
        "- /workspace/b.txt",
        "+ /workspace/new",
        "+ /workspace/new/dir",
    ]
    as_json = [
        json.loads(line)
        for line in corral(bw, "sessions", "diff", sid, "--at", "3", "--to", "5", "--json").stdout.splitlines()
    ]
    assert as_json == []
    # Before any checkpoint: everything is new.
    start = corral(bw, "sessions", "diff", sid, "--at", "0", "--to", "1").stdout.splitlines()
    assert "+ /root/.note" in start and "+ /workspace/b.txt" in start
    # A checkpoint this host never saw is a clear error.
    store.append_one(sid, "sandbox.checkpoint", {"sandbox_id": box, "checkpoint_id": "ckpt_0000", "at": "now"})
    missing = corral(bw, "sessions", "diff", sid, "--at", "1", "--to", "6")
    assert missing.returncode != 0 and "not_found:" in missing.stderr and "ckpt_0000" in missing.stderr, missing.stderr
