"""`corral up`: the three servers over streamable HTTP on 127.0.0.1, one command.

One uvicorn process, one port: `/session/mcp`, `/sandbox/mcp`, `/credentials/mcp`, and
the read-only session viewer at `/sessions`, all behind one bearer token (generated on
first run, kept in `$CORRAL_HOME/token`, 0600) and Host/Origin checks. On start it
checks each server over HTTP with a real MCP client and prints one health line per
server and the client configuration; Ctrl-C or SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys

from corral import mcp_config
from corral.auth import load_or_create_token
from corral.errors import InvalidArgument
from corral.frontdoor import UpSettings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start all three servers over HTTP on 127.0.0.1 (Ctrl-C stops)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", help="address to listen on (default $CORRAL_UP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default $CORRAL_UP_PORT or 8750)")
    p.set_defaults(func=_up)
    mcp_config.register(sub)


def _up(args: argparse.Namespace) -> int:
    overrides = {"up_host": args.host, "up_port": args.port}
    settings = UpSettings(**{k: v for k, v in overrides.items() if v is not None})  # flags win over CORRAL_UP_*
    host = _loopback(settings.up_host)
    port = settings.up_port
    home = settings.data_dir()
    token = load_or_create_token(home)
    from corral.servers.mcp_shell import http_app
    from corral.serving import (  # the SDK and uvicorn: only when serving
        bind,
        build_servers,
        serve_until_stopped,
    )
    from corral.viewer.web import COOKIE_PATHS, viewer_routes

    sock = bind(host, port)
    port = sock.getsockname()[1]  # --port 0: the kernel picked one
    base = settings.base_url(host, port)
    try:
        built = build_servers()
    except BaseException:
        sock.close()
        raise
    from corral.probe import clear_up_state, write_up_state

    write_up_state(home, base)
    try:
        routes = viewer_routes(built.store) if built.store is not None else []
        app = http_app(
            built.servers,
            host=host,
            port=port,
            token=token,
            routes=routes,
            cookie_paths=COOKIE_PATHS,
            max_file_bytes=built.max_file_bytes,
        )
        stopped_by = asyncio.run(serve_until_stopped(app, sock, built, base, token, home))
    finally:
        clear_up_state(home)
        built.close()
        sock.close()
    print(f"corral up: stopped{f' ({stopped_by})' if stopped_by else ''}", file=sys.stderr, flush=True)
    return 0


def _loopback(host: str) -> str:
    """Loopback only: the token travels in plain HTTP, fine on lo, not on a network."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgument(
            f"corral up listens on loopback only, not {host!r}",
            hint="use 127.0.0.1 (the default); to reach it from elsewhere, put a TLS-terminating proxy in front",
        )
    return host
