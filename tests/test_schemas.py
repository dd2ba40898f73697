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


@pytest.mark.requires("bwrap")
@pytest.mark.anyio
async def test_execute_tells_the_model_where_it_runs(tmp_path: Path) -> None:
    """The model learns from the definition alone: an isolated sandbox, its workdir, no network, the caps."""
    from corral.servers.sandbox.config import SandboxSettings
    from corral.servers.sandbox.server import build_server

    boxes = Path("/tmp/corral-test-sandboxes") / tmp_path.name  # as root, the sandbox uid must traverse it
    boxes.parent.mkdir(mode=0o711, exist_ok=True)
    server, _ = build_server(SandboxSettings(home=tmp_path / "home", sandbox_dir=boxes), reap=False)
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    text = tools["execute"].description or ""
    for needed in ("isolated", "/workspace", "network 'full'", "64 KiB", "timeout_s", "background"):
        assert needed in text, (needed, text)
    assert server.instructions is not None and "/workspace" in server.instructions
