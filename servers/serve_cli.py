"""`corral serve sandbox|session|credentials [--http HOST:PORT]`."""

from __future__ import annotations

import argparse
import importlib

from corral.servers import SERVER_MODULES as SERVERS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one MCP server (stdio by default)", description=__doc__)
    p.add_argument("server", choices=sorted(SERVERS), help="which server")
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve streamable HTTP at HOST:PORT instead of stdio, behind the install's bearer token ($CORRAL_HOME/token)",
    )
    p.add_argument(
        "--no-token",
        action="store_true",
        help="with --http: accept requests without the token (any local process can then call the server)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from corral.config import CoreSettings

    settings = CoreSettings()
    token = None
    if args.http and not args.no_token:
        from corral.auth import load_or_create_token

        token = load_or_create_token(settings.data_dir())
    importlib.import_module(SERVERS[args.server]).run(args.http, token=token, stdio=settings.stdio)
    return 0
