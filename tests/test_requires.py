"""The "requires" mechanism itself (tests/parts.py, tests/conftest.py), on a real missing part:
PostgreSQL at a port nothing listens on. Locally every test needing it skips with one line
saying what to do; in CI it fails; `-m "not postgres"` leaves out exactly those tests, and
`-m bwrap` finds a test that needs bwrap only through a fixture (`up`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
# Needs PostgreSQL through the pg_schema_url fixture (needs_postgres), not a marker of its own.
TARGET = "tests/session/test_leases.py"


def pytest_run(*args: str, ci: bool = False, target: str = TARGET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CORRAL_TEST_POSTGRES_URL"] = f"postgresql://corral:corral@127.0.0.1:{free_port()}/nothing"
    if ci:
        env["CI"] = "true"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", target, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def counts(done: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The counts of pytest's last line, e.g. {"passed": 4, "skipped": 4}."""
    last = done.stdout.strip().splitlines()[-1]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error|deselected)", last)}


def test_a_missing_part_skips_locally_with_one_line_and_fails_in_ci() -> None:
    local = pytest_run()
    got = counts(local)
    assert got.get("skipped", 0) > 0 and got.get("passed", 0) > 0 and "failed" not in got, local.stdout
    reasons = {line.split(": ", 1)[1] for line in local.stdout.splitlines() if line.startswith("SKIPPED")}
    assert len(reasons) == 1, reasons  # one reason for every test of the part
    (reason,) = reasons
    assert reason.startswith("needs a PostgreSQL server that accepts a connection:") and "start_postgres" in reason, (
        reason
    )

    ci = pytest_run(ci=True)
    assert counts(ci) == {"passed": got["passed"], "error": got["skipped"]}, ci.stdout
    assert "CI must run this test" in ci.stdout


def test_minus_m_selects_by_part_even_when_a_fixture_declares_it() -> None:
    everything = counts(pytest_run())
    without, only = counts(pytest_run("-m", "not postgres")), counts(pytest_run("-m", "postgres"))
    assert without == {"passed": everything["passed"], "deselected": everything["skipped"]}, without
    assert only == {"skipped": everything["skipped"], "deselected": everything["passed"]}, only


def test_minus_m_bwrap_selects_a_test_that_needs_it_only_through_the_up_fixture() -> None:
    done = pytest_run("--collect-only", "-m", "bwrap", target="tests/frontdoor/test_harness_view.py")
    assert "test_a_harness_run_through_corral_up_reads_well_in_both_viewers" in done.stdout, done.stdout
