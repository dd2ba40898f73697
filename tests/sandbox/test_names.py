"""File names are data (issue 12 item 10): any bytes but NUL and "/" — newlines, "|", bytes
that are not UTF-8 — list exactly, and never forge or break entries; a socket or FIFO is an
`invalid_argument`, never an unexpected failure."""

from __future__ import annotations

import base64

import pytest

from .conftest import Harness, call, fail

pytestmark = pytest.mark.anyio

FORGER = "two\nregular file|99|forged"  # one name that the old line format read as two entries


async def test_any_file_name_lists_as_one_exact_entry(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        make = r"""mkdir d && cd d && touch "$(printf 'two\nregular file|99|forged')" "$(printf 'bad\377name')" plain 'pipe|name' && mkdir "$(printf 'sub\ndir')" && touch "$(printf 'sub\ndir')/inner" """
        assert (await call(c, "execute", sandbox_id=sid, command=make))["exit_code"] == 0
        entries = (await call(c, "list_files", sandbox_id=sid, path="d", depth=2))["entries"]
        assert sorted(e["name"] for e in entries) == sorted(
            [FORGER, "bad\ufffdname", "plain", "pipe|name", "sub\ndir", "sub\ndir/inner"]
        )
        undecodable = [e for e in entries if "name_base64" in e]
        assert [base64.b64decode(e["name_base64"]) for e in undecodable] == [b"bad\xffname"]
        assert {e["name"]: e["type"] for e in entries}["sub\ndir"] == "dir"
        assert {e["type"] for e in entries if e["name"] != "sub\ndir"} == {"file"}
        # the name that holds a newline is a path the file tools take as it is
        await call(c, "write_file", sandbox_id=sid, path=f"d/{FORGER}", content="exact")
        assert (await call(c, "read_file", sandbox_id=sid, path=f"d/{FORGER}"))["content"] == "exact"


async def test_sockets_and_fifos_are_not_regular_files(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        make = "mkfifo fifo"
        specials = ["fifo"]
        if iso.kind == "bubblewrap":  # the busybox test image has no python to bind a socket with
            make += " && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\""
            specials.append("sock")
        assert (await call(c, "execute", sandbox_id=sid, command=make))["exit_code"] == 0
        for name in specials:
            text = await fail(c, "read_file", "invalid_argument", sandbox_id=sid, path=name)
            assert "not a regular file" in text
        listed = {e["name"]: e["type"] for e in (await call(c, "list_files", sandbox_id=sid))["entries"]}
        assert all(listed[name] == "other" for name in specials), listed
