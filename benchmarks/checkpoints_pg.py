"""Checkpoints in PostgreSQL (issue 11, item 5) beside the local store, measured in one run.

    python3 benchmarks/checkpoints_pg.py [--url postgresql://...] [--files 10000] [--mb 200] [--n 20]

One bubblewrap sandbox server per store (the local one: files + SQLite under its home; the
shared one: a throwaway schema of the PostgreSQL server), driven through an in-memory MCP
client. A workspace of `--files` files totalling `--mb` MB is written by a command inside
the sandbox, then:

- first checkpoint, beside `cp -a` and `tar -c` of the same tree on the host;
- incremental checkpoint after a command that changed one file (p50/p95 over `--n`);
- restore into a new sandbox;
- a session moved to a second server (its own home, sandbox root and registry) that shares
  only the store: its first call, restoring the workspace from the store before running,
  beside another session's first call there (a fresh, empty sandbox).

The store's share of an incremental checkpoint (its `put_blob`, `commit` and `usage` calls)
is timed on its own: the rest, scanning the tree, is the same code for both stores.

Numbers are noisy on a shared 2-core machine; the JSON goes to benchmarks/results/checkpoints_pg.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from mcp.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table, summary
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.server import build_server

DEFAULT_URL = "postgresql://corral:corral@127.0.0.1:5432/corral_test"
SESSION = {"corral/client": "bench-session"}
FILL = """
import os
files, size = {files}, {size}
each = size // files
for i in range(files):
    d = f"src/d{{i % 100:03d}}"
    os.makedirs(d, exist_ok=True)
    with open(f"{{d}}/f{{i:05d}}.dat", "wb") as f:
        f.write(os.urandom(each))
"""


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


async def call(client: Client, tool: str, meta: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args, meta=meta or SESSION)
    if result.is_error:
        raise RuntimeError(f"{tool}: {result.content[0].text}")
    return result.structured_content


def server(home: Path, sandbox_dir: Path, store: str) -> tuple[Any, Any]:
    settings = SandboxSettings(
        home=home, sandbox_dir=sandbox_dir, sandbox_reap_interval_s=3600, checkpoint_store=store,
        checkpoint_max_mb=1 << 20,
    )  # fmt: skip
    return build_server(settings)


def host_ms(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


async def measure(store: str, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure for one store: first, incremental, restore, moved-host first call."""
    out: dict[str, Any] = {}
    srv, service = server(base / "a" / "home", base / "a" / "sandboxes", store)
    async with Client(srv) as c:
        fill = FILL.format(files=args.files, size=args.mb << 20)
        done = await call(c, "execute", command="python3 -", stdin=fill, timeout_s=1800)
        sid = done["sandbox_id"]
        started = time.perf_counter()
        first = await call(c, "checkpoint")
        out["first_ms"] = (time.perf_counter() - started) * 1000
        out["first_bytes"] = first["bytes_added"]
        samples, in_store = [], timed(service.checkpoints.store)
        for i in range(args.n):
            await call(c, "execute", command=f"echo {i} >> src/d000/f00000.dat")
            in_store[0] = 0.0
            started = time.perf_counter()
            ckpt = await call(c, "checkpoint")
            samples.append((time.perf_counter() - started) * 1000)
            out.setdefault("store", []).append(in_store[0])
        out["incremental"] = summary(samples)
        out["store"] = summary(out["store"])
        started = time.perf_counter()
        await call(c, "restore", checkpoint_id=ckpt["checkpoint_id"])
        out["restore_ms"] = (time.perf_counter() - started) * 1000
        tree = base.parent / "tree"
        if not tree.exists():  # the baselines' copy of the same tree
            subprocess.run(["cp", "-a", str(base / "a" / "sandboxes" / sid / "workspace"), str(tree)], check=True)
    await destroy_all(service)
    if store:  # a shared store: a second server, sharing nothing else, picks the session up
        other, moved_to = server(base / "b" / "home", base / "b" / "sandboxes", store)
        async with Client(other) as c:
            started = time.perf_counter()  # the baseline: another session's first call there, a fresh sandbox
            await call(c, "execute", meta={"corral/client": "bench-fresh"}, command="true")
            out["fresh_ms"] = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            moved = await call(
                c, "execute", meta={**SESSION, "corral/checkpoint": ckpt["checkpoint_id"]}, command="true"
            )
            out["moved_ms"] = (time.perf_counter() - started) * 1000
            assert "restored from checkpoint" in (moved.get("notice") or ""), moved
        await destroy_all(moved_to)
    return out


def timed(store: Any) -> list[float]:
    """Make `store`'s write path add its milliseconds to the returned cell: the store's share of a checkpoint."""
    cell = [0.0]
    for name in ("put_blob", "commit", "usage"):
        inner = getattr(store, name)

        def wrapper(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                cell[0] += (time.perf_counter() - started) * 1000

        setattr(store, name, wrapper)
    return cell


async def destroy_all(service: Any) -> None:
    """End the sandboxes this run made (their inits outlive the client)."""
    for record in service.registry.all(service.backend.name, states=("running", "lost")):
        await service.backend.destroy(record.ref)
    if service.checkpoints is not None:
        service.checkpoints.store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.gettempdir()) / "corral-bench-ckpt" / uuid.uuid4().hex[:8]
    base.mkdir(parents=True, mode=0o711)
    base.parent.chmod(0o711)
    schema = "bench_ckpt_" + uuid.uuid4().hex[:8]
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        local = await measure("", base / "local", args)
        pg = await measure(with_schema(args.url, schema), base / "pg", args)
        tree = base / "tree"
        cp_ms = host_ms(["cp", "-a", str(tree), str(base / "tree-copy")])
        tar_ms = host_ms(["tar", "-cf", str(base / "tree.tar"), "-C", str(tree), "."])
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        shutil.rmtree(base, ignore_errors=True)

    shape = f"{args.files} files / {args.mb} MB"
    table = Table("checkpoints_pg")
    table.add(
        f"PG store: first checkpoint ({shape})",
        f"{pg['first_ms'] / 1000:.2f} s",
        f"local store {local['first_ms'] / 1000:.2f} s, cp -a {cp_ms / 1000:.2f} s",
    )
    inc, linc = pg["incremental"], local["incremental"]
    table.add(
        f"PG store: incremental checkpoint, 1 file changed: p50 (n={args.n})",
        f"{inc['p50']:.1f} ms",
        f"local {linc['p50']:.1f} ms, tar {tar_ms:.0f} ms",
        "<= 50 ms",
        inc["p50"] <= 50,
    )
    table.add(
        "PG store: its share of an incremental checkpoint (blob + commit): p50",
        f"{pg['store']['p50']:.1f} ms",
        f"local store {local['store']['p50']:.1f} ms",
    )
    table.add("PG store: incremental checkpoint: p95", f"{inc['p95']:.1f} ms", f"local {linc['p95']:.1f} ms")
    table.add(
        "PG store: restore into a new sandbox",
        f"{pg['restore_ms'] / 1000:.2f} s",
        f"local store {local['restore_ms'] / 1000:.2f} s, cp -a {cp_ms / 1000:.2f} s",
    )
    table.add(
        "PG store: moved session's first call on another server",
        f"{pg['moved_ms'] / 1000:.2f} s",
        f"a fresh sandbox's first call {pg['fresh_ms'] / 1000:.2f} s",
    )
    print(f"  saved {table.save({'files': args.files, 'mb': args.mb})}")


if __name__ == "__main__":
    asyncio.run(main())
