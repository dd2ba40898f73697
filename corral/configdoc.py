"""`docs/configuration.md`, generated from the settings classes (their `Field(description=...)`).

    python -m corral.configdoc > docs/configuration.md

`tests/test_docs.py` fails when the committed page differs from what this prints, so the
page cannot drift from the code that reads the settings.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

__all__ = ["render"]

INTRO = """\
# Configuration

Every setting is an environment variable, read once at start-up by the command that needs
it. This page is generated from the settings classes (`python -m corral.configdoc`); a test
fails when it is stale.
"""


def _areas() -> list[tuple[str, type[BaseSettings]]]:
    from corral.config import CoreSettings
    from corral.frontdoor import UpSettings
    from corral.harness.config import HarnessSettings
    from corral.harness.worker_config import WorkerSettings
    from corral.servers.sandbox.config import SandboxSettings
    from corral.servers.session.config import SessionSettings
    from corral.vault.config import VaultSettings

    return [
        ("Every command", CoreSettings),
        ("corral up", UpSettings),
        ("Session log", SessionSettings),
        ("Sandboxes", SandboxSettings),
        ("Vault and credential proxy", VaultSettings),
        ("Harness (corral run / wake)", HarnessSettings),
        ("Worker pool (corral worker)", WorkerSettings),
    ]


def _variable(name: str, field: FieldInfo, prefix: str) -> str:
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if alias is not None and hasattr(alias, "choices"):
        return " / ".join(str(c) for c in alias.choices)
    return (prefix + name).upper()


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if value is None or value == "":
        return "—"
    return f"`{value}`"


def _rows(cls: type[BaseSettings], seen: set[str]) -> Iterator[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name, field in cls.model_fields.items():
        var = _variable(name, field, prefix)
        if var in seen:  # inherited: documented with the class that declares it
            continue
        seen.add(var)
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        yield f"| `{var}` | {_default(field)} | {text} |"


def render() -> str:
    out, seen = [INTRO], set[str]()
    for title, cls in _areas():
        rows = list(_rows(cls, seen))
        if rows:
            out += [f"## {title}\n", "| variable | default | what it does |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
