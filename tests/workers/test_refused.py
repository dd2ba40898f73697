"""Bad credentials mid-run are not an outage (issue 18, item 1): when the session database
starts refusing the worker's login (its password was changed, its connections cut), the
job fails at once saying why, instead of waiting out the outage budget, and the queue does
not retry it. The cluster is the tests' own (`private_pg.py`): the shared server's roles
and connections are left alone."""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
import pytest

from corral.harness.pool import HandBack, Runtime
from corral.servers.session import NewEvent, open_store
from corral.servers.session.postgres import StoreRefused
from tests.workers.private_pg import private_pg  # noqa: F401 - fixture

pytestmark = pytest.mark.requires("postgres")
ROLE = "corral_refusable"


@pytest.fixture
def refusable_url(private_pg):  # noqa: F811
    """A login that needs a password (the cluster trusts every other role)."""
    hba = private_pg.dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n" + original)
    private_pg._run("pg_ctl", "-D", str(private_pg.dir), "reload")
    with psycopg.connect(private_pg.url, autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {ROLE}")
        admin.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD 'first-password'")
    yield f"postgresql://{ROLE}:first-password@127.0.0.1:{private_pg.port}/postgres"
    hba.write_text(original)
    private_pg._run("pg_ctl", "-D", str(private_pg.dir), "reload")


def change_password_and_cut(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {ROLE} PASSWORD 'rotated-password'")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (ROLE,))


def test_a_refused_login_mid_run_fails_the_job_promptly_with_the_reason(private_pg, refusable_url, caplog):  # noqa: F811
    store = open_store(refusable_url)
    sid = store.create().session_id

    async def body(leased, session_id):
        leased.append(session_id, [NewEvent(type="work.step", data={"i": 0})])
        change_password_and_cut(private_pg.url)
        leased.append(session_id, [NewEvent(type="work.step", data={"i": 1})])

    runtime = Runtime(store=store, body=body, name="w1", lease_s=5, outage_s=300)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.ERROR, "corral.worker"), pytest.raises(StoreRefused) as raised:
            asyncio.run(runtime.work(sid, None))
    finally:
        store.close()
    assert time.monotonic() - started < 30, "waited as if the database were down"
    assert "password authentication failed" in raised.value.message
    assert HandBack().get_retry_decision(exception=raised.value, job=None) is None  # type: ignore[arg-type]
    assert (
        f"job for session {sid} failed: StoreRefused" in caplog.text and "password authentication failed" in caplog.text
    )
