"""What checkpointing costs a harness step (issue 11): `CORRAL_CHECKPOINTS=each-call` vs `off`.

    python3 benchmarks/checkpoints_harness.py [--steps N] [--runs R] [--files F] [--delay-ms D]

The real harness (in-process, against the fake Anthropic API) drives the real sandbox server
(bubblewrap, over stdio). Each run is a new session: its first step fills the workspace with F
files, then N steps each run `execute` changing ONE file, then the turn ends. Runs alternate
on/off (R of each), so drift on a shared machine hits both alike.

The harness takes a call's checkpoint while its next model request runs (the result and the
checkpoint are still one append, made before the response's), so what a step pays depends on
how long the model takes: measured with the fake answering after D ms (default 300, as in
`harness.py`; a real model takes longer) and after 0 ms (nothing to hide behind: the worst case).

Measured from the harness's own appends (a timing wrapper around the store):
  - a step: from one tool result's append to the next (model request + tool call +
    checkpoint + append), the figure the target is about (p50 difference <= 10 ms);
  - the tool phase alone: from the response's append to its tool result's append.
The first one-file step of each run is left out (the server's first incremental scan).
JSON goes to benchmarks/results/checkpoints_harness.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table, summary
from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import EventStore, NewEvent, open_store
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.sandbox.procs import kill_sandboxes_under


class Timed:
    """The store, noting when each append returned and what it held."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.appends: list[tuple[float, list[str]]] = []

    def append(self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None) -> list[int]:
        positions = self._store.append(session_id, events, expected_position)
        self.appends.append((time.perf_counter(), [e.type for e in events]))
        return positions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def script(steps: int, files: int) -> Script:
    fill = f'mkdir -p src && for i in $(seq 1 {files}); do echo "file $i" > src/f$i.txt; done'
    turns = [Turn([tool("sandbox__execute", {"command": fill})])]
    turns += [
        Turn([tool("sandbox__execute", {"command": f"echo 'step {i}' > src/f{i % files + 1}.txt"})])
        for i in range(steps)
    ]
    return Script({"CKPT-BENCH": [*turns, Turn([text("done")])]})


async def one_run(
    env: dict[str, str], mode: str, steps: int, files: int, delay_s: float
) -> tuple[list[float], list[float], int]:
    """(step ms, tool phase ms, checkpoints written) of one session's one-file steps."""
    e = {**env, "CORRAL_CHECKPOINTS": mode}
    store = Timed(open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db")))
    try:
        with FakeAnthropic(script(steps, files), delay_s=delay_s) as fake:
            e.update(fake.env())
            out = await run_session(
                settings_from(e), task="CKPT-BENCH go", session_id=None, view=NullView(), env=e, store=store
            )
        written = len(store.select(out.session_id, types=["sandbox.checkpoint"]))
    finally:
        store.close()
    results = [i for i, (_, types) in enumerate(store.appends) if "agent.tool_result" in types]
    responses = [i for i, (_, types) in enumerate(store.appends) if "span.model_request" in types]
    step = [(store.appends[b][0] - store.appends[a][0]) * 1000 for a, b in zip(results, results[1:], strict=False)]
    phase = []
    for r in results:
        before = max(i for i in responses if i < r)
        phase.append((store.appends[r][0] - store.appends[before][0]) * 1000)
    # results[0] fills the workspace; step[0] and phase[1] are the first one-file step: left out
    return step[1:], phase[2:], written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="one-file steps per run")
    parser.add_argument("--runs", type=int, default=4, help="runs of each mode, alternating")
    parser.add_argument("--files", type=int, default=1000, help="files in the workspace")
    parser.add_argument("--delay-ms", type=float, default=300.0, help="the fake API's response delay")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    sandbox_dir = Path(tempfile.gettempdir()) / "corral-test-sandboxes" / uuid.uuid4().hex[:12]
    sandbox_dir.parent.mkdir(mode=0o711, exist_ok=True)  # the sandbox uid must traverse it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "ANTHROPIC_"))}
    env.update(
        CORRAL_HOME=str(home),
        CORRAL_SERVERS="sandbox",
        CORRAL_SANDBOX_DIR=str(sandbox_dir),
        CORRAL_SANDBOX_REAP_INTERVAL_S="3600",
        PYTHONPATH=str(ROOT),
    )
    delays = (args.delay_ms, 0.0)
    got: dict[tuple[float, str], dict[str, list[float]]] = {
        (d, m): {"step": [], "phase": []} for d in delays for m in ("each-call", "off")
    }
    written = {m: 0 for m in ("each-call", "off")}
    try:
        for delay in delays:
            for run in range(args.runs):
                for mode in ("each-call", "off") if run % 2 == 0 else ("off", "each-call"):
                    step, phase, n = anyio.run(one_run, env, mode, args.steps, args.files, delay / 1000)
                    got[delay, mode]["step"] += step
                    got[delay, mode]["phase"] += phase
                    written[mode] += n
                    p50 = summary(step)["p50"]
                    print(f"  model {delay:g} ms, run {run + 1} {mode:<9} step p50 {p50:.1f} ms, {n} checkpoints")
    finally:
        kill_sandboxes_under(sandbox_dir)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(sandbox_dir, ignore_errors=True)
    assert written["off"] == 0 and written["each-call"] > 0, written
    table = Table("checkpoints_harness")
    stats = {}
    for delay in delays:
        on, off = ({k: summary(v) for k, v in got[delay, m].items()} for m in ("each-call", "off"))
        stats[f"model {delay:g} ms"] = {"each-call": on, "off": off}
        diff = on["step"]["p50"] - off["step"]["p50"]
        label = f"harness step, 1 of {args.files} files changed, model {delay:g} ms: checkpoints on vs off"
        target = delay == args.delay_ms
        table.add(
            f"{label}: p50",
            f"{on['step']['p50']:.1f} ms ({diff:+.1f})",
            f"off {off['step']['p50']:.1f} ms",
            "<= +10 ms" if target else "",
            diff <= 10 if target else None,
        )
        table.add(f"{label}: p95", f"{on['step']['p95']:.1f} ms", f"off {off['step']['p95']:.1f} ms")
        table.add(
            f"  model {delay:g} ms: tool phase (call + checkpoint + append), p50",
            f"{on['phase']['p50']:.1f} ms",
            f"off {off['phase']['p50']:.1f} ms",
        )
    table.save({**stats, "checkpoints_written": written, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
