"""Run every benchmark and print one table: `python3 -m benchmarks [AREA ...]`.

`python3 -m benchmarks --collect` prints the table from the last results without running.

Each area's script prints its own figures beside their baselines and writes
`benchmarks/results/<area>.json`; this collects them into one table and
`benchmarks/results/all.json`. Benchmarks never gate CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AREAS = [
    "session",
    "forks",
    "postgres",
    "sandbox",
    "sandbox_scale",
    "checkpoints",
    "checkpoints_pg",
    "credentials",
    "flat",
    "harness",
    "checkpoints_harness",
    "workers",
    "frontdoor",
    "tooldefs",
]


def main(argv: list[str]) -> int:
    collect_only = "--collect" in argv
    argv = [a for a in argv if a != "--collect"]
    areas = argv or [a for a in AREAS if (HERE / f"{a}.py").exists()]
    failed = []
    for area in [] if collect_only else areas:
        print(f"\n### {area}", flush=True)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(HERE / f"{area}.py")], cwd=HERE.parent)
        print(f"### {area}: {time.monotonic() - started:.0f} s, exit {proc.returncode}", flush=True)
        if proc.returncode:
            failed.append(area)
    rows = []
    for area in areas:
        path = HERE / "results" / f"{area}.json"
        if path.exists():
            for row in json.loads(path.read_text()).get("rows", []):
                rows.append({"area": area, **{k: str(v) for k, v in row.items()}})
    print("\n| area | figure | measured | baseline (same run) | target | |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['area']} | {r.get('figure', '')} | {r.get('measured', '')} | {r.get('baseline', '')} | {r.get('target', '')} | {r.get('verdict', '')} |"
        )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "all.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=2))
    if failed:
        print(f"\nbenchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
