"""The docker backend: one container per sandbox, driven through the `docker` CLI.

Why the CLI and not the `docker` pip package: no extra dependency, and `docker exec`
already does the attach/stream-demux dance; each call is one short-lived process that
`run_bounded` caps and times out like any other.

A container runs an idle shell as PID 1 with CPU, memory, pids and file-size limits,
`--network none` unless `network: full`, and no host mounts at all: the workspace lives
inside the container, so it survives a server restart with the container. Every command
is a `docker exec` whose shell writes its pid (= its process group, `docker exec` makes
it a session leader) to a file, so a timeout kills the whole group inside the container,
not only the CLI outside. File tools run small POSIX scripts (busybox or coreutils).
"""

from __future__ import annotations

import asyncio
import builtins  # `DockerBackend.list` shadows the type in the class body
import secrets
import signal as signals
import time
from datetime import UTC, datetime
from typing import Literal

from corral.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PolicyDenied,
    SandboxLost,
    Unavailable,
)

from . import docker_checkpoints as ckpt
from .backend import (
    HASH_LIMIT,
    WORKDIR,
    Backend,
    ExecRequest,
    ExecResult,
    FileData,
    FileEntry,
    Listing,
    SandboxRef,
    SandboxSpec,
)
from .checkpoints.manifest import Manifest, check_path
from .checkpoints.tree import BlobSink, BlobSource, Scan, StatCache, too_many_files
from .config import DockerConfig
from .process import run_bounded
from .processes import ProcessInfo, ProcessOutput, Signal

__all__ = ["DockerBackend"]

# PID 1: idle, and exits on `docker stop`.
IDLE = f"mkdir -p {WORKDIR}; trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"
# $0 = token, $1 = command. Records its process group (the one to kill on timeout), runs the
# command in bash if the image has it, and cleans up after itself.
WRAP = (
    'f="/tmp/.corral-$0.pid"; echo $$ > "$f"; '
    'if command -v bash >/dev/null 2>&1; then bash -c "$1"; else sh -c "$1"; fi; rc=$?; rm -f "$f"; exit $rc'
)
_IN_WORKSPACE = f'case "$p" in {WORKDIR}|{WORKDIR}/*) ;; *) echo "$p" >&2; exit 4;; esac'
# $1 path, $2 offset, $3 limit, $4 hash limit. Size from stat (never reading the file), a hash
# only up to the limit ("-" past it), then exactly the slice (dd seeks; busybox tail cannot).
READ = f"""p=$(readlink -f -- "$1") || exit 3; {_IN_WORKSPACE}
[ -e "$p" ] || exit 3; [ -f "$p" ] || exit 5
s=$(stat -c %s -- "$p") || exit 3; echo "$s"
if [ "$s" -le "$4" ]; then sha256sum < "$p" | cut -d' ' -f1; else echo -; fi
dd if="$p" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=65536 2>/dev/null
"""
WRITE = f"""d=$(dirname -- "$1"); b=$(basename -- "$1"); mkdir -p -- "$d" || exit 6
p=$(readlink -f -- "$d") || exit 3; {_IN_WORKSPACE}
if [ -L "$p/$b" ]; then t=$(readlink -f -- "$p/$b"); p2=$p; p=$t; {_IN_WORKSPACE}; p=$p2; fi
[ -d "$p/$b" ] && exit 7
t="$p/.corral-write-$$"; cat > "$t" || {{ rm -f -- "$t"; exit 8; }}
[ -z "$2" ] || chmod "$2" "$t"; mv -f -- "$t" "$p/$b"
"""
# $1 path, $2 depth, $3 byte budget, $4 LIST_BATCH. Names are data: each entry is one
# NUL-terminated record `TYPE|SIZE|NAME` (a name may hold newlines and any byte but NUL).
LIST = f"""p=$(readlink -f -- "$1") || exit 3; {_IN_WORKSPACE}
[ -d "$p" ] || exit 3; cd "$p" || exit 3
find . -mindepth 1 -maxdepth "$2" ! -name '.corral-write-*' -exec sh -c "$4" sh {{}} + | head -c "$3"
"""
# One stat for a batch of names, paired with them in order; if an entry vanished meanwhile
# (stat printed fewer lines), one stat per name. TYPE and SIZE never hold a newline or "|".
LIST_BATCH = r"""m=$(stat -c '%F|%s' -- "$@" 2>/dev/null) && [ "$(printf '%s\n' "$m" | wc -l)" -eq "$#" ] || m=
if [ -n "$m" ]; then
  printf '%s\n' "$m" | { for f; do IFS= read -r t; printf '%s|%s\0' "$t" "$f"; done; }
else
  for f; do t=$(stat -c '%F|%s' -- "$f" 2>/dev/null) && printf '%s|%s\0' "$t" "$f"; done
fi
"""
_RECORD_BYTES = 4096 + 64  # PATH_MAX plus type and size: the byte budget of one listed entry
# Background processes live in the container (it survives a server restart; there is no host side):
# /tmp/.corral/p/<process_id>/{cmd,started,pid,out,err,exit}. The command leads its own process
# group (`setsid`), so kill_process signals it and what it started, never the waiting shell.
PROCS = "/tmp/.corral/p"
BACKGROUND = f"""d="{PROCS}/$0"; mkdir -p "$d" || exit 9; printf '%s' "$1" > "$d/cmd"; date +%s > "$d/started"
if command -v bash >/dev/null 2>&1; then s=bash; else s=sh; fi
echo $$ > "$d/wrapper"; setsid $s -c "$1" > "$d/out" 2> "$d/err" < /dev/null &
p=$!; echo $p > "$d/pid"
while :; do wait $p; rc=$?; kill -0 $p 2>/dev/null || break; done
date +%s > "$d/ended"; echo $rc > "$d/exit"
"""
# Running until the waiting shell has written the exit status (the command may be gone a moment before).
_STATE = """p=$(cat "$d/pid" 2>/dev/null); w=$(cat "$d/wrapper" 2>/dev/null); x=$(cat "$d/exit" 2>/dev/null)
r=0; if [ -z "$x" ]; then for q in $p $w; do kill -0 "$q" 2>/dev/null && r=1; done; fi
"""
# One line per process, then its command: id started ended running exit cpu_ticks cmd_bytes.
STATUS = f"""for d in {PROCS}/${{1:-*}}; do [ -e "$d/pid" ] || continue
{_STATE}set -- $(cut -d' ' -f14-17 /proc/$p/stat 2>/dev/null); t=$(( ${{1:-0}} + ${{2:-0}} + ${{3:-0}} + ${{4:-0}} ))
e=$(cat "$d/ended" 2>/dev/null)
echo "${{d##*/}} $(cat "$d/started") ${{e:--}} $r ${{x:--}} $t $(wc -c < "$d/cmd")"; cat "$d/cmd"; echo
done
"""
# $1 id, $2 stdout offset, $3 stderr offset, $4 limit
OUTPUT = f"""d="{PROCS}/$1"; [ -e "$d/pid" ] || exit 3
{_STATE}so=$(wc -c < "$d/out"); se=$(wc -c < "$d/err")
echo "$so $se $r ${{x:--}}"
[ "$2" -le "$so" ] || exit 5; [ "$3" -le "$se" ] || exit 6
lo=$(( so - $2 )); [ $lo -gt $4 ] && lo=$4; le=$(( se - $3 )); [ $le -gt $4 ] && le=$4
echo "$lo $le"; tail -c +$(( $2 + 1 )) "$d/out" | head -c $lo; tail -c +$(( $3 + 1 )) "$d/err" | head -c $le
"""
KILL = f"""d="{PROCS}/$1"; [ -e "$d/pid" ] || exit 3
{_STATE}[ "$r" = 1 ] || exit 7
kill -$2 -- -$p 2>/dev/null || kill -$2 $p
"""

_KINDS = {"directory": "dir", "regular file": "file", "regular empty file": "file", "symbolic link": "symlink"}


class DockerBackend(Backend):
    name = "docker"
    isolation = "container"

    def __init__(self, config: DockerConfig) -> None:
        self.config = config

    def _name(self, sandbox_id: str) -> str:
        return f"corral-{sandbox_id}"

    async def _docker(self, *args: str, stdin: bytes | None = None, timeout_s: float = 60) -> tuple[int, bytes, bytes]:
        try:
            done = await run_bounded(
                [self.config.docker, *args], stdin=stdin, timeout_s=timeout_s, output_limit=256 << 20
            )
        except FileNotFoundError as err:
            raise Unavailable(
                "the docker CLI is not installed", hint="install docker (apt-get install docker.io)"
            ) from err
        if done.timed_out:
            raise Unavailable(f"docker {args[0]} did not answer within {timeout_s:g}s", hint="check dockerd")
        return (
            done.returncode or 0,
            bytes(done.stdout.head + done.stdout.tail),
            bytes(done.stderr.head + done.stderr.tail),
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        name = self._name(sandbox_id)
        code, out, err = await self._docker(*self._run_args(sandbox_id, spec, name), timeout_s=120)
        if code != 0:
            await self._docker("rm", "-f", name)
            raise Unavailable(f"docker could not start the sandbox: {err.decode(errors='replace').strip()}")
        return SandboxRef(id=sandbox_id, spec=spec, data={"container": out.decode().strip()})

    def _run_args(self, sandbox_id: str, spec: SandboxSpec, name: str) -> list[str]:
        args = ["run", "-d", "--name", name, "--label", f"{self.config.label}={sandbox_id}", "--hostname", "sandbox"]
        args += ["--network", "none" if spec.network == "none" else "bridge"]
        args += ["--cpus", f"{spec.cpus:g}", "--memory", f"{spec.memory_mb}m", "--memory-swap", f"{spec.memory_mb}m"]
        args += ["--pids-limit", str(spec.max_processes), "--ulimit", f"fsize={spec.disk_mb << 20}"]
        args += ["--security-opt", "no-new-privileges", "--workdir", WORKDIR]
        for key, value in spec.env.items():
            args += ["--env", f"{key}={value}"]
        return args + ["--entrypoint", "/bin/sh", spec.template or self.config.image, "-c", IDLE]

    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        # keep_workspace has no meaning here: the workspace lives in the container.
        await self._docker("rm", "-f", "-v", self._name(ref.id))

    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]:
        code, out, _ = await self._docker("inspect", "-f", "{{.State.Running}}", self._name(ref.id))
        return "running" if code == 0 and out.strip() == b"true" else "lost"

    async def _lost_unless_running(self, ref: SandboxRef) -> None:
        if await self.status(ref) != "running":
            raise SandboxLost(f"sandbox {ref.id} is gone: its container is not running")

    # -- execute -------------------------------------------------------------------------

    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult:
        token = secrets.token_hex(6)
        name = self._name(ref.id)
        args = [self.config.docker, "exec", *(["-i"] if request.stdin is not None else [])]
        args += ["-w", request.cwd if request.cwd and request.cwd.startswith("/") else f"{WORKDIR}/{request.cwd or ''}"]
        for key, value in request.env.items():
            args += ["-e", f"{key}={value}"]
        args += [name, "/bin/sh", "-c", WRAP, token, request.command]

        async def kill_inside() -> None:
            kill = f"kill -9 -$(cat /tmp/.corral-{token}.pid) 2>/dev/null; rm -f /tmp/.corral-{token}.pid"
            await self._docker("exec", name, "/bin/sh", "-c", kill, timeout_s=15)

        done = await run_bounded(
            args,
            stdin=request.stdin,
            timeout_s=request.timeout_s,
            output_limit=request.output_limit,
            on_timeout=kill_inside,
        )
        if done.returncode != 0 and not done.timed_out:
            await self._lost_unless_running(ref)
        return ExecResult.of(done)

    # -- files (scripts run inside the container) ------------------------------------------

    async def _script(self, ref: SandboxRef, script: str, *args: str, stdin: bytes | None = None) -> bytes:
        name = self._name(ref.id)
        code, out, err = await self._docker(
            "exec", *(["-i"] if stdin is not None else []), name, "/bin/sh", "-c", script, "corral", *args, stdin=stdin
        )
        if code == 0:
            return out
        where = args[0]
        if code == 3:
            raise NotFound(f"no such file or directory: {where}")
        if code == 4:
            raise PolicyDenied(
                f"path {where!r} resolves to {err.decode(errors='replace').strip()!r}, outside the workspace"
            )
        if code in (5, 7):
            raise InvalidArgument(f"{where} is {'not a regular file' if code == 5 else 'a directory'}")
        await self._lost_unless_running(ref)
        raise Unavailable(f"file operation on {where} failed: {err.decode(errors='replace').strip()}")

    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
        out = await self._script(ref, READ, path, str(offset), str(limit), str(hash_limit))
        size, sha, data = out.split(b"\n", 2)
        return FileData(data=data, size=int(size), sha256=None if sha == b"-" else sha.decode())

    async def write(
        self, ref: SandboxRef, path: str, data: bytes, mode: int | None, if_sha256: str | None = None
    ) -> None:
        if if_sha256 is not None:
            await self.check_sha256(ref, path, if_sha256)
        await self._script(ref, WRITE, path, "" if mode is None else f"{mode:o}", stdin=data)

    async def list(self, ref: SandboxRef, path: str, depth: int, max_entries: int) -> Listing:
        out = await self._script(ref, LIST, path, str(depth), str((max_entries + 1) * _RECORD_BYTES), LIST_BATCH)
        entries = []
        for record in out.split(b"\0")[:-1]:  # the last piece is empty, or a record the byte budget cut
            kind, size, name = record.split(b"|", 2)
            type_ = _KINDS.get(kind.decode(), "other")
            entries.append(FileEntry.of(name.removeprefix(b"./"), type_, int(size) if type_ == "file" else 0))  # type: ignore[arg-type]
        entries.sort(key=lambda e: e.name)
        return Listing(entries=entries[:max_entries], truncated=len(entries) > max_entries)

    # -- background processes (in the container) -------------------------------------------

    async def start_process(self, ref: SandboxRef, request: ExecRequest, process_id: str) -> ProcessInfo:
        running = [p for p in await self.list_processes(ref) if p.state == "running"]
        if len(running) >= ref.spec.max_processes:
            raise Conflict(
                f"sandbox {ref.id} already runs {len(running)} background processes (its limit)",
                hint="kill_process some of them first",
            )
        args = [
            "exec",
            "-d",
            "-w",
            request.cwd if request.cwd and request.cwd.startswith("/") else f"{WORKDIR}/{request.cwd or ''}",
        ]
        for key, value in request.env.items():
            args += ["-e", f"{key}={value}"]
        code, _, err = await self._docker(
            *args, self._name(ref.id), "/bin/sh", "-c", BACKGROUND, process_id, request.command
        )
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"could not start the background process: {err.decode(errors='replace').strip()}")
        for _ in range(200):  # `exec -d` returns before the shell has written its pid
            found = await self.list_processes(ref, process_id)
            if found:
                return found[0]
            await asyncio.sleep(0.01)
        raise Unavailable(f"the background process {process_id} did not start", hint="check the sandbox with processes")

    async def list_processes(self, ref: SandboxRef, only: str = "") -> builtins.list[ProcessInfo]:
        out = await self._script(ref, STATUS, only)
        found, rest = [], out
        while rest.strip():
            head, rest = rest.split(b"\n", 1)
            pid_id, started, ended, running, exit_code, ticks, size = head.decode().split()
            command, rest = rest[: int(size)].decode(errors="replace"), rest[int(size) + 1 :]
            info = _info(ref.id, pid_id, command, float(started), running == "1", exit_code, int(ticks) / 100)
            if info.state != "running" and ended != "-":
                info.ended_at = _iso(float(ended))
            found.append(info)
        return sorted(found, key=lambda p: p.started_at)

    async def process_output(
        self, ref: SandboxRef, process_id: str, offset: int, stderr_offset: int, limit: int
    ) -> ProcessOutput:
        name = self._name(ref.id)
        code, out, err = await self._docker(
            "exec", name, "/bin/sh", "-c", OUTPUT, "corral", process_id, str(offset), str(stderr_offset), str(limit)
        )
        if code == 3:
            raise NotFound(f"no process {process_id!r} in sandbox {ref.id}", hint="call processes to list them")
        head, _, body = out.partition(b"\n")
        total_out, total_err, running, exit_code = head.decode().split()
        if code in (5, 6):
            stream, start, total = ("stdout", offset, total_out) if code == 5 else ("stderr", stderr_offset, total_err)
            raise InvalidArgument(
                f"{'offset' if code == 5 else 'stderr_offset'} {start} is past the end of {stream} ({total} bytes so far)",
                hint=f"pass an offset between 0 and {total}",
            )
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"could not read the output of {process_id}: {err.decode(errors='replace').strip()}")
        sizes, _, data = body.partition(b"\n")
        n_out, n_err = map(int, sizes.split())
        done = running != "1"
        return ProcessOutput(
            process_id=process_id, running=not done, exit_code=int(exit_code) if done and exit_code != "-" else None,
            stdout=data[:n_out].decode("utf-8", "replace"), stderr=data[n_out : n_out + n_err].decode("utf-8", "replace"),
            offset=offset, stderr_offset=stderr_offset, next_offset=offset + n_out, next_stderr_offset=stderr_offset + n_err,
            stdout_bytes=int(total_out), stderr_bytes=int(total_err),
        )  # fmt: skip

    async def kill_process(self, ref: SandboxRef, process_id: str, signal: Signal) -> ProcessInfo:
        code, _, _ = await self._docker("exec", self._name(ref.id), "/bin/sh", "-c", KILL, "corral", process_id, signal)
        if code == 3:
            raise NotFound(f"no process {process_id!r} in sandbox {ref.id}", hint="call processes to list them")
        [info] = await self.list_processes(ref, process_id)
        if code == 7:
            raise Conflict(
                f"process {process_id} already ended ({info.state}, exit code {info.exit_code}); nothing was signalled",
                hint="call process_output to read what it wrote",
            )
        deadline = time.monotonic() + (2.0 if signal in ("TERM", "KILL", "INT", "HUP", "QUIT") else 0)
        while info.state == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            [info] = await self.list_processes(ref, process_id)
        return info

    async def active(self, ref: SandboxRef) -> bool:
        try:
            return any(p.state == "running" for p in await self.list_processes(ref))
        except (SandboxLost, Unavailable):
            return False

    # -- checkpoints: the container's writable layer (see docker_checkpoints.py) ---------------

    async def _changes(self, ref: SandboxRef) -> builtins.list[ckpt.Change]:
        code, out, err = await self._docker("diff", self._name(ref.id), timeout_s=300)
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"docker diff failed: {err.decode(errors='replace').strip()}")
        changes = ckpt.parse_diff(out)
        roots = ckpt.mangled(changes)
        if roots:
            started = self._exec(ref, ckpt.EACH, ckpt.FIND)
            try:
                _, listed, _ = await asyncio.to_thread(started.run, ckpt.nul_list(roots), 300)
            finally:
                started.close()
            changes = ckpt.unmangle(changes, listed)
        found = {c.path: c for c in reversed(changes) if ckpt.manifest_path(c.path) is not None}
        return list(reversed(found.values()))  # once each: docker may list a deletion twice

    def _exec(self, ref: SandboxRef, script: str, *args: str) -> ckpt.Started:
        return ckpt.Started([self.config.docker, "exec", "-i", self._name(ref.id), "/bin/sh", "-c", script, *args])

    async def _stats(
        self, ref: SandboxRef, paths: builtins.list[str], started: ckpt.Started | None = None
    ) -> builtins.list[ckpt.Stat | None]:
        started = started or self._exec(ref, ckpt.STAT_ALL, ckpt.STAT, ckpt.STAT_FORMAT)
        try:
            code, out, err = await asyncio.to_thread(started.run, ckpt.nul_list(paths), 300)
        finally:
            started.close()
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"could not stat the sandbox's files: {err.decode(errors='replace').strip()}")
        return ckpt.parse_stats(out, len(paths))

    async def snapshot(self, ref: SandboxRef, sink: BlobSink, previous: StatCache | None, max_files: int) -> Scan:
        for attempt in range(3):  # a file that changed between stat and tar fails the stream: again
            try:
                return await self._snapshot(ref, sink, previous or {}, max_files)
            except ckpt.StreamFailed:
                if attempt == 2:
                    raise
                await self._lost_unless_running(ref)
        raise AssertionError("unreachable")

    async def _snapshot(self, ref: SandboxRef, sink: BlobSink, previous: StatCache, max_files: int) -> Scan:
        # The stat and tar execs start now, their start-up overlapping `docker diff`; they wait for their lists.
        stat_exec = self._exec(ref, ckpt.STAT_ALL, ckpt.STAT, ckpt.STAT_FORMAT)
        tar_exec = self._exec(ref, ckpt.TAR_ALL)
        try:
            return await self._scan(ref, sink, previous, max_files, stat_exec, tar_exec)
        finally:
            stat_exec.close()
            tar_exec.close()

    async def _scan(
        self,
        ref: SandboxRef,
        sink: BlobSink,
        previous: StatCache,
        max_files: int,
        stat_exec: ckpt.Started,
        tar_exec: ckpt.Started,
    ) -> Scan:
        changes = await self._changes(ref)
        if len(changes) > max_files:
            raise too_many_files(max_files)
        stats = await self._stats(ref, [c.path for c in changes], stat_exec)
        out = Scan()
        unread = ckpt.classify(changes, stats, previous, out)
        if unread:
            await asyncio.to_thread(ckpt.read_files, tar_exec, unread, sink, previous, out)
        return out

    async def restore_files(self, ref: SandboxRef, manifest: Manifest, source: BlobSource) -> StatCache:
        """Make the container exactly its image plus `manifest`.

        Its processes are stopped by replacing the container with a new one of the same image
        and spec (not `docker restart`, nor killing all but init): the new container holds
        exactly the image, so whatever changed since the checkpoint (files added, image files
        changed or deleted) is undone without reading the image. A container that changed
        nothing (a sandbox just made for this restore) is kept, its processes killed. The new
        container has a new id (`ref.data["container"]` only informs: everything finds it by name)."""
        for path in manifest:
            check_path(path)
        ckpt.check_tree(manifest)
        # What docker manages (/proc, /etc/hosts...) is never captured: a manifest naming it is not ours.
        manifest = {p: e for p, e in manifest.items() if ckpt.manifest_path(ckpt.container_path(p)) == p}
        if await self._changes(ref):
            await self._replace_container(ref)
        else:
            await self._docker("exec", self._name(ref.id), "/bin/sh", "-c", "kill -9 -1 2>/dev/null; true")
        name = self._name(ref.id)
        code, _, err = await self._docker(
            "exec", "-i", name, "/bin/sh", "-c", ckpt.EACH, ckpt.PREPARE, stdin=ckpt.preparations(manifest)
        )
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"could not make way for the checkpoint's files: {err.decode(errors='replace').strip()}")
        await asyncio.to_thread(ckpt.write_files, self.config.docker, name, manifest, source)
        written = [p for p, e in manifest.items() if e.type != "w"]
        stats = await self._stats(ref, [ckpt.container_path(p) for p in written])
        cache = {p: (st.key, manifest[p]) for p, st in zip(written, stats, strict=True) if st is not None}
        return cache | {p: (ckpt.WHITEOUT_KEY, e) for p, e in manifest.items() if e.type == "w"}

    async def _replace_container(self, ref: SandboxRef) -> None:
        """A new container of the same spec under the same name; the old one kept until it runs."""
        name = self._name(ref.id)
        old = f"{name}-replaced-{secrets.token_hex(4)}"
        code, _, err = await self._docker("rename", name, old)
        if code != 0:
            await self._lost_unless_running(ref)
            raise Unavailable(f"could not replace the sandbox's container: {err.decode(errors='replace').strip()}")
        code, _, err = await self._docker(*self._run_args(ref.id, ref.spec, name), timeout_s=120)
        if code != 0:
            await self._docker("rm", "-f", name)
            await self._docker("rename", old, name)
            raise Unavailable(f"docker could not start the restored sandbox: {err.decode(errors='replace').strip()}")
        await self._docker("rm", "-f", "-v", old)


def _info(
    sandbox_id: str, process_id: str, command: str, started: float, running: bool, exit_code: str, cpu_s: float
) -> ProcessInfo:
    code = None if running or exit_code == "-" else int(exit_code)
    signal = signals.Signals(code - 128).name.removeprefix("SIG") if code and 128 < code <= 128 + 31 else None
    return ProcessInfo(
        process_id=process_id, sandbox_id=sandbox_id, command=command,
        state="running" if running else ("killed" if signal else "exited"), exit_code=code, signal=signal,
        started_at=_iso(started),
        cpu_s=round(cpu_s, 3), note=None if running or code is not None else "it ended without a recorded exit code",
    )  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
