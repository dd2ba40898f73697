"""What every benchmark shares: timing, percentiles, the table and the JSON file."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def time_ms(fn: Callable[[], object], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples),
        "n": len(samples),
    }


class Table:
    """Rows of (figure, measured, baseline, target); printed aligned and saved as JSON."""

    def __init__(self, area: str) -> None:
        self.area = area
        self.rows: list[dict[str, str]] = []

    def add(self, figure: str, measured: str, baseline: str = "", target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("ok" if ok else "MISSED")
        self.rows.append(
            {"figure": figure, "measured": measured, "baseline": baseline, "target": target, "verdict": verdict}
        )
        print(f"  {figure:<58} {measured:>16}   baseline {baseline:<22} target {target:<12} {verdict}", flush=True)

    def save(self, extra: dict | None = None) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.area}.json"
        path.write_text(json.dumps({"area": self.area, "rows": self.rows, **(extra or {})}, indent=2))
        return path
