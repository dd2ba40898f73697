"""A fresh PostgreSQL schema per test, on the server `.ci/services.sh` starts.

`CORRAL_TEST_POSTGRES_URL` names the server (CI exports it); each test gets its own
schema through the URL's `options=-csearch_path=...`, so tests never see each other's
data and can open the store from other processes with nothing but the URL.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest

from tests.parts import postgres_url


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_schema_url(needs_postgres):
    """A URL whose connections live in a fresh, empty schema (dropped afterwards)."""
    import psycopg

    url = postgres_url()
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield with_search_path(url, schema)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
