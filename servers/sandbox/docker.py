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

import secrets
from typing import Literal

from corral.errors import (
    InvalidArgument,
    NotFound,
    PolicyDenied,
    SandboxLost,
    Unavailable,
)

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
from .config import DockerConfig
from .process import run_bounded

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
            raise Unavailable("the docker CLI is not installed", hint="install docker (apt-get install docker.io)") from err
        if done.timed_out:
            raise Unavailable(f"docker {args[0]} did not answer within {timeout_s:g}s", hint="check dockerd")
        return done.returncode or 0, bytes(done.stdout.head + done.stdout.tail), bytes(done.stderr.head + done.stderr.tail)

    # -- lifecycle -----------------------------------------------------------------------

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        name = self._name(sandbox_id)
        args = ["run", "-d", "--name", name, "--label", f"{self.config.label}={sandbox_id}", "--hostname", "sandbox"]
        args += ["--network", "none" if spec.network == "none" else "bridge"]
        args += ["--cpus", f"{spec.cpus:g}", "--memory", f"{spec.memory_mb}m", "--memory-swap", f"{spec.memory_mb}m"]
        args += ["--pids-limit", str(spec.max_processes), "--ulimit", f"fsize={spec.disk_mb << 20}"]
        args += ["--security-opt", "no-new-privileges", "--workdir", WORKDIR]
        for key, value in spec.env.items():
            args += ["--env", f"{key}={value}"]
        args += ["--entrypoint", "/bin/sh", spec.template or self.config.image, "-c", IDLE]
        code, out, err = await self._docker(*args, timeout_s=120)
        if code != 0:
            await self._docker("rm", "-f", name)
            raise Unavailable(f"docker could not start the sandbox: {err.decode(errors='replace').strip()}")
        return SandboxRef(id=sandbox_id, spec=spec, data={"container": out.decode().strip()})

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
            kill = f'kill -9 -$(cat /tmp/.corral-{token}.pid) 2>/dev/null; rm -f /tmp/.corral-{token}.pid'
            await self._docker("exec", name, "/bin/sh", "-c", kill, timeout_s=15)

        done = await run_bounded(
            args, stdin=request.stdin, timeout_s=request.timeout_s, output_limit=request.output_limit, on_timeout=kill_inside
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
            raise PolicyDenied(f"path {where!r} resolves to {err.decode(errors='replace').strip()!r}, outside the workspace")
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


