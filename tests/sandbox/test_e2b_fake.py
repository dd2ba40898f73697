"""The e2b fake honours the installed SDK's interface: same method names, parameters, defaults."""

from __future__ import annotations

import inspect

import pytest
from e2b import AsyncSandbox
from e2b.sandbox_async.commands.command import Commands
from e2b.sandbox_async.filesystem.filesystem import Filesystem

from .fake_e2b import FakeAsyncSandbox, _Commands, _Files

PAIRS = [
    (_Commands.run, Commands.run),
    (_Files.read, Filesystem.read),
    (_Files.write, Filesystem.write),
    (_Files.list, Filesystem.list),
    (FakeAsyncSandbox.create, AsyncSandbox.create),
    (FakeAsyncSandbox.is_running, AsyncSandbox.is_running),
]


@pytest.mark.parametrize(("fake", "real"), PAIRS, ids=[r.__qualname__ for _, r in PAIRS])
def test_fake_signature_matches_sdk(fake, real) -> None:  # noqa: ANN001
    fake_params = inspect.signature(fake).parameters
    real_params = inspect.signature(real).parameters
    for name, param in fake_params.items():
        if name in ("self", "cls") or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert name in real_params, f"the fake accepts {name!r}; the SDK's {real.__qualname__} does not"
        assert param.default == real_params[name].default, f"{real.__qualname__}({name}) default differs"
        assert param.kind == real_params[name].kind, f"{real.__qualname__}({name}) kind differs"
    positional = [n for n, p in real_params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n != "self"]
    fake_positional = [n for n, p in fake_params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n not in ("self", "cls")]
    assert fake_positional == positional[: len(fake_positional)]
