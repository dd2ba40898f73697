"""The default backend: a sandbox is a directory on disk; each command is one `bwrap`.

Layout of a sandbox `<root>/<id>/`: `workspace/` (mounted at /workspace, the workdir),
`home/` (/root), `tmp/` (/tmp), `etc/passwd` and `etc/group` (a synthetic root user).
Each `execute` starts `bwrap` with new user, pid, ipc, uts, cgroup and (unless
`network: full`) net namespaces; the host's system dirs are mounted read-only, only a
safe subset of /etc, no host environment (`--clearenv`). Inside, the command runs as
uid 0 of its namespace with no capabilities on the host, under `prlimit` (address space,
processes, file size, CPU time) applied *inside* the namespace so the process count is
per sandbox, not per host user.

When the server runs as root, sandboxes run as an unprivileged host uid (`run_as_uid`):
RLIMIT_NPROC does not bind host root, and a sandbox must never be host root anyway.
bwrap resolves its bind sources as that uid, so the sandbox root must be traversable by
it: as root the default root is /var/lib/corral/sandboxes (0711, not listable).

Nothing runs between commands (a background process dies with its command: the pid
namespace goes with it), so a sandbox costs only its directory, and provisioning is a mkdir.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from corral.errors import SandboxLost, Unavailable

from . import hostfs
from .backend import (
    HASH_LIMIT,
    WORKDIR,
    Backend,
    ExecRequest,
    ExecResult,
    FileData,
    Listing,
    SandboxRef,
    SandboxSpec,
)
from .config import BubblewrapConfig
from .process import run_bounded

__all__ = ["INSTALL_HINT", "BubblewrapBackend"]

INSTALL_HINT = "bubblewrap (bwrap) is not installed: run `apt-get install bubblewrap`"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
# /etc entries a userland needs (loader, certificates, alternatives); never shadow, ssl/private, ...
ETC_SAFE = [
    "/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf", "/etc/ca-certificates", "/etc/ca-certificates.conf", "/etc/localtime",
    "/etc/nsswitch.conf", "/etc/mime.types", "/etc/profile", "/etc/bash.bashrc", "/etc/inputrc",
]  # fmt: skip
ETC_NETWORK = ["/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf", "/etc/protocols", "/etc/services"]
PASSWD = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class BubblewrapBackend(Backend):
    name = "bubblewrap"
    isolation = "namespaces"

    def __init__(self, config: BubblewrapConfig) -> None:
        bwrap = shutil.which(config.bwrap)
        if bwrap is None:
            raise Unavailable(INSTALL_HINT, hint="then start the server again")
        self.bwrap = bwrap
        self.prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
        self.setpriv = shutil.which("setpriv")
        self.config = config
        # As root, never run sandboxes as root; otherwise they run as whoever runs the server.
        self.uid = (config.run_as_uid or 65534) if os.geteuid() == 0 else None
        self.root = config.root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.uid is not None:
            _make_traversable(self.root, self.uid)
        self.etc = _snapshot_etc(self.root)
        self.system_args = _system_args(self.etc)

    # -- lifecycle -----------------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        base = self._dir(sandbox_id)
        base.mkdir(mode=0o700)
        for sub in ("workspace", "home", "tmp"):
            (base / sub).mkdir(mode=0o1777 if sub == "tmp" else 0o755)
        if self.uid is not None:
            for path in (base, base / "workspace", base / "home", base / "tmp"):
                os.chown(path, self.uid, self.uid)
        return SandboxRef(id=sandbox_id, spec=spec)

    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        base = self._dir(ref.id)
        if keep_workspace:
            for sub in ("home", "tmp"):
                await asyncio.to_thread(shutil.rmtree, base / sub, ignore_errors=True)
        else:
            await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]:
        return "running" if (self._dir(ref.id) / "workspace").is_dir() else "lost"

    # -- execute -------------------------------------------------------------------------

    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult:
        workspace = self._dir(ref.id) / "workspace"

        async def vanished() -> bool:
            return not workspace.is_dir()

        if await vanished():
            raise SandboxLost(f"sandbox {ref.id} is gone: its workspace no longer exists")
        done = await run_bounded(
            self._argv(ref.id, ref.spec, request),
            stdin=request.stdin,
            timeout_s=request.timeout_s,
            output_limit=request.output_limit,
            watch=vanished,
            **self._popen_user(),
        )
        if done.lost or await vanished():
            raise SandboxLost(f"sandbox {ref.id} vanished while running the command (its workspace was deleted)")
        if done.returncode is not None and done.returncode < 0 and not done.timed_out:
            # bwrap itself died of a signal we did not send: someone killed the sandbox.
            raise SandboxLost(f"sandbox {ref.id} was killed from outside (signal {-done.returncode}) mid-command")
        setup_error = done.stderr.text()
        if done.returncode == 1 and not done.stdout.total and setup_error.startswith("bwrap: "):
            # bwrap could not build the sandbox (a bind source gone, namespaces refused): not the command's doing
            raise Unavailable(f"could not start sandbox {ref.id}: {setup_error.strip()}", hint="check the server log and settings")
        return ExecResult.of(done)

    def _popen_user(self) -> dict[str, object]:
        # An empty environment for bwrap itself too: it is PID 1 inside, and the sandbox can
        # read /proc/1/environ; --clearenv only cleans the command's.
        if self.uid is None or self.setpriv:
            return {"env": {}}
        return {"env": {}, "user": self.uid, "group": self.uid, "extra_groups": []}

    def _drop_to_uid(self) -> list[str]:
        """As root: `setpriv` drops to the sandbox uid. Popen(user=...) would do it too, but
        forces a full fork() of the server (no vfork), 5-30 ms for a big Python process."""
        if self.uid is None or not self.setpriv:
            return []
        return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]

    def _argv(self, sandbox_id: str, spec: SandboxSpec, request: ExecRequest) -> list[str]:
        base = str(self._dir(sandbox_id))
        argv = [*self._drop_to_uid(), self.bwrap, "--unshare-user", "--uid", "0", "--gid", "0", "--unshare-pid", "--unshare-ipc"]
        argv += ["--unshare-uts", "--hostname", "sandbox", "--unshare-cgroup-try"]
        if spec.network == "none":
            argv.append("--unshare-net")
        argv += ["--die-with-parent", "--new-session", "--clearenv", *self.system_args]
        argv += ["--bind", f"{base}/workspace", WORKDIR, "--bind", f"{base}/home", "/root", "--bind", f"{base}/tmp", "/tmp"]
        for bind in self.config.extra_binds:
            argv += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.dest]
        argv += ["--remount-ro", "/", "--chdir", _cwd(request.cwd)]
        for key, value in {**BASE_ENV, **spec.env, **request.env}.items():
            argv += ["--setenv", key, value]
        argv += ["--", self.prlimit, *_limits(spec, request), "--", SHELL, "-c", request.command]
        return argv

    # -- files (host side, resolved inside the workspace) ---------------------------------

    @contextmanager
    def _root_fd(self, sandbox_id: str) -> Iterator[int]:
        try:
            fd = os.open(self._dir(sandbox_id) / "workspace", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise SandboxLost(f"sandbox {sandbox_id} is gone: its workspace no longer exists") from err
        try:
            yield fd
        finally:
            os.close(fd)

    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
        with self._root_fd(ref.id) as fd:
            return await asyncio.to_thread(hostfs.read_file, fd, path, offset, limit, hash_limit)

    async def write(
        self, ref: SandboxRef, path: str, data: bytes, mode: int | None, if_sha256: str | None = None
    ) -> None:
        with self._root_fd(ref.id) as fd:
            await asyncio.to_thread(hostfs.write_file, fd, path, data, mode, self.uid, if_sha256)

    async def list(self, ref: SandboxRef, path: str, depth: int, max_entries: int) -> Listing:
        with self._root_fd(ref.id) as fd:
            return await asyncio.to_thread(hostfs.list_dir, fd, path, depth, max_entries)


def _make_traversable(root: Path, uid: int) -> None:
    """bwrap runs as `uid` and must reach `<root>/<id>/...`: check every ancestor lets it pass."""
    root.chmod(0o711)  # traverse, not list: sandbox ids stay unguessable
    for parent in root.resolve().parents:
        st = parent.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise Unavailable(
                f"sandbox dir {root} is not reachable by the sandbox uid {uid} ({parent} is not traversable)",
                hint="set CORRAL_SANDBOX_DIR to a directory whose parents are world-traversable (e.g. /var/lib/corral/sandboxes)",
            )


def _cwd(cwd: str | None) -> str:
    if not cwd:
        return WORKDIR
    return cwd if cwd.startswith("/") else f"{WORKDIR}/{cwd}"


def _limits(spec: SandboxSpec, request: ExecRequest) -> list[str]:
    mib = 1 << 20
    return [
        f"--as={spec.memory_mb * mib}",
        f"--nproc={spec.max_processes}",
        f"--fsize={spec.disk_mb * mib}",
        # CPU seconds per process: a backstop behind the wall-clock timeout.
        f"--cpu={math.ceil(request.timeout_s) + 5}",
    ]


def _system_args(etc: Path) -> list[str]:
    """Read-only system dirs as the host lays them out (merged /usr or not), /proc, /dev, safe /etc."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args + ["--proc", "/proc", "--dev", "/dev", "--ro-bind", str(etc), "/etc"]


def _etc_fingerprint(paths: list[str]) -> str:
    """Changes when a copied /etc entry does (files are replaced by rename, so dir mtimes move too)."""
    parts = [PASSWD, GROUP]
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        parts.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _snapshot_etc(root: Path) -> Path:
    """A copy of the safe part of the host's /etc plus a synthetic passwd/group: one bind mount
    per command instead of one per file (bwrap start-up time). Re-made when the host's changed."""
    paths = ETC_SAFE + ETC_NETWORK + sorted(glob.glob("/etc/python3*"))
    fingerprint = _etc_fingerprint(paths)
    final = root / ".etc"
    try:
        if (final / ".corral-fingerprint").read_text() == fingerprint:
            return final
    except FileNotFoundError:
        pass
    staging = Path(tempfile.mkdtemp(prefix=".etc-", dir=root))
    for path in paths:
        dest = staging / os.path.relpath(path, "/etc")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.copytree(path, dest, symlinks=True, ignore_dangling_symlinks=True)
        elif os.path.lexists(path):
            shutil.copy2(path, dest, follow_symlinks=False)
    (staging / "passwd").write_text(PASSWD)
    (staging / "group").write_text(GROUP)
    (staging / "hostname").write_text("sandbox\n")
    (staging / ".corral-fingerprint").write_text(fingerprint)
    staging.chmod(0o755)
    old = root / f".etc-old-{os.getpid()}"
    try:  # commands already started keep their mount of the old copy
        final.rename(old)
    except FileNotFoundError:
        pass
    try:
        staging.rename(final)
    except OSError:  # another server on this root won the race: its copy is as good
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final
