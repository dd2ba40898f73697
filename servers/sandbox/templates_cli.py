"""`corral sandbox templates add|list|rm`: the root filesystems bubblewrap sandboxes may run on.

Run it as the user that runs the sandbox server (root: /var/lib/corral/templates), on the
same machine: a template is a directory the server reads, not something sent over MCP.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    sandbox = sub.add_parser("sandbox", help="operate the sandbox server (templates)", description=__doc__)
    areas = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)
    tpl = areas.add_parser(
        "templates", help="root filesystems for bubblewrap sandboxes: add, list, rm", description=__doc__
    )
    verbs = tpl.add_subparsers(dest="templates_command", metavar="COMMAND", required=True)
    add = verbs.add_parser("add", help="register a template (unpacked once, shared read-only by its sandboxes)")
    add.add_argument("name", help="its name: lowercase letters, digits, '.', '_', '-'")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-docker", metavar="IMAGE", help="a local Docker image (docker create + docker export; never pulled)"
    )
    source.add_argument(
        "--from-rootfs",
        metavar="DIR|TARBALL",
        type=Path,
        help="a root filesystem: a directory (e.g. debootstrap) or a tarball",
    )
    add.set_defaults(func=_add)
    verbs.add_parser("list", help="the registered templates").set_defaults(func=_list)
    rm = verbs.add_parser("rm", help="unregister a template and delete its files")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)


def _settings():
    from .config import SandboxSettings

    return SandboxSettings()


def _store():
    from .templates import TemplateStore

    return TemplateStore(_settings().templates_dir())


def _add(args: argparse.Namespace) -> int:
    # As root, sandboxes run as the sandbox uid: its files are theirs to change in their own layer.
    owner = _settings().sandbox_run_as_uid if os.geteuid() == 0 else None
    template = _store().add(args.name, docker_image=args.from_docker, rootfs=args.from_rootfs, owner=owner)
    print(f"added template {template.name} ({template.source}, {template.size_bytes / 1e6:.1f} MB)")
    return 0


def _list(args: argparse.Namespace) -> int:
    for template in _store().list():
        print(f"{template.name}\t{template.size_bytes / 1e6:.1f} MB\t{template.source}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    _store().remove(args.name)
    print(f"removed template {args.name}")
    return 0
