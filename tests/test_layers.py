"""The layering, checked from the source (AST, no import-linter dependency).

    layer          packages                                may import
    front door     corral.{cli,up,serving,frontdoor,       everything below
                   mcp_config,sessions,viewer}
    brain          corral.harness                          session library, kernel (sandbox and
                                                           credentials only over MCP)
    servers        corral.servers                          vault, kernel
    vault          corral.vault                            kernel
    kernel         corral.{errors,config,auth}             nothing of ours above

Every import counts, also the lazy ones inside functions and those under TYPE_CHECKING:
a lazy import still ties the modules together for a reader and a type checker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "corral": ROOT / "corral",
    "corral.servers": ROOT / "servers",
    "corral.harness": ROOT / "harness",
    "corral.vault": ROOT / "vault",
}
FRONT_DOOR = (
    "corral.cli",
    "corral.up",
    "corral.serving",
    "corral.frontdoor",
    "corral.mcp_config",
    "corral.sessions",
    "corral.viewer",
)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *rel[:-1])) if rel[-1] == "__init__" else ".".join((package, *rel))
            found.setdefault(name, path)  # corral/servers does not exist: servers/ is corral.servers
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module, or a name inside one) refers to."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
        else:
            continue
        out.update(t for t in map(_resolve, targets) if t is not None and t != module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _inside(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m in GRAPH if _inside(m, sources) for t in GRAPH[m] if _inside(t, forbidden))


def test_the_graph_sees_the_tree():
    # Guards the checker itself: a walk that found nothing would pass every rule below.
    assert {"corral.cli", "corral.servers.session.store", "corral.harness.run", "corral.vault.policy"} <= set(MODULES)
    assert "corral.servers.session.store" in GRAPH["corral.servers.session.sqlite"]
    assert "corral.viewer.timeline" in GRAPH["corral.sessions"]  # a lazy import inside a function counts


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        (("corral.servers", "corral.vault", "corral.harness"), FRONT_DOOR),
        (("corral.harness",), ("corral.servers.sandbox", "corral.servers.credentials")),  # over MCP only
        (("corral.vault",), ("corral.servers",)),
        (
            ("corral.errors", "corral.config", "corral.auth"),
            ("corral.servers", "corral.harness", "corral.vault", *FRONT_DOOR),
        ),
    ],
    ids=["no-front-door-below", "harness-over-mcp", "vault-below-servers", "kernel-at-the-bottom"],
)
def test_no_upward_arrows(sources, forbidden):
    assert _violations(sources, forbidden) == []


@pytest.mark.parametrize(
    ("interface", "implementations"),
    [
        (
            "corral.servers.sandbox.backend",
            ("corral.servers.sandbox.bubblewrap", "corral.servers.sandbox.docker", "corral.servers.sandbox.e2b"),
        ),
        ("corral.servers.session.store", ("corral.servers.session.sqlite", "corral.servers.session.postgres")),
    ],
)
def test_interfaces_do_not_import_their_implementations(interface, implementations):
    assert not GRAPH[interface] & set(implementations)


def _cycle() -> list[str] | None:
    """One import cycle among our modules, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(GRAPH):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(GRAPH[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(GRAPH[child]))))
                path.append(child)
    return None


def test_no_import_cycles():
    assert _cycle() is None
