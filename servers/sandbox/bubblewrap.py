"""The default backend: a sandbox is a directory on disk plus a live set of namespaces.

Layout of a sandbox `<root>/<id>/`: `workspace/` (mounted at /workspace, the workdir),
`home/` (/root), `tmp/` (/tmp), `init.json` (who holds its namespaces), `procs/` (its
background processes: host side only, see `processes.py`).

On first use a sandbox gets its init (`live.py`): one `bwrap` with new user, pid, ipc,
uts, cgroup and (unless `network: full`) net namespaces; the host's system dirs (as root:
the sandbox's own copy-on-write layer over them, `hostlayer.py`; else read-only), only a
safe subset of /etc, no host environment (`--clearenv`). Every command
then joins those namespaces (`nsenter`), drops all capabilities (`setpriv`), gets only the
sandbox's environment (`env -i`: nothing the client sends ever reaches a host-side
process) and runs under `prlimit` (address space, processes, file size, CPU time), as
uid 0 of the sandbox's user namespace with no capability on the host. So processes a
command leaves running are still there for the next one; a foreground timeout kills
exactly that command's process group.

When the server runs as root, sandboxes run as an unprivileged host uid (`run_as_uid`):
RLIMIT_NPROC does not bind host root, and a sandbox must never be host root anyway.
bwrap resolves its bind sources as that uid, so the sandbox root must be traversable by
it: as root the default root is /var/lib/corral/sandboxes (0711, not listable).

The init outlives a restart of the server (it is re-adopted by pid and start time); if it
died meanwhile (a reboot), the next call starts a new one and says that background
processes were stopped. An init killed while the server watches is `sandbox_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import hashlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from corral.errors import Conflict, InvalidArgument, NotFound, SandboxLost, Unavailable

from . import cgroups, fastenter, hostfs, hostlayer, templates
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
from .checkpoints import tree
from .checkpoints.manifest import Manifest
from .config import BubblewrapConfig
from .live import (
    INIT_SCRIPT,
    INIT_SHELL,
    Init,
    Pid,
    PopenUser,
    drop_caps,
    enter_argv,
    kill_tree,
    start_init,
    wait_gone,
    watch_exit,
)
from .process import run_bounded
from .processes import Meta, ProcessInfo, ProcessOutput, Signal, read_output

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
# Template sandboxes: the host's /usr, where the tools that enter and bound a command come from.
HOST_USR = "/.corral/host/usr"
_LOADER = os.path.realpath(
    "/lib64/ld-linux-x86-64.so.2" if os.path.exists("/lib64/ld-linux-x86-64.so.2") else "/lib/ld-linux-aarch64.so.1"
)
HOST_LOADER = HOST_USR + _LOADER.removeprefix("/usr")
HOST_LIBS = f"{HOST_USR}{os.path.dirname(_LOADER).removeprefix('/usr')}:{HOST_USR}/lib"
# After a foreground command exits, how long to keep reading output a background child may hold open.
DRAIN_S = 0.2


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(
            f"{name} is not installed (util-linux)", hint="apt-get install util-linux, then start the server again"
        )
    return path


class BubblewrapBackend(Backend):
    name = "bubblewrap"
    isolation = "namespaces"

    def __init__(self, config: BubblewrapConfig) -> None:
        bwrap = shutil.which(config.bwrap)
        if bwrap is None:
            raise Unavailable(INSTALL_HINT, hint="then start the server again")
        self.bwrap = bwrap
        self.prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
        self.setpriv = _tool("setpriv")
        self.nsenter = _tool("nsenter")
        self.env = shutil.which("env") or "/usr/bin/env"
        self.setsid = shutil.which("setsid") or "/usr/bin/setsid"
        self.config = config
        # As root, never run sandboxes as root; otherwise they run as whoever runs the server.
        self.uid = (config.run_as_uid or 65534) if os.geteuid() == 0 else None
        self.root = config.root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.uid is not None:
            _make_traversable(self.root, self.uid)
        self.etc = _snapshot_etc(self.root)
        self.system_args = _system_args(self.etc)
        self.empty = _empty_file(self.root)
        # As root: the default sandbox's writable system (None: a read-only one, see hostlayer.py).
        # Its commands run the host's tools from /.corral/host/usr: that needs a merged-/usr host.
        layer = config.system_layer and _LOADER.startswith("/usr/")
        self.hostlayer = hostlayer.open_layer(self.uid if layer else None, self.root, self.etc)
        self._inits: dict[str, Init] = {}  # sandbox id -> its init, started or adopted by this process
        self._popens: dict[int, subprocess.Popen] = {}  # our children, kept until reaped
        self._starting: dict[str, asyncio.Lock] = {}
        self._reapers: dict[int, Callable[[], None]] = {}  # background holders' pid -> reap it now
        self._notices: dict[str, str] = {}  # sandbox id -> what its next execute should say
        self.templates = templates.TemplateStore(config.templates) if config.templates else None
        self.cgroups = cgroups.detect() if config.cgroups else None
        self.limits_scope = "sandbox" if self.cgroups else "process"
        self.enter = fastenter.build(self.root / ".enter") if config.fast_enter else None

    # -- lifecycle -----------------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        if spec.template is not None:
            self._rootfs(spec.template)  # a registered one, or invalid_argument/not_found before anything exists
        base = self._dir(sandbox_id)
        base.mkdir(mode=0o700)
        for sub in ("workspace", "home", "tmp"):
            (base / sub).mkdir(mode=0o1777 if sub == "tmp" else 0o755)
        (base / "procs").mkdir(mode=0o700)  # the server's: never mounted into the sandbox
        if self.uid is not None:
            for path in (base, base / "workspace", base / "home", base / "tmp"):
                os.chown(path, self.uid, self.uid)
        if self._layered(spec) and self.uid is not None:  # the sandbox's own copy-on-write system layer
            for sub in ("layer", "layer/upper", "layer/work", "rootfs"):
                (base / sub).mkdir(mode=0o755 if sub != "layer" else 0o700)
            os.chown(base / "layer" / "upper", self.uid, self.uid)  # so its `/` is root's inside
            if spec.template is not None and (self._rootfs(spec.template) / "etc/apt/apt.conf.d").is_dir():
                _apt_as_root(base / "layer" / "upper", self.uid)
        # The init ends by itself at the sandbox's end of life, even if no server is left to reap it.
        return SandboxRef(id=sandbox_id, spec=spec, data={"ends_at": int(time.time() + spec.ttl_s) + 60})

    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        await self._stop(ref.id)
        # Before any rmtree: never delete through a mount.
        if not await asyncio.to_thread(hostlayer.unmount_under, self._dir(ref.id)):
            raise Unavailable(
                f"could not unmount the system layer of sandbox {ref.id}: its directory is kept",
                hint=f"see /proc/self/mountinfo under {self._dir(ref.id)}, then destroy it again",
            )
        self._starting.pop(ref.id, None)
        self._notices.pop(ref.id, None)
        if self.cgroups is not None:
            await self.cgroups.remove(ref.id)
        base = self._dir(ref.id)
        if keep_workspace:
            for sub in ("home", "tmp", "procs", "layer", "rootfs"):
                await asyncio.to_thread(shutil.rmtree, base / sub, ignore_errors=True)
        else:
            await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    async def _stop(self, sandbox_id: str) -> None:
        """Kill the sandbox's init (and with it every process in its namespaces); wait until they are gone."""
        init = self._inits.pop(sandbox_id, None) or Init.load(self._dir(sandbox_id) / "init.json")
        if init is None:
            return
        holders = [init.init, init.outer]
        kill_tree(holders)
        await wait_gone(holders)
        for p in holders:
            self._reap(p.pid)

    def _reap(self, pid: int) -> None:
        proc = self._popens.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0)

    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]:
        if not (self._dir(ref.id) / "workspace").is_dir():
            return "lost"
        known = self._inits.get(ref.id)
        return "lost" if known is not None and not known.alive() else "running"

    async def _live(self, ref: SandboxRef) -> Init:
        """The sandbox's init: the one we know, a live one a previous server left, or a new one."""
        if not (self._dir(ref.id) / "workspace").is_dir():
            raise SandboxLost(f"sandbox {ref.id} is gone: its workspace no longer exists")
        known = self._inits.get(ref.id)
        if known is not None:
            if known.alive():
                return known
            await self._stop(ref.id)
            raise SandboxLost(f"sandbox {ref.id} was stopped from outside: its init is gone, and its processes with it")
        lock = self._starting.setdefault(ref.id, asyncio.Lock())
        async with lock:
            if (known := self._inits.get(ref.id)) is not None:
                return known
            saved = Init.load(self._dir(ref.id) / "init.json")
            if saved is not None and saved.alive():
                self._inits[ref.id] = saved  # re-adopted after a server restart
                return saved
            if saved is not None:
                kill_tree([saved.init, saved.outer])  # half of it may live on
                self._notices[ref.id] = (
                    "the sandbox's processes were stopped while the server was away "
                    "(its files are kept); background processes started before must be started again"
                )
            if self.cgroups is not None:
                self.cgroups.create(ref.id, ref.spec)
            if self._layered(ref.spec):
                await asyncio.to_thread(self._mount_layer, ref)
            elif os.path.ismount(self._dir(ref.id) / "rootfs"):  # its layer, from before the operator turned it off
                await asyncio.to_thread(hostlayer.unmount_under, self._dir(ref.id) / "rootfs")
            init, proc = await start_init(
                self._init_argv(ref), log=self._dir(ref.id) / "init.log", preexec_user=self._popen_user()
            )
            self._popens[proc.pid] = proc
            watch_exit(proc, lambda *_: self._popens.pop(proc.pid, None))
            init.save(self._dir(ref.id) / "init.json")
            self._inits[ref.id] = init
            return init

    def _rootfs(self, template: str) -> Path:
        if self.templates is None:
            raise NotFound(
                f"no template {template!r}: this server has no templates",
                hint="omit template to use the host's userland",
            )
        return self.templates.rootfs(template)

    def _layered(self, spec: SandboxSpec) -> bool:
        """Whether the sandbox gets a writable system layer: overlays the server (root) mounts over
        the host's system dirs id-mapped to the sandbox uid (`hostlayer.py`), or over a template
        whose files belong to the sandbox uid (uid 0 inside may change them all)."""
        if spec.template is None:
            return self.hostlayer is not None
        if self.uid is None or self.templates is None:
            return False
        return self.templates.get(spec.template).owner == self.uid

    def _mount_layer(self, ref: SandboxRef) -> None:
        """Template (lower, read-only, shared) + the sandbox's `layer/upper` -> `rootfs/`; again
        after a reboot (the upper dir, and with it every change, is kept)."""
        base = self._dir(ref.id)
        if ref.spec.template is None and self.hostlayer is not None:
            self.hostlayer.mount(base)
            return
        if os.path.ismount(base / "rootfs"):
            return
        lower = self._rootfs(ref.spec.template or "").resolve()  # as `templates rm` finds it in mountinfo
        if any(c in f"{lower}{base}" for c in ",:\\"):
            raise Unavailable(
                f"cannot mount a layer over {lower}: a path has ',' ':' or '\\'", hint="use plain directory names"
            )
        options = f"lowerdir={lower},upperdir={base}/layer/upper,workdir={base}/layer/work"
        # The syscall, not mount(8): a spawn costs a few ms of every provision + first execute.
        if _LIBC.mount(b"overlay", os.fsencode(base / "rootfs"), b"overlay", 0, options.encode()) != 0:
            err = ctypes.get_errno()
            raise Unavailable(
                f"could not mount the sandbox's system layer: {os.strerror(err)}", hint="the server must run as root"
            )

    def _system(self, ref: SandboxRef) -> list[str]:
        """The sandbox's `/`: the host's system dirs, or a template's rootfs (its writable layer, else
        read-only) with the host's /usr beside it at /.corral/host/usr, for the tools that enter and
        bound each command."""
        spec = ref.spec
        if not self._layered(spec):
            if spec.template is None:
                return self.system_args
            return ["--ro-bind", str(self._rootfs(spec.template)), "/", *self._host_usr()]
        # The sandbox may write all of its system but /etc/ld.so.preload: the loader would run what
        # it names in the host tools that join the sandbox, before they drop their capabilities.
        guard = ["--ro-bind", str(self.empty), "/etc/ld.so.preload"]
        return ["--bind", str(self._dir(ref.id) / "rootfs"), "/", *self._host_usr(), *guard]

    def _host_usr(self) -> list[str]:
        return ["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/usr", HOST_USR]

    def _init_argv(self, ref: SandboxRef) -> list[str]:
        base, spec = str(self._dir(ref.id)), ref.spec
        argv = self.cgroups.enter_argv(ref.id, init=True) if self.cgroups else []
        argv += [
            *self._drop_to_uid(),
            self.bwrap,
            "--unshare-user",
            "--uid",
            "0",
            "--gid",
            "0",
            "--unshare-pid",
            "--unshare-ipc",
        ]
        argv += ["--unshare-uts", "--hostname", "sandbox", "--unshare-cgroup-try"]
        if spec.network == "none":
            argv.append("--unshare-net")
        argv += ["--as-pid-1", "--new-session", "--clearenv", *self._system(ref)]
        argv += [
            "--bind",
            f"{base}/workspace",
            WORKDIR,
            "--bind",
            f"{base}/home",
            "/root",
            "--bind",
            f"{base}/tmp",
            "/tmp",
        ]
        for bind in self.config.extra_binds:
            argv += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.dest]
        ends_at = int(ref.data.get("ends_at") or time.time() + spec.ttl_s)
        if not self._layered(spec):  # the system is read-only, unless it is the sandbox's own layer
            argv += ["--remount-ro", "/"]
        argv += ["--chdir", "/", "--info-fd", "{info_fd}"]
        return argv + ["--", INIT_SHELL, "-c", INIT_SCRIPT, "init", str(ends_at)]

    # -- execute -------------------------------------------------------------------------

    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult:
        init = await self._live(ref)
        workspace = self._dir(ref.id) / "workspace"

        async def vanished() -> bool:
            return not workspace.is_dir() or not init.alive()

        done = await run_bounded(
            self._argv(ref.id, init, ref.spec, request),
            stdin=request.stdin,
            timeout_s=request.timeout_s,
            output_limit=request.output_limit,
            watch=vanished,
            drain_s=DRAIN_S,
            env={},  # nothing of the server's environment, not even for nsenter
        )
        if done.lost or await vanished():
            await self._stop(ref.id)
            raise SandboxLost(f"sandbox {ref.id} was stopped from outside mid-command (its init or workspace is gone)")
        self._check_setup(ref, request, done.returncode, done.stdout.total, done.stderr.text())
        result = ExecResult.of(done)
        result.notice = self._notices.pop(ref.id, None)
        return result

    def _check_setup(self, ref: SandboxRef, request: ExecRequest, code: int | None, out: int, err: str) -> None:
        """nsenter/setpriv failing to get the command going is not the command's result."""
        if code != 1 or out or not err.startswith(("nsenter: ", "setpriv: ", "prlimit: ", "corral-enter: ")):
            return
        if "change directory" in err or "working directory" in err:
            raise InvalidArgument(
                f"cwd {_cwd(request.cwd)!r} does not exist in sandbox {ref.id}", hint="create it first, or omit cwd"
            )
        raise Unavailable(
            f"could not run the command in sandbox {ref.id}: {err.strip()}", hint="check the server log and settings"
        )

    def _popen_user(self) -> PopenUser:
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

    def _argv(
        self, sandbox_id: str, init: Init, spec: SandboxSpec, request: ExecRequest, background: bool = False
    ) -> list[str]:
        """Join the sandbox, drop privileges, set exactly the sandbox's environment, bound, run."""
        env = {**BASE_ENV, **spec.env, **request.env}
        if self.enter is not None:
            return self._enter_argv(sandbox_id, init, spec, request, env, background)
        argv = self.cgroups.enter_argv(sandbox_id) if self.cgroups else []
        argv += enter_argv(self.nsenter, init.init.pid, _cwd(request.cwd), join_net=True, as_owner=self.uid is None)
        # A template has not our tools, a writable layer may have changed them: run the host's. Asked of
        # the sandbox, not of the settings: an init a previous server started keeps the system it had.
        layered = spec.template is not None or os.path.ismount(self._dir(sandbox_id) / "rootfs")
        host = _host_tool if layered else _as_is
        argv += host(drop_caps(self.setpriv)[0]) + drop_caps(self.setpriv)[1:]
        argv += [*host(self.env), "-i", "--", *(f"{k}={v}" for k, v in env.items())]
        argv += [*host(self.prlimit), *_limits(spec, None if background else request.timeout_s), "--"]
        if background:  # its own process group, so kill_process signals it and what it started
            argv += host(self.setsid)
        return argv + [self._shell(spec), "-c", request.command]

    def _enter_argv(
        self,
        sandbox_id: str,
        init: Init,
        spec: SandboxSpec,
        request: ExecRequest,
        env: dict[str, str],
        background: bool,
    ) -> list[str]:
        """The same in one exec (`enter.c`): nothing of the host runs inside, templates need no host tools."""
        argv = [self.enter or "", "-t", str(init.init.pid), "-w", _cwd(request.cwd), "-n"]
        if self.uid is None:
            argv.append("-o")
        if background:
            argv.append("-s")
        for path in self.cgroups.procs_files(sandbox_id) if self.cgroups else []:
            argv += ["-g", str(path)]
        for limit in _limits(spec, None if background else request.timeout_s):
            argv += ["-l", limit.removeprefix("--")]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        return argv + ["--", self._shell(spec), "-c", request.command]

    def _shell(self, spec: SandboxSpec) -> str:
        if spec.template is None:
            return SHELL
        # The template's own shell: bash if it has one (checked in the rootfs, as the sandbox sees it).
        return "/bin/bash" if os.path.lexists(self._rootfs(spec.template) / "bin" / "bash") else "/bin/sh"

    # -- background processes --------------------------------------------------------

    def _proc_dir(self, ref: SandboxRef, process_id: str) -> Path:
        directory = self._dir(ref.id) / "procs" / process_id
        if not (directory / "meta.json").is_file():
            raise NotFound(f"no process {process_id!r} in sandbox {ref.id}", hint="call processes to list them")
        return directory

    def _running(self, meta: Meta) -> bool:
        """Its nsenter lives exactly as long as the command (it waits for it), across server restarts too."""
        if meta.ended_at is not None:
            return False
        holder = Pid.model_validate(meta.holder["nsenter"])
        return holder.alive()

    def _settle(self, meta: Meta, directory: Path) -> bool:
        """Whether it runs; one that ended unseen (the server was away) is recorded as ended."""
        if self._running(meta):
            return True
        reap = self._reapers.pop(Pid.model_validate(meta.holder["nsenter"]).pid, None)
        if meta.ended_at is None and reap is not None:  # ours and gone, not yet reaped: reap it now
            reap()
            fresh = Meta.load(directory)
            meta.exit_code, meta.signal, meta.ended_at, meta.cpu_s = (
                fresh.exit_code,
                fresh.signal,
                fresh.ended_at,
                fresh.cpu_s,
            )
        if meta.ended_at is None:
            meta.ended_at = time.time()
            meta.note = "it ended while the server was restarting: its exit code is unknown"
            meta.save(directory)
        return False

    async def start_process(self, ref: SandboxRef, request: ExecRequest, process_id: str) -> ProcessInfo:
        init = await self._live(ref)
        running = [m for m, _ in self._metas(ref) if self._running(m)]
        if len(running) >= ref.spec.max_processes:
            raise Conflict(
                f"sandbox {ref.id} already runs {len(running)} background processes (its limit)",
                hint="kill_process some of them first",
            )
        directory = self._dir(ref.id) / "procs" / process_id
        directory.mkdir(parents=True, mode=0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out, err = os.open(directory / "stdout", flags, 0o600), os.open(directory / "stderr", flags, 0o600)
        try:
            proc = subprocess.Popen(  # vfork, reaped by watch_exit: no thread per process
                self._argv(ref.id, init, ref.spec, request, background=True),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={}, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(out)
            os.close(err)
        holder = Pid.of(proc.pid) or Pid(pid=proc.pid, start=0)
        child = await _first_child(proc)
        meta = Meta(
            process_id=process_id,
            command=request.command,
            started_at=time.time(),
            holder={"nsenter": holder.model_dump(), "pid": child.model_dump() if child else None},
        )
        meta.save(directory)
        self._popens[proc.pid] = proc

        def ended(status: int, cpu_s: float) -> None:
            self._popens.pop(proc.pid, None)
            self._reapers.pop(proc.pid, None)
            with contextlib.suppress(OSError, ValueError):  # the sandbox may be destroyed already
                done = Meta.load(directory)
                done.ended(status, cpu_s)
                done.save(directory)

        self._reapers[proc.pid] = watch_exit(proc, ended)
        return meta.info(ref.id, running=True)

    def _metas(self, ref: SandboxRef) -> list[tuple[Meta, Path]]:
        found = []
        for directory in (self._dir(ref.id) / "procs").glob("proc_*"):
            with contextlib.suppress(OSError, ValueError):
                found.append((Meta.load(directory), directory))
        return sorted(found, key=lambda item: item[0].started_at)

    def _info(self, ref: SandboxRef, meta: Meta, directory: Path) -> ProcessInfo:
        running = self._settle(meta, directory)
        child = meta.holder.get("pid")
        cpu = Pid.model_validate(child).cpu_seconds() if running and child else None
        return meta.info(ref.id, running=running, cpu_s=cpu)

    async def list_processes(self, ref: SandboxRef) -> list[ProcessInfo]:
        return [self._info(ref, meta, directory) for meta, directory in self._metas(ref)]

    async def process_output(
        self, ref: SandboxRef, process_id: str, offset: int, stderr_offset: int, limit: int
    ) -> ProcessOutput:
        directory = self._proc_dir(ref, process_id)
        meta = Meta.load(directory)
        running = self._settle(meta, directory)
        output = await asyncio.to_thread(read_output, meta, directory, running, offset, stderr_offset, limit)
        # Keep what was trimmed; reload first: the exit may have been recorded while we read.
        fresh = Meta.load(directory)
        fresh.dropped = meta.dropped
        fresh.save(directory)
        return output

    async def kill_process(self, ref: SandboxRef, process_id: str, signal_name: Signal) -> ProcessInfo:
        directory = self._proc_dir(ref, process_id)
        meta = Meta.load(directory)
        child = meta.holder.get("pid")
        sig = signal.Signals[f"SIG{signal_name}"]
        if not self._settle(meta, directory):
            info = meta.info(ref.id, running=False)
            init = self._inits.get(ref.id)
            left = _group_members(child["pid"], init.init.pid) if child and init else []
            if left and child and init:  # it ended, but what it started in its group runs on (a fork bomb's children)
                signalled = set()
                for _ in range(20):  # one by one is not atomic: repeat while they still fork
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, sig)
                    signalled.update(left)
                    await asyncio.sleep(0.01)
                    left = [
                        p
                        for p in _group_members(child["pid"], init.init.pid)
                        if p not in signalled or sig == signal.SIGKILL
                    ]
                    if not left:
                        break
                info.note = f"it had ended; signalled the {len(signalled)} processes of its group still running"
                return info
            raise Conflict(
                f"process {process_id} already ended ({info.state}, exit code {info.exit_code}); nothing was signalled",
                hint="call process_output to read what it wrote",
            )
        target = Pid.model_validate(child) if child else None
        if target is not None and target.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(target.pid, sig)
        if signal_name in ("TERM", "KILL", "INT", "HUP", "QUIT"):  # give it a moment to end, to report its end
            holder = Pid.model_validate(meta.holder["nsenter"])
            await wait_gone([holder], timeout_s=2.0)
            for _ in range(200):  # let the exit watcher record its status
                if proc_ended(directory):
                    break
                await asyncio.sleep(0.005)
        return self._info(ref, Meta.load(directory), directory)

    async def active(self, ref: SandboxRef) -> bool:
        return any(self._running(meta) for meta, _ in self._metas(ref))

    # -- checkpoints: the sandbox's dirs, read and written host side -------------------

    def _areas(self, ref: SandboxRef) -> dict[str, Path]:
        base = self._dir(ref.id)
        areas = {"workspace": base / "workspace", "home": base / "home"}
        if (base / "layer" / "upper").is_dir():  # the writable system layer: what the sandbox changed of `/`
            areas["system"] = base / "layer" / "upper"
        return areas

    async def snapshot(
        self, ref: SandboxRef, sink: tree.BlobSink, previous: tree.StatCache | None, max_files: int
    ) -> tree.Scan:
        if not (self._dir(ref.id) / "workspace").is_dir():
            raise SandboxLost(f"sandbox {ref.id} is gone: its workspace no longer exists")
        return await asyncio.to_thread(tree.scan, self._areas(ref), sink, previous, max_files)

    async def restore_files(self, ref: SandboxRef, manifest: Manifest, source: tree.BlobSource) -> tree.StatCache:
        """Stop its processes, unmount its layer (an overlay's upper dir must not change under it),
        then replace every area's content; the next command starts a new init."""
        await self._stop(ref.id)
        (self._dir(ref.id) / "init.json").unlink(missing_ok=True)  # stopped on purpose: no "while away" notice
        self._notices.pop(ref.id, None)
        if not await asyncio.to_thread(hostlayer.unmount_under, self._dir(ref.id) / "rootfs"):
            raise Unavailable(f"could not unmount sandbox {ref.id}'s system layer to restore it; nothing was changed")
        areas = self._areas(ref)

        def work() -> tree.StatCache:
            for directory in areas.values():
                tree.empty(directory)
            tree.restore(areas, manifest, source, self.uid)
            return tree.prime(areas, manifest)

        return await asyncio.to_thread(work)

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


_LIBC = ctypes.CDLL(None, use_errno=True)


def _empty_file(root: Path) -> Path:
    """An empty read-only file the sandbox uid can reach: what a sandbox's /etc/ld.so.preload shows."""
    path = root / ".empty"
    if not path.is_file() or path.stat().st_size:
        path.unlink(missing_ok=True)
        path.touch(mode=0o644)
    return path


# The sandbox's user namespace maps one uid (its root): apt cannot drop to `_apt` for downloads.
APT_CONF = 'APT::Sandbox::User "root";\n'


def _apt_as_root(upper: Path, uid: int) -> None:
    """Tell apt in a template sandbox to download as root (the only uid there is), in the
    sandbox's own layer: the template is untouched."""
    conf = upper / "etc" / "apt" / "apt.conf.d"
    conf.mkdir(parents=True, mode=0o755)
    for path in (upper / "etc", upper / "etc" / "apt", conf):
        os.chown(path, uid, uid)
    (conf / "00corral-sandbox").write_text(APT_CONF)
    os.chown(conf / "00corral-sandbox", uid, uid)


def _as_is(path: str) -> list[str]:
    return [path]


def _host_tool(path: str) -> list[str]:
    """Run a host binary inside a template sandbox: through the host's dynamic loader and
    libraries, mounted read-only at /.corral/host/usr (the template's libc may differ or be absent)."""
    real = os.path.realpath(path)
    return [HOST_LOADER, "--library-path", HOST_LIBS, HOST_USR + real.removeprefix("/usr")]


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


def _group_members(pgid: int, init_pid: int) -> list[int]:
    """Host pids in process group `pgid` that live in the sandbox's pid namespace (a group id
    alone could name some other process group once its leader is gone)."""
    try:
        sandbox_ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            pgrp = int(Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[2])
            if pgrp == pgid and os.readlink(f"/proc/{entry}/ns/pid") == sandbox_ns:
                members.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return members


def proc_ended(directory: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return Meta.load(directory).ended_at is not None
    return True


async def _first_child(proc: subprocess.Popen, timeout_s: float = 2.0) -> Pid | None:
    """The host pid of the command nsenter forked."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return None  # nsenter is gone: so is the command
        # Returned once it leads its own group (`setsid` ran), so kill_process reaches all of it.
        if children and _leads_group(int(children[0])):
            return Pid.of(int(children[0]))
        await asyncio.sleep(0.0005)
    return Pid.of(int(children[0])) if children else None


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return True  # already gone: nothing left to wait for


def _cwd(cwd: str | None) -> str:
    if not cwd:
        return WORKDIR
    return cwd if cwd.startswith("/") else f"{WORKDIR}/{cwd}"


def _limits(spec: SandboxSpec, timeout_s: float | None) -> list[str]:
    mib = 1 << 20
    limits = [f"--as={spec.memory_mb * mib}", f"--nproc={spec.max_processes}", f"--fsize={spec.disk_mb * mib}"]
    if timeout_s is not None:  # CPU seconds per process: a backstop behind the wall-clock timeout
        limits.append(f"--cpu={math.ceil(timeout_s) + 5}")
    return limits


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
