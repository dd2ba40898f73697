"""Workspace checkpoints on bubblewrap (issue 11 "Speed"), each beside its baseline, in one run.

    python3 benchmarks/checkpoints.py [--files 10000] [--mb 200] [--steps 100] [--rounds 3]

A sandbox's workspace of 10,000 files / 200 MB (100 dirs of 20 KB random files, written by a
command in the sandbox), driven through an in-memory MCP client of the sandbox server:

- incremental `checkpoint` after a command (`execute`) rewrote one 1 KB file: p50 and p95 of
  `--steps` steps, beside a full `tar -cf` of the same tree (target: p50 <= 50 ms);
- first `checkpoint` of the workspace (an empty store each round), and `restore` of it into a
  new sandbox: each beside `cp -a` of the same tree (target: within 2x);
- storage after those `--steps` checkpoints (each rewrote the 1 KB file): what the store holds
  (blobs + manifests, and its directory on disk) beside the tree + 1 KB per step (target <= 1.1x).

JSON goes to benchmarks/results/checkpoints.json. Noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mcp.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table, percentile
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.server import build_server


async def tool(c: Client, name: str, **args: object) -> tuple[float, dict]:
    start = time.perf_counter()
    result = await c.call_tool(name, args)
    took = (time.perf_counter() - start) * 1000
    assert not result.is_error, result.content[0].text
    return took, result.structured_content


def timed_ms(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return (time.perf_counter() - start) * 1000


def load() -> str:
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def du_bytes(path: Path) -> int:
    """Bytes a tree takes on disk (blocks, not apparent sizes)."""
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def apparent_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def fill(files: int, mb: int) -> str:
    size = mb * (1 << 20) // files
    return (
        f"python3 -c \"import os\nfor d in range(100): os.makedirs(f'src/d{{d}}', exist_ok=True)\n"
        f"for i in range({files}): open(f'src/d{{i % 100}}/f{{i}}', 'wb').write(os.urandom({size}))\""
    )


def copies(ws: Path, scratch: Path, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Baselines: `cp -a` and `tar -cf` of the workspace, on the same file system as the store;
    and `find` printing the fields a checkpoint compares (inode, ctime, size, mtime) of every
    entry: the floor of any scan that stats the whole tree."""
    stats = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run(["find", str(ws), "-printf", "%i %C@ %s %T@\\n"], check=True, stdout=subprocess.DEVNULL)
        stats.append((time.perf_counter() - start) * 1000)
    cp, tar = [], []
    for _ in range(rounds):
        target = scratch / "copy"
        cp.append(timed_ms(["cp", "-a", str(ws), str(target)]))
        shutil.rmtree(target)
        tar.append(timed_ms(["tar", "-cf", str(scratch / "ws.tar"), "-C", str(ws), "."]))
        (scratch / "ws.tar").unlink()
    return cp, tar, stats


async def run(args: argparse.Namespace, settings: SandboxSettings, scratch: Path) -> Table:
    table = Table("checkpoints")
    server, service = build_server(settings, reap=False)
    async with Client(server) as c:
        _, box = await tool(c, "provision")
        sid = box["sandbox_id"]
        made = (await tool(c, "execute", sandbox_id=sid, command=fill(args.files, args.mb), timeout_s=600))[1]
        assert made["exit_code"] == 0, made
        await tool(c, "execute", sandbox_id=sid, command="head -c 1024 /dev/urandom > notes.bin")
    ws = settings.sandbox_dir / sid / "workspace"
    tree_bytes, tree_disk = apparent_bytes(ws), du_bytes(ws)
    print(f"  workspace: {sum(len(f) for _, _, f in os.walk(ws))} files, {tree_bytes / 1e6:.1f} MB", flush=True)
    cp, tar, stats = copies(ws, scratch, args.rounds)

    first, restore, first_server, steps, steps_server = [], [], [], [], []
    for last in [False] * (args.rounds - 1) + [True]:  # an empty store each round: every file is read
        shutil.rmtree(settings.sandboxes_dir() / "checkpoints", ignore_errors=True)
        server, service = build_server(settings, reap=False)
        async with Client(server) as c:
            took, taken = await tool(c, "checkpoint", sandbox_id=sid)
            first.append(took)
            first_server.append(taken["duration_ms"])
            took, back = await tool(c, "restore", checkpoint_id=taken["checkpoint_id"])
            restore.append(took)
            await tool(c, "destroy", sandbox_id=back["sandbox_id"])
            if not last:
                continue
            # The last round's store holds one full checkpoint: now `steps` that each rewrite 1 KB.
            for _ in range(args.steps):
                await tool(c, "execute", sandbox_id=sid, command="head -c 1024 /dev/urandom > notes.bin")
                took, taken = await tool(c, "checkpoint", sandbox_id=sid)
                assert taken["files_changed"] == 1 and taken["bytes_added"] == 1024, taken
                steps.append(took)
                steps_server.append(taken["duration_ms"])
            held = service.checkpoints.store.usage()
            on_disk = du_bytes(settings.sandboxes_dir() / "checkpoints")
            await tool(c, "destroy", sandbox_id=sid)
    cp50, tar50 = percentile(cp, 50), percentile(tar, 50)
    f50, r50 = percentile(first, 50), percentile(restore, 50)
    table.add(
        "first checkpoint of the workspace: p50", f"{f50:.0f} ms", f"cp -a {cp50:.0f} ms ({f50 / cp50:.2f}x)",
        "<= 2x cp -a", f50 <= 2 * cp50,
    )  # fmt: skip
    table.add(
        "restore into a new sandbox: p50", f"{r50:.0f} ms", f"cp -a {cp50:.0f} ms ({r50 / cp50:.2f}x)",
        "<= 2x cp -a", r50 <= 2 * cp50,
    )  # fmt: skip
    s50, s95 = percentile(steps, 50), percentile(steps, 95)
    table.add(
        "incremental checkpoint, one file changed: p50", f"{s50:.1f} ms", f"tar -cf {tar50:.0f} ms",
        "<= 50 ms", s50 <= 50,
    )  # fmt: skip
    table.add("incremental checkpoint, one file changed: p95", f"{s95:.1f} ms", f"tar -cf {tar50:.0f} ms")
    table.add("  floor: find stat'ing every entry, p50", f"{percentile(stats, 50):.1f} ms", "load " + load())
    table.add(
        "  (server side: duration_ms p50)", f"{percentile(steps_server, 50):.1f} ms",
        f"first checkpoint {percentile(first_server, 50):.0f} ms",
    )  # fmt: skip
    budget = tree_bytes + args.steps * 1024
    table.add(
        f"storage after 1 + {args.steps} checkpoints (1 KB each): held", f"{held / 1e6:.2f} MB",
        f"tree + {args.steps} KB {budget / 1e6:.2f} MB ({held / budget:.3f}x)", "<= 1.1x", held <= 1.1 * budget,
    )  # fmt: skip
    table.add(
        "  same, the store's directory on disk (du)", f"{on_disk / 1e6:.2f} MB",
        f"tree on disk {tree_disk / 1e6:.2f} MB ({on_disk / tree_disk:.3f}x)",
    )  # fmt: skip
    table.save({"cp_ms": cp, "tar_ms": tar, "first_ms": first, "restore_ms": restore, "steps_ms": steps})
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    # Root runs sandboxes as an unprivileged uid that must traverse the sandbox dir (not /tmp/...: 0700).
    base = Path("/var/lib/corral") if os.geteuid() == 0 else work
    sandbox_dir = base / f"bench-checkpoints-{uuid.uuid4().hex[:8]}"
    settings = SandboxSettings(home=work / "home", sandbox_dir=sandbox_dir)
    try:
        asyncio.run(run(args, settings, work))
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
