"""A fresh PostgreSQL schema per test, on the server `.ci/services.sh` starts.

`CORRAL_TEST_POSTGRES_URL` names the server (CI exports it); each test gets its own
schema through the URL's `options=-csearch_path=...`, so tests never see each other's
data and can open the store from other processes with nothing but the URL.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest

from tests.conftest import require

DEFAULT_URL = "postgresql://corral:corral@127.0.0.1:5432/corral_test"


def server_url() -> str:
    return os.environ.get("CORRAL_TEST_POSTGRES_URL", DEFAULT_URL)


def reachable(url: str) -> tuple[bool, str]:
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except Exception as err:  # noqa: BLE001 - any failure means "no server to test against"; reported in the skip reason
        return False, " ".join(str(err).split())[:200]
    return True, ""


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_schema_url():
    """A URL whose connections live in a fresh, empty schema (dropped afterwards)."""
    import psycopg

    url = server_url()
    ok, why = reachable(url)
    require("PostgreSQL", ok, f"{url}: {why} (run: source .ci/services.sh && start_postgres)")
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield with_search_path(url, schema)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
