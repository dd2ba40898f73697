"""The `corral` command: one argparse tree, each area adding its own subcommands.

Every area's CLI module exposes `register(subparsers)`; each subcommand sets
`func(args) -> int | None`. Errors end as one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pydantic import ValidationError

from corral import __version__
from corral.config import CoreSettings
from corral.errors import CorralError

# Areas that add subcommands, in the order `corral --help` lists them.
AREAS = [
    "corral.up",  # up, mcp-config
    "corral.servers.serve_cli",  # serve sandbox|session|credentials
    "corral.servers.sandbox.templates_cli",  # sandbox templates add|list|rm
    "corral.harness.cli",  # run, wake
    "corral.sessions",  # sessions list|show|tail|fork
    "corral.vault.cli",  # vault set|list|rm|doctor
    "corral.harness.worker_cli",  # worker
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Managed-agent infrastructure as MCP servers: hands (sandbox), session (log), vault (credentials).",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _logging()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("corral: interrupted", file=sys.stderr)
        return 130
    except CorralError as err:
        print(f"corral: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except ValidationError as err:
        if not err.title.endswith("Settings"):
            raise
        print(f"corral: {_setting_error(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # the last line of defence: one line, never a traceback
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(
            f"corral: unexpected {type(err).__name__}: {err} (set CORRAL_LOG_LEVEL=DEBUG for details)", file=sys.stderr
        )
        return 1


def _logging() -> None:
    """CORRAL_LOG_LEVEL, applied here once for every command (a bad value is one invalid_argument line)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(CoreSettings().log_level)
    # psycopg's pool logs every failed connect attempt; the store reports the outcome as one line.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def _setting_error(err: ValidationError) -> str:
    """A bad CORRAL_* variable as one line naming the variable (settings are read from the environment)."""
    first = err.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    var = name if name.isupper() else f"CORRAL_{name.upper()}"
    return f"invalid_argument: invalid setting {var}={first.get('input')!r}: {first['msg'].removeprefix('Value error, ')} (fix or unset {var})"


if __name__ == "__main__":
    sys.exit(main())
