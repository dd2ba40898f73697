"""`corral vault set|list|rm|doctor`: manage credentials. Secrets come from stdin or a hidden prompt, never argv."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from pydantic import ValidationError

from corral.errors import CorralError, InvalidArgument
from corral.vault import open_vault
from corral.vault.config import VaultSettings
from corral.vault.policy import KINDS, Credential


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vault", help="manage credentials (secrets in a keyring, used only by the proxy)", description=__doc__
    )
    vsub = p.add_subparsers(dest="vault_command", metavar="ACTION", required=True)

    s = vsub.add_parser("set", help="add or replace a credential; the secret is read from stdin or a hidden prompt")
    s.add_argument("name")
    s.add_argument("--kind", choices=KINDS, default="bearer", help="how the secret is injected (default bearer)")
    s.add_argument("--host", action="append", required=True, help="allowed host, exact or *.example.com (repeatable)")
    s.add_argument(
        "--method",
        action="append",
        default=[],
        help="allowed HTTP method (repeatable; default GET, HEAD; git: GET, POST)",
    )
    s.add_argument(
        "--port", action="append", type=int, default=[], help="allowed port (repeatable; default 443/80 by scheme)"
    )
    s.add_argument(
        "--scheme",
        action="append",
        choices=["http", "https"],
        default=[],
        help="allowed scheme (repeatable; default https)",
    )
    s.add_argument(
        "--allow-private",
        action="store_true",
        help="allow loopback/private/link-local upstream addresses (off by default)",
    )
    s.add_argument("--header", help="kind header: the header name, e.g. X-Api-Key")
    s.add_argument("--template", default="{secret}", help="kind header: the header value, e.g. 'token {secret}'")
    s.add_argument("--query-param", help="kind query: the query parameter name")
    s.add_argument("--username", help="kind basic/git: the user name (git default x-access-token)")
    s.add_argument("--description", default="", help="what the credential is for (shown to the model)")
    s.set_defaults(func=_set)

    ls = vsub.add_parser("list", help="list credentials and their policies (never values)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    rm = vsub.add_parser("rm", help="remove a credential and its secret")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)

    doc = vsub.add_parser("doctor", help="say which keyring backend is in use and why, and check every credential")
    doc.set_defaults(func=_doctor)


def _open():
    return open_vault(VaultSettings(), os.environ.get("DBUS_SESSION_BUS_ADDRESS"))


def _read_secret(name: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        secret = getpass.getpass(f"secret for {name} (input hidden): ")
    else:
        secret = sys.stdin.read() if sys.stdin is not None else ""
    return secret.rstrip("\r\n")


def _set(args: argparse.Namespace) -> int:
    try:
        cred = Credential(
            name=args.name,
            kind=args.kind,
            hosts=args.host,
            methods=args.method,
            ports=args.port,
            schemes=args.scheme or ["https"],
            allow_private=args.allow_private,
            header=args.header,
            template=args.template,
            query_param=args.query_param,
            username=args.username,
            description=args.description,
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "policy"
        raise InvalidArgument(f"{where}: {first['msg']}") from None
    secret = _read_secret(args.name)
    vault, _ = _open()
    vault.set(cred, secret)
    print(f"stored {cred.name} ({cred.kind}) for {', '.join(cred.hosts)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    vault, _ = _open()
    creds = vault.list()
    if args.json:
        print(json.dumps([c.public() for c in creds], indent=2))
        return 0
    if not creds:
        print("no credentials; add one with `corral vault set NAME --host HOST` (secret on stdin)")
        return 0
    rows = [("NAME", "KIND", "HOSTS", "METHODS", "PORTS", "PRIVATE", "DESCRIPTION")]
    rows += [
        (
            c.name,
            c.kind,
            ",".join(c.hosts),
            ",".join(c.methods),
            ",".join(map(str, c.ports)),
            "yes" if c.allow_private else "no",
            c.description,
        )
        for c in creds
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        # widths leaves out the last column (not padded): zip stops before it
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def _rm(args: argparse.Namespace) -> int:
    vault, _ = _open()
    vault.remove(args.name)
    print(f"removed {args.name}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    settings = VaultSettings()
    vault, choice = _open()
    print(f"backend: {choice.name}")
    print(f"why: {choice.why}")
    print(f"vault dir: {vault.directory} (policies: credentials.json, audit log: audit.jsonl)")
    key = vault.directory / "keyring.key"
    if choice.name == "encrypted-file" and key.exists():
        print(f"key file: {key} (mode {key.stat().st_mode & 0o777:o})")
    if choice.insecure:
        print("warning: this backend does not protect secrets; it is used only because CORRAL_VAULT_BACKEND names it")
    problems = 0
    creds = vault.list()
    for cred in creds:
        try:
            ok = vault.keyring.get(cred.name) is not None
        except CorralError as err:
            ok, problems = False, problems + 1
            print(f"credential {cred.name}: {err}")
            continue
        problems += not ok
        print(f"credential {cred.name}: {'secret present' if ok else 'SECRET MISSING (run corral vault set again)'}")
    print(f"{len(creds)} credential(s), keyring timeout {settings.keyring_timeout_s:g}s")
    return 1 if problems else 0
