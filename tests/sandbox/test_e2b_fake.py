"""The e2b fake honours the installed SDK's interface: same method names, parameters, defaults.

An SDK upgrade that renames, reorders or re-defaults a parameter the fake has fails here."""

from __future__ import annotations

import inspect

import pytest
from e2b import AsyncSandbox
from e2b.sandbox_async.commands.command import Commands
from e2b.sandbox_async.filesystem.filesystem import Filesystem
from e2b.sandbox_async.sandbox_api import SandboxApi

from .fake_e2b import FakeAsyncSandbox, _Commands, _Files

PAIRS = [
    (_Commands.run, Commands.run),
    (_Files.read, Filesystem.read),
    (_Files.write, Filesystem.write),
    (_Files.list, Filesystem.list),
    (_Files.make_dir, Filesystem.make_dir),
    (FakeAsyncSandbox.create, AsyncSandbox.create),
    (FakeAsyncSandbox.is_running, AsyncSandbox.is_running),
    # The class-level variants `AsyncSandbox.connect/kill/get_info(sandbox_id, ...)` dispatch to these.
    (FakeAsyncSandbox.connect, AsyncSandbox._cls_connect_sandbox),
    (FakeAsyncSandbox.kill, SandboxApi._cls_kill),
    (FakeAsyncSandbox.get_info, SandboxApi._cls_get_info),
]


@pytest.mark.parametrize(("fake", "real"), PAIRS, ids=[r.__qualname__ for _, r in PAIRS])
def test_fake_signature_matches_sdk(fake, real) -> None:
    fake_params = inspect.signature(fake).parameters
    real_params = inspect.signature(real).parameters
    for name, param in fake_params.items():
        if name in ("self", "cls") or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert name in real_params, f"the fake accepts {name!r}; the SDK's {real.__qualname__} does not"
        assert param.default == real_params[name].default, f"{real.__qualname__}({name}) default differs"
        assert param.kind == real_params[name].kind, f"{real.__qualname__}({name}) kind differs"
    positional = [
        n for n, p in real_params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n != "self"
    ]
    fake_positional = [
        n
        for n, p in fake_params.items()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n not in ("self", "cls")
    ]
    assert fake_positional == positional[: len(fake_positional)]
