"""`corral mcp-config claude-desktop | claude-code | json [--http] [--apply]`.

Prints the exact client configuration for this install: the absolute path of the
`corral` that runs this command, `corral serve NAME` over stdio by default, or the
`corral up` URLs with the bearer token (`--http`). `--apply` writes it: Claude Desktop's
config file is merged (other servers kept, a backup of the old file beside it, both
0600); Claude Code gets `claude mcp add` per server.

No secret goes into a file or onto a command line. Claude Code reads the bearer token at
connect time through a `headersHelper` (`corral mcp-config auth-header`, which reads
$CORRAL_HOME/token), and a database password in CORRAL_SESSION_STORE/CORRAL_QUEUE_URL
becomes a `${VAR}` reference that Claude Code expands from its own environment; Claude
Desktop expands nothing, so there the password is left out (libpq reads ~/.pgpass).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from corral.auth import load_or_create_token
from corral.errors import InvalidArgument, Unavailable
from corral.frontdoor import SERVER_MODULES, UpSettings

__all__ = [
    "auth_header_command",
    "claude_code_commands",
    "desktop_config_path",
    "merge_desktop_config",
    "register",
    "server_entries",
]

PREFIX = "corral-"
# Settings that a launched server must see to use the same data dir and backends as
# this shell; names that look secret stay out of a config file.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSPHRASE")
CLAUDE_TIMEOUT_S = 60


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mcp-config",
        help="print (or apply) the MCP client configuration for this install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "client",
        choices=["claude-desktop", "claude-code", "json", "auth-header"],
        help="which client's format (auth-header: print the bearer header as JSON, for a client's headersHelper)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="point at `corral up` (URL + bearer token) instead of launching stdio servers",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="write it: merge into Claude Desktop's config file, or run `claude mcp add`",
    )
    p.add_argument("--config-file", type=Path, help="Claude Desktop config file (default: the platform's usual place)")
    p.add_argument(
        "--scope",
        choices=["local", "project", "user"],
        default="user",
        help="Claude Code scope for --apply (default: user)",
    )
    p.add_argument(
        "--port",
        type=int,
        help="with --http: the port of `corral up` (default: the running one's, else $CORRAL_UP_PORT)",
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVER_MODULES),
        help=f"comma-separated servers to register (default: {','.join(SERVER_MODULES)})",
    )
    p.add_argument(
        "--workspace-key",
        metavar="KEY",
        help="the key of this client's default sandbox, e.g. one per project: a restarted client (or another on "
        "the same key) finds the same files (default: one default sandbox per CORRAL_HOME)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --http: say, per server, whether a client can connect, and if not why",
    )
    p.set_defaults(func=_main)


def server_list(value: str) -> list[str]:
    """`--servers sandbox,credentials` -> the names, each a known server."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVER_MODULES]
    if unknown or not names:
        raise InvalidArgument(
            f"unknown server(s) {', '.join(unknown) or '(none)'} in --servers",
            hint=f"choose from {','.join(SERVER_MODULES)}",
        )
    return names


def up_base_url(settings: UpSettings, port: int | None) -> str:
    """Where `corral up` answers: `--port`, else the running one (its state file), else the settings."""
    if port is not None:
        return settings.base_url(port=port)
    from corral.probe import read_up_state

    return read_up_state(settings.data_dir()) or settings.base_url()


def corral_command() -> list[str]:
    """How to launch this very install, as an absolute command."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "corral" and argv0.exists():
        return [str(argv0.absolute())]
    found = shutil.which("corral")
    if found and Path(found).parent == Path(sys.executable).parent:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "corral.cli"]


def passed_env(environ: dict[str, str], *, expands: bool, warn: Callable[[str], None]) -> dict[str, str]:
    """The CORRAL_* settings a launched server needs, without secrets: names that look secret
    stay out; a URL carrying a password becomes `${NAME}` (`expands`: the client expands it
    from its own environment) or loses the password."""
    env: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith("CORRAL_") or any(w in name for w in SECRET_WORDS):
            continue
        if _password_of(value) is None:
            env[name] = value
        elif expands:
            env[name] = f"${{{name}}}"
            warn(
                f"{name} holds a password: the config refers to it as ${{{name}}}; set {name} where the client runs (or use ~/.pgpass)"
            )
        else:
            env[name] = _without_password(value)
            warn(
                f"{name} holds a password, which this client's config file would keep in plain text: left it out; put it in ~/.pgpass (chmod 600)"
            )
    return env


def _password_of(value: str) -> str | None:
    try:
        return urlsplit(value).password if "://" in value else None
    except ValueError:
        return None


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}{port}"))


def auth_header_command(home: Path, workspace_key: str | None = None) -> str:
    """A shell command printing `{"Authorization": "Bearer <token>"}` from the token file:
    Claude Code's `headersHelper`, run at connect time, so the token is never written down."""
    key = ["--workspace-key", workspace_key] if workspace_key else []
    return shlex.join(["env", f"CORRAL_HOME={home}", *corral_command(), "mcp-config", "auth-header", *key])


def http_entries(
    base: str, token: str, names: Iterable[str], workspace_key: str | None = None
) -> dict[str, dict[str, Any]]:
    """The servers at `base` (`corral up`) as HTTP entries carrying the bearer token."""
    headers = {"Authorization": f"Bearer {token}", **({WORKSPACE_HEADER: workspace_key} if workspace_key else {})}
    return {PREFIX + n: {"type": "http", "url": f"{base}/{n}/mcp", "headers": dict(headers)} for n in names}


def server_entries(
    *,
    http: bool,
    settings: UpSettings,
    env: dict[str, str],
    names: Iterable[str] = SERVER_MODULES,
    base: str | None = None,
    workspace_key: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`{"corral-session": {...}, ...}` in the shape Claude Desktop, Claude Code and most clients read."""
    entries: dict[str, dict[str, Any]] = {}
    if http:
        token = load_or_create_token(settings.data_dir())
        return http_entries(base or settings.base_url(), token, names, workspace_key)
    command = corral_command()
    if workspace_key:
        env = {**env, "CORRAL_SANDBOX_CLIENT_KEY": workspace_key}
    for name in names:
        entry: dict[str, Any] = {"command": command[0], "args": [*command[1:], "serve", name]}
        if env:
            entry["env"] = env
        entries[PREFIX + name] = entry
    return entries


def desktop_config_path() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "Claude" / "claude_desktop_config.json"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "Claude" / "claude_desktop_config.json"


def merge_desktop_config(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Add or replace our entries in `path`, keeping everything else; atomic, with a backup."""
    config: dict[str, Any] = {}
    if path.exists():
        text = path.read_text(encoding="utf-8")
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise InvalidArgument(
                f"{path} is not valid JSON (line {err.lineno}: {err.msg}); left it untouched",
                hint="fix or move that file, then run this again",
            ) from err
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers", {}), dict):
            raise InvalidArgument(
                f"{path} does not hold a JSON object with an mcpServers object; left it untouched",
                hint="fix or move that file, then run this again",
            )
        _write_private(path.with_name(path.name + ".bak"), text)
    config.setdefault("mcpServers", {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _write_private(tmp, json.dumps(config, indent=2) + "\n")
    tmp.replace(path)  # atomic: Claude Desktop never reads half a file


def _write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner only (0600), whatever the umask or the old file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def claude_code_commands(
    entries: dict[str, dict[str, Any]], scope: str, home: Path, workspace_key: str | None = None
) -> list[list[str]]:
    """`claude mcp add-json` per server. `alwaysLoad`: Claude Code otherwise sends its first
    model request before a stdio server that takes a second to start has listed its tools,
    and the model's first call to one fails with "still connecting"."""
    commands = []
    for name, entry in entries.items():
        if entry.get("type") == "http":  # the token comes from the helper, never from argv or the config file
            helper = auth_header_command(home, workspace_key)
            config: dict[str, Any] = {"type": "http", "url": entry["url"], "headersHelper": helper}
        else:
            config = {
                "type": "stdio",
                "command": entry["command"],
                "args": entry["args"],
                **({"env": entry["env"]} if entry.get("env") else {}),
            }
        config["alwaysLoad"] = True
        commands.append(["claude", "mcp", "add-json", "--scope", scope, name, json.dumps(config)])
    return commands


def apply_claude_code(commands: list[list[str]], scope: str) -> None:
    claude = shutil.which("claude")
    if claude is None:
        raise Unavailable(
            "the Claude Code CLI (`claude`) is not on PATH",
            hint="install it (npm install -g @anthropic-ai/claude-code) or run the printed commands yourself",
        )
    for cmd in commands:
        name = cmd[cmd.index("--scope") + 2]
        # Replace, not duplicate: `claude mcp add` refuses a name that exists.
        _claude([claude, "mcp", "remove", "--scope", scope, name], check=False)
        _claude([claude, *cmd[1:]], check=True)
        print(f"added {name} to Claude Code ({scope} scope)")


def _claude(cmd: list[str], *, check: bool) -> None:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CLAUDE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise Unavailable(
            f"`{shlex.join(cmd[:4])} ...` did not answer in {CLAUDE_TIMEOUT_S}s",
            hint="run the printed commands yourself",
        ) from err
    if check and done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise Unavailable(
            f"`{shlex.join(cmd[:5])} ...` failed: {why[-1] if why else 'exit ' + str(done.returncode)}",
            hint="run the printed commands yourself",
        )


def _check(entries: dict[str, dict[str, Any]], settings: UpSettings) -> int:
    """One line per server; the number that cannot be reached."""
    from corral.probe import probe_http

    token = load_or_create_token(settings.data_dir())
    failed = 0
    for name, entry in entries.items():
        result = probe_http(entry["url"], token)
        failed += not result.ok
        print(f"{name}: {result.line}", file=sys.stderr if not result.ok else sys.stdout)
    return failed


def _warn(message: str) -> None:
    print(f"corral: note: {message}", file=sys.stderr)


WORKSPACE_HEADER = "X-Corral-Client"


def _workspace_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip() or len(key) > 200 or not key.isprintable():
        raise InvalidArgument(
            f"--workspace-key {key[:50]!r} is not a usable key",
            hint="up to 200 printable characters, e.g. a project name",
        )
    return key


def _main(args: argparse.Namespace) -> int:
    settings = UpSettings()
    key = _workspace_key(args.workspace_key)
    if args.client == "auth-header":
        headers = {"Authorization": f"Bearer {load_or_create_token(settings.data_dir())}"}
        print(json.dumps({**headers, **({WORKSPACE_HEADER: key} if key else {})}))
        return 0
    if args.http and args.client == "claude-desktop":
        raise InvalidArgument(
            "Claude Desktop's config file launches local (stdio) servers; it does not take a URL and header",
            hint="drop --http (Claude Desktop will start `corral serve ...` itself), or add the URL in Claude Desktop's connector settings",
        )
    env = passed_env(dict(os.environ), expands=args.client != "claude-desktop", warn=_warn)
    base = up_base_url(settings, args.port) if args.http else None
    names = server_list(args.servers)
    entries = server_entries(http=args.http, settings=settings, env=env, names=names, base=base, workspace_key=key)
    if args.check or (args.http and args.apply):
        if not args.http:
            raise InvalidArgument(
                "--check looks at a running `corral up`",
                hint="add --http (stdio servers are started by the client itself)",
            )
        failed = _check(entries, settings)
        if failed or args.check:
            if failed:
                raise Unavailable(
                    f"{failed} of {len(entries)} servers cannot be reached; nothing was applied"
                    if args.apply
                    else f"{failed} of {len(entries)} servers cannot be reached",
                    hint="start `corral up` (or pass the --port it printed), then run this again",
                )
            return 0
    if args.client == "claude-code":
        if args.scope == "project":
            _warn(
                "project scope writes ./.mcp.json, which teams commit: it holds no secret, but its paths are this machine's"
            )
        commands = claude_code_commands(entries, args.scope, settings.data_dir(), key)
        if args.apply:
            apply_claude_code(commands, args.scope)
        else:
            print("\n".join(shlex.join(c) for c in commands))
        return 0
    if args.apply:
        if args.client != "claude-desktop":
            raise InvalidArgument(
                "--apply needs a client to write to: claude-desktop or claude-code",
                hint="paste the printed JSON into your client's config instead",
            )
        path = args.config_file or desktop_config_path()
        merge_desktop_config(path, entries)
        print(f"wrote {', '.join(entries)} to {path}; restart Claude Desktop to load them")
        return 0
    if args.http:
        _warn(
            "this output carries the bearer token: keep it out of shared files (for Claude Code, `corral mcp-config claude-code --http` keeps it out of its config)"
        )
    print(json.dumps({"mcpServers": entries}, indent=2))
    return 0
