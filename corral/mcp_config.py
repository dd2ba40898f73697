"""`corral mcp-config claude-desktop | claude-code | json [--http] [--apply]`.

Prints the exact client configuration for this install: the absolute path of the
`corral` that runs this command, `corral serve NAME` over stdio by default, or the
`corral up` URLs with the bearer token (`--http`). `--apply` writes it: Claude Desktop's
config file is merged (other servers kept, a backup of the old file beside it); Claude
Code gets `claude mcp add` per server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corral.auth import load_or_create_token
from corral.errors import InvalidArgument, Unavailable
from corral.frontdoor import SERVER_MODULES, UpSettings

__all__ = ["claude_code_commands", "desktop_config_path", "merge_desktop_config", "register", "server_entries"]

PREFIX = "corral-"
# Settings that a launched server must see to use the same data dir and backends as
# this shell; names that look secret stay out of a config file.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSPHRASE")
CLAUDE_TIMEOUT_S = 60


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcp-config", help="print (or apply) the MCP client configuration for this install", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("client", choices=["claude-desktop", "claude-code", "json"], help="which client's format")
    p.add_argument("--http", action="store_true", help="point at `corral up` (URL + bearer token) instead of launching stdio servers")
    p.add_argument("--apply", action="store_true", help="write it: merge into Claude Desktop's config file, or run `claude mcp add`")
    p.add_argument("--config-file", type=Path, help="Claude Desktop config file (default: the platform's usual place)")
    p.add_argument("--scope", choices=["local", "project", "user"], default="user", help="Claude Code scope for --apply (default: user)")
    p.set_defaults(func=_main)


def corral_command() -> list[str]:
    """How to launch this very install, as an absolute command."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "corral" and argv0.exists():
        return [str(argv0.absolute())]
    found = shutil.which("corral")
    if found and Path(found).parent == Path(sys.executable).parent:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "corral.cli"]


def passed_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(environ.items()) if k.startswith("CORRAL_") and not any(w in k for w in SECRET_WORDS)}


def http_entries(base: str, token: str, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The servers at `base` (`corral up`) as HTTP entries carrying the bearer token."""
    return {PREFIX + n: {"type": "http", "url": f"{base}/{n}/mcp", "headers": {"Authorization": f"Bearer {token}"}} for n in names}


def server_entries(*, http: bool, settings: UpSettings, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`{"corral-session": {...}, ...}` in the shape Claude Desktop, Claude Code and most clients read."""
    entries: dict[str, dict[str, Any]] = {}
    if http:
        return http_entries(settings.base_url(), load_or_create_token(settings.data_dir()), list(SERVER_MODULES))
    command = corral_command()
    for name in SERVER_MODULES:
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
            raise InvalidArgument(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); left it untouched", hint="fix or move that file, then run this again") from err
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers", {}), dict):
            raise InvalidArgument(f"{path} does not hold a JSON object with an mcpServers object; left it untouched", hint="fix or move that file, then run this again")
        path.with_name(path.name + ".bak").write_text(text, encoding="utf-8")
    config.setdefault("mcpServers", {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: Claude Desktop never reads half a file


def claude_code_commands(entries: dict[str, dict[str, Any]], scope: str) -> list[list[str]]:
    commands = []
    for name, entry in entries.items():
        if entry.get("type") == "http":
            header = next(iter(entry["headers"].items()))
            commands.append(["claude", "mcp", "add", "--scope", scope, "--transport", "http", name, entry["url"], "--header", f"{header[0]}: {header[1]}"])
        else:
            envs = [arg for k, v in entry.get("env", {}).items() for arg in ("-e", f"{k}={v}")]
            # NAME before `-e`: `-e` takes several values and would swallow it.
            commands.append(["claude", "mcp", "add", "--scope", scope, name, *envs, "--", entry["command"], *entry["args"]])
    return commands


def apply_claude_code(commands: list[list[str]], scope: str) -> None:
    claude = shutil.which("claude")
    if claude is None:
        raise Unavailable("the Claude Code CLI (`claude`) is not on PATH", hint="install it (npm install -g @anthropic-ai/claude-code) or run the printed commands yourself")
    for cmd in commands:
        name = cmd[cmd.index("--transport") + 2] if "--transport" in cmd else cmd[cmd.index("--scope") + 2]
        # Replace, not duplicate: `claude mcp add` refuses a name that exists.
        _claude([claude, "mcp", "remove", "--scope", scope, name], check=False)
        _claude([claude, *cmd[1:]], check=True)
        print(f"added {name} to Claude Code ({scope} scope)")


def _claude(cmd: list[str], *, check: bool) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CLAUDE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as err:
        raise Unavailable(f"`{shlex.join(cmd[:4])} ...` did not answer in {CLAUDE_TIMEOUT_S}s", hint="run the printed commands yourself") from err
    if check and done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise Unavailable(f"`{shlex.join(cmd[:5])} ...` failed: {why[-1] if why else 'exit ' + str(done.returncode)}", hint="run the printed commands yourself")


def _main(args: argparse.Namespace) -> int:
    settings = UpSettings()
    if args.http and args.client == "claude-desktop":
        raise InvalidArgument(
            "Claude Desktop's config file launches local (stdio) servers; it does not take a URL and header",
            hint="drop --http (Claude Desktop will start `corral serve ...` itself), or add the URL in Claude Desktop's connector settings",
        )
    entries = server_entries(http=args.http, settings=settings, env=passed_env(dict(os.environ)))
    if args.client == "claude-code":
        commands = claude_code_commands(entries, args.scope)
        if args.apply:
            apply_claude_code(commands, args.scope)
        else:
            print("\n".join(shlex.join(c) for c in commands))
        return 0
    if args.apply:
        if args.client != "claude-desktop":
            raise InvalidArgument("--apply needs a client to write to: claude-desktop or claude-code", hint="paste the printed JSON into your client's config instead")
        path = args.config_file or desktop_config_path()
        merge_desktop_config(path, entries)
        print(f"wrote {', '.join(entries)} to {path}; restart Claude Desktop to load them")
        return 0
    print(json.dumps({"mcpServers": entries}, indent=2))
    return 0
