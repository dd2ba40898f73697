"""A writable system layer over the host's userland, for the default (non-template) sandbox.

The host's /usr belongs to host root; a sandbox's uid 0 is the unprivileged sandbox uid on
the host, so a plain overlay over /usr would refuse every copy-up. The server (root) instead
gives the overlay *id-mapped* lower layers: clones of the host's dirs on which a file owned
by host uid 0 appears owned by the sandbox uid (a mount's id-mapping through a user
namespace whose uid 0 is the sandbox uid). Those clones are read-only and detached: never
attached to any path, so nothing on the host can write or delete through them; they live
as long as the server and the overlays built on them hold them. Each sandbox gets its own overlays on top, upper dirs in
`<sandbox>/layer/`, so uid 0 inside may change any system file and only its layer changes.

The sandbox's `/` is an overlay over a small skeleton (`<root>/.system-<fingerprint>`: the
safe /etc copy, the host's /bin, /lib... symlinks, empty /var, /opt, mountpoints) and each
host system dir (/usr; /bin, /lib... where they are real dirs) an overlay mounted inside it.
The overlays are volatile (never synced on the sandbox's behalf, see `_overlay`).
Needs root and a kernel with id-mapped mounts and overlay layers given by fd (6.13+); where
that is missing the sandbox keeps a read-only system (`open_layer` returns None).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from corral.errors import Unavailable

__all__ = ["HostLayer", "mounts_under", "open_layer", "unmount_under"]

log = logging.getLogger(__name__)

# The new mount API; these numbers are the same on every architecture.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 428, 429, 430, 431, 432, 442
OPEN_TREE_CLONE, AT_EMPTY_PATH, AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, -100, 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_IDMAP = 0x1, 0x100000
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_SET_FD, FSCONFIG_CMD_CREATE = 0, 1, 5, 6
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC, MNT_DETACH = 1, 1, 2
# Top-level dirs a Debian-like userland expects; the host's are never shown.
SKELETON_DIRS = ("root", "tmp", "workspace", "proc", "dev", "opt", "srv", "mnt", "home", "run", "var/lib",
                 "var/cache", "var/log", "var/tmp", ".corral/host/usr")  # fmt: skip
HOST_TOPS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _sys(what: str, *args: object) -> int:
    result = _LIBC.syscall(*args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


class HostLayer:
    """The id-mapped, read-only, detached lower layers (held as fds for the server's life)
    and the mounting of one sandbox's overlays over them."""

    def __init__(self, uid: int, skeleton: Path) -> None:
        self.uid = uid
        self.skeleton = skeleton
        # Host dirs that get their own overlay: /usr, and /bin... where they are not symlinks into it.
        self.dirs = ["/usr"] + [d for d in HOST_TOPS if os.path.isdir(d) and not os.path.islink(d)]
        userns = _userns_of(uid)
        try:
            self._lowers = {"/": _idmapped(str(skeleton), userns)}
            for d in self.dirs:
                self._lowers[d] = _idmapped(d, userns)
        except OSError:
            self.close()
            raise
        finally:
            os.close(userns)

    def close(self) -> None:
        for fd in getattr(self, "_lowers", {}).values():
            os.close(fd)
        self._lowers = {}

    def mount(self, base: Path) -> None:
        """`<base>/rootfs`: the sandbox's system, its changes in `<base>/layer/upper/*` (kept, so a
        re-mount after a reboot finds them). All or nothing: a half-mounted system is unmounted."""
        target = base / "rootfs"
        if os.path.ismount(target):
            return
        target.mkdir(mode=0o755, exist_ok=True)
        try:
            for d, lower in self._lowers.items():
                name = "root" if d == "/" else d.strip("/")
                upper, work = base / "layer" / "upper" / name, base / "layer" / "work" / name
                for path in (upper, work):
                    path.mkdir(mode=0o755, parents=True, exist_ok=True)
                # A volatile overlay leaves this mark and refuses to mount again while it is there;
                # we are re-mounting after a reboot (nothing is mounted here): the upper dir is ours.
                shutil.rmtree(work / "work" / "incompat" / "volatile", ignore_errors=True)
                os.chown(upper, self.uid, self.uid)  # the top of this system dir is root's inside
                _overlay(lower, upper, work, target if d == "/" else target / d.lstrip("/"))
        except OSError as err:
            unmount_under(base)
            raise Unavailable(
                f"could not mount the sandbox's system layer: {err}", hint="check the server log and settings"
            ) from err


def open_layer(uid: int | None, root: Path, etc: Path) -> HostLayer | None:
    """The host layer for sandboxes running as `uid` (None: no root, so no layer), checked by
    mounting one; None (read-only systems) where this kernel cannot."""
    if uid is None:
        return None
    try:
        layer = HostLayer(uid, _skeleton(root, etc))
    except (OSError, subprocess.SubprocessError) as err:
        log.info("sandboxes get a read-only system: id-mapped mounts are not available (%s)", err)
        return None
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=root))
    try:
        layer.mount(probe)
    except Unavailable as err:
        log.info("sandboxes get a read-only system: %s", err.message)
        layer.close()
        return None
    finally:
        if unmount_under(probe):
            shutil.rmtree(probe, ignore_errors=True)
    return layer


def _userns_of(uid: int) -> int:
    """An fd of a fresh user namespace whose uid/gid 0 is host `uid`: the id-mapping of the lowers
    (through it, a file owned by host uid 0 appears owned by `uid`)."""
    holder = subprocess.Popen(
        [shutil.which("unshare") or "/usr/bin/unshare", "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={},
    )  # fmt: skip
    try:
        ours, deadline = os.readlink("/proc/self/ns/user"), time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/user") == ours:  # until it has unshared
            if holder.poll() is not None or time.monotonic() > deadline:
                raise OSError(0, "could not create a user namespace (unshare --user)")
            time.sleep(0.001)
        Path(f"/proc/{holder.pid}/uid_map").write_text(f"0 {uid} 1\n")
        Path(f"/proc/{holder.pid}/gid_map").write_text(f"0 {uid} 1\n")
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        holder.kill()
        holder.wait()


def _idmapped(path: str, userns: int) -> int:
    """A detached, read-only clone of the mount at `path`, id-mapped through `userns`."""
    fd = _sys("open_tree", SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | os.O_CLOEXEC)
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, userns_fd=userns)
    try:
        _sys("mount_setattr", SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr))
    except OSError:
        os.close(fd)
        raise
    return fd


def _overlay(lower: int, upper: Path, work: Path, target: Path) -> None:
    fs = _sys("fsopen", SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    try:
        _sys("fsconfig lowerdir+", SYS_FSCONFIG, fs, FSCONFIG_SET_FD, b"lowerdir+", None, lower)
        _sys("fsconfig upperdir", SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"upperdir", os.fsencode(upper), 0)
        _sys("fsconfig workdir", SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"workdir", os.fsencode(work), 0)
        # No syncs of the upper layer: an unmount (every destroy) need not wait for the host's disk
        # (tens to hundreds of ms under load), and a sandbox's fsync/syncfs cannot make the host's
        # whole filesystem sync. Writeback still happens; a host crash may lose the last seconds of
        # system-layer changes (the workspace is not in the layer).
        _sys("fsconfig volatile", SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, b"volatile", None, 0)
        _sys("fsconfig create", SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        mnt = _sys("fsmount", SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, 0)
    finally:
        os.close(fs)
    try:
        _sys("move_mount", SYS_MOVE_MOUNT, mnt, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(mnt)


def _skeleton(root: Path, etc: Path) -> Path:
    """`<root>/.system-<fp>`: the lower layer of a sandbox's `/`, made once per /etc snapshot.
    An old one stays: sandboxes still mounted over it keep their /etc."""
    fingerprint = (etc / ".corral-fingerprint").read_text()[:16]
    final = root / f".system-{fingerprint}"
    if final.is_dir():
        return final
    staging = Path(tempfile.mkdtemp(prefix=".system-", dir=root))
    try:
        shutil.copytree(etc, staging / "etc", symlinks=True)
        (staging / "etc" / "ld.so.preload").touch()  # a mountpoint: kept empty (see bubblewrap._system)
        for sub in SKELETON_DIRS:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "var/tmp"):
            (staging / sub).chmod(0o1777)
        for top in HOST_TOPS:
            if os.path.islink(top):
                (staging / top.lstrip("/")).symlink_to(os.readlink(top))
            elif os.path.isdir(top):
                (staging / top.lstrip("/")).mkdir()
        (staging / "usr").mkdir()
        staging.chmod(0o755)
        staging.rename(final)
    except OSError:
        if not final.is_dir():  # else another server on this root made it first: it is as good
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    return final


def mounts_under(base: Path) -> list[str]:
    """Mountpoints at or under `base` in this mount namespace, deepest first."""
    prefix = os.fsdecode(os.path.realpath(base))
    found = []
    # Unreadable raises: "nothing is mounted" must never be a guess (a delete would go through a mount).
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_under(base: Path) -> bool:
    """Unmount everything at or under `base`, deepest first; True when nothing is left mounted
    there. Only then may `base` be deleted: never delete through a mount."""
    for point in mounts_under(base):
        if _LIBC.umount2(os.fsencode(point), 0) != 0:
            _LIBC.umount2(os.fsencode(point), MNT_DETACH)  # busy: detach it now, gone when free
    return not mounts_under(base)
