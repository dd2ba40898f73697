"""Templates for bubblewrap: root filesystems the operator registered, by name.

A template is unpacked once into `<dir>/<name>/rootfs` (from a local Docker image with
`docker create` + `docker export`, never a pull; or from a directory or tarball, e.g. a
debootstrap tree) and described by `<dir>/<name>/template.json`: the directory *is* the
registry. Every sandbox of the template mounts that rootfs read-only as its `/`.

A client names a template, never a path: a name is checked against a strict pattern
(so `--privileged`, `/etc` or `../x` never reach a command line or a path) and must be
registered (`not_found` otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from corral.errors import Conflict, InvalidArgument, NotFound, Unavailable

__all__ = ["MOUNTPOINTS", "Template", "TemplateStore", "check_name"]

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# Where a sandbox mounts its own dirs and the host's tools (`bubblewrap.py`); made at unpack
# time because the rootfs is mounted read-only and bwrap cannot create them there.
MOUNTPOINTS = ("workspace", "root", "tmp", "proc", "dev", ".corral/host/usr")


def check_name(name: str) -> str:
    """`name` if it is a template name; a flag or a path is refused before anything looks it up."""
    if not NAME.fullmatch(name) or ".." in name:
        what = "a flag" if name.startswith("-") else "a path" if "/" in name or name.startswith(".") else "not a name"
        raise InvalidArgument(
            f"template {name!r} is {what}: a template is named by a registered name "
            "(lowercase letters, digits, '.', '_', '-'; at most 63)",
            hint="`corral sandbox templates list` shows the registered ones",
        )
    return name


class Template(BaseModel):
    name: str
    source: str
    created_at: float
    size_bytes: int
    owner: int | None = None  # the host uid its files belong to (the sandbox uid): a writable layer works over it


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def rootfs(self, name: str) -> Path:
        """The registered template's root filesystem (`not_found` if it is not registered)."""
        self.get(name)
        return self.root / name / "rootfs"

    def get(self, name: str) -> Template:
        check_name(name)
        try:
            return Template.model_validate_json((self.root / name / "template.json").read_text())
        except (OSError, ValueError):
            raise NotFound(
                f"no template {name!r} is registered on this server",
                hint="`corral sandbox templates list` shows them; an operator adds one with `corral sandbox templates add`",
            ) from None

    def list(self) -> list[Template]:
        found = []
        for entry in sorted(self.root.glob("*/template.json")):
            try:
                found.append(Template.model_validate_json(entry.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def remove(self, name: str) -> None:
        self.get(name)
        rootfs = self.root / name / "rootfs"
        users = _layers_over(rootfs)
        if users:  # deleting a lower layer under a mounted overlay is undefined behaviour
            raise Conflict(
                f"template {name!r} is in use by {users} sandbox(es) with a system layer; nothing was removed",
                hint="destroy those sandboxes first (list_sandboxes)",
            )
        # Rename first: the name is free at once, and a half-removed tree is never a template.
        doomed = self.root / f".rm-{name}-{os.getpid()}"
        (self.root / name).rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def add(
        self, name: str, *, docker_image: str | None = None, rootfs: Path | None = None, owner: int | None = None
    ) -> Template:
        """Unpack and register; `owner` (as root): give every file to the sandbox uid, so that a
        sandbox (uid 0 of a namespace mapped to it) may change any file in its copy-on-write layer."""
        check_name(name)
        if (docker_image is None) == (rootfs is None):
            raise InvalidArgument("give exactly one source: --from-docker IMAGE or --from-rootfs DIR|TARBALL")
        if (self.root / name).exists():
            raise Conflict(
                f"template {name!r} is already registered", hint=f"`corral sandbox templates rm {name}` first"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # the sandbox uid must reach a rootfs to mount it, never list them
        staging = Path(tempfile.mkdtemp(prefix=f".add-{name}-", dir=self.root))
        try:
            target = staging / "rootfs"
            target.mkdir(mode=0o755)
            if docker_image is not None:
                _from_docker(docker_image, target)
                source = f"docker:{docker_image}"
            else:
                assert rootfs is not None
                _from_rootfs(rootfs, target)
                source = f"rootfs:{rootfs.resolve()}"
            _prepare(target)
            if owner is not None:
                _run(
                    ["chown", "-R", "--no-dereference", f"{owner}:{owner}", str(target)],
                    "give the template to the sandbox uid",
                )
            template = Template(name=name, source=source, created_at=time.time(), size_bytes=_size(target), owner=owner)
            (staging / "template.json").write_text(template.model_dump_json())
            staging.chmod(0o755)
            try:
                staging.rename(self.root / name)
            except OSError as err:
                raise Conflict(f"template {name!r} is already registered") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return template


def _layers_over(rootfs: Path) -> int:
    """How many overlays on this host have `rootfs` as their lower layer."""
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return 0
    return table.count(f"lowerdir={rootfs.resolve()},") + table.count(f"lowerdir={rootfs.resolve()} ")


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as err:
        raise Unavailable(f"{argv[0]} is not installed, needed to {what}") from err
    if done.returncode != 0:
        raise InvalidArgument(f"could not {what}: {done.stderr.decode(errors='replace').strip()}")
    return done


def _from_docker(image: str, target: Path) -> None:
    """The image's filesystem, as `docker export` writes it (a local image only: never a pull)."""
    if image.startswith("-"):
        raise InvalidArgument(f"docker image {image!r} looks like a flag")
    created = _run(["docker", "create", "--pull", "never", image, "/bin/sh"], f"create a container of {image!r}")
    container = created.stdout.decode().strip()
    try:
        with subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE) as export:
            _run(["tar", "-x", "--numeric-owner", "-C", str(target)], f"unpack {image!r}", stdin=export.stdout)
        if export.returncode != 0:
            raise InvalidArgument(f"could not export {image!r} (docker export exited {export.returncode})")
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def _from_rootfs(source: Path, target: Path) -> None:
    if source.is_dir():
        _run(["cp", "-a", "--reflink=auto", f"{source}/.", str(target)], f"copy {source}")
    elif source.is_file():
        _run(["tar", "-x", "--numeric-owner", "-f", str(source), "-C", str(target)], f"unpack {source}")
    else:
        raise NotFound(f"no directory or tarball at {source}")


def _prepare(target: Path) -> None:
    """Check it is a userland a sandbox can run in; make the mountpoints bwrap needs."""
    if not os.path.lexists(target / "bin" / "sh"):
        raise InvalidArgument("that root filesystem has no /bin/sh: a sandbox could not run in it")
    for mountpoint in MOUNTPOINTS:
        rel = Path(mountpoint)
        # bwrap mounts onto these: a symlink on the way could point the mount anywhere.
        if any((target / part).is_symlink() for part in (rel, *rel.parents[:-1])):
            raise InvalidArgument(f"/{mountpoint} is a symlink in that root filesystem: a sandbox cannot mount there")
        path = target / rel
        path.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)


def _size(target: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(target):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
