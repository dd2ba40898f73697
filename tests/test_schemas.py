"""Tool definitions are lean: no pydantic titles, no $ref/$defs, no anyOf-with-null."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp.client import Client
from pydantic import BaseModel, Field

from corral.servers.schema import lean


class Inner(BaseModel):
    title: str = Field(description="a property that happens to be called title")
    size: int | None = None


class Outer(BaseModel):
    inner: Inner | None = None
    choice: int | str


def test_lean_inlines_refs_drops_titles_and_null_branches() -> None:
    schema = lean(Outer.model_json_schema())
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    inner = schema["properties"]["inner"]
    assert inner["type"] == "object" and "anyOf" not in inner and "default" not in inner
    assert set(inner["properties"]) == {"title", "size"}  # a property named "title" stays
    assert inner["properties"]["size"] == {"type": "integer"}
    assert "title" not in inner["properties"]["title"]
    assert schema["properties"]["choice"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]  # a real union stays
    assert schema["required"] == ["choice"]


@pytest.mark.anyio
async def test_the_servers_advertise_lean_schemas(tmp_path: Path) -> None:
    from corral.servers.session import open_store
    from corral.servers.session.server import build_server

    async with Client(build_server(open_store(str(tmp_path / "s.db")))) as client:
        tools = (await client.list_tools()).tools
    for t in tools:
        text = json.dumps(t.input_schema)
        assert "$ref" not in text and '"title"' not in text, t.name
        assert '{"type": "null"}' not in text, t.name
