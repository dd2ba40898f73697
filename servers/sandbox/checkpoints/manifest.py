"""What a checkpoint holds: a manifest of paths, stored as a delta from its parent.

A manifest maps a path (`<area>/<relative path>`, areas being `workspace`, `home` and
`system`) to an `Entry`: its type, permission bits, size, mtime and, for a file, the
sha256 of its content (the blob) or, for a symlink, its target. File content lives in
content-addressed blobs, so a file that did not change costs a checkpoint one entry and
identical files anywhere are stored once.

A checkpoint stores `Delta(put, delete)` against its parent's manifest; every `FULL_EVERY`-th
checkpoint of a chain (and the first of each sandbox) stores the whole manifest, so reading
one back costs a bounded number of deltas.

Paths are `str` with `surrogateescape` for bytes that are not UTF-8 (`os.fsdecode`), so any
file name round-trips through JSON exactly.
"""

from __future__ import annotations

import json
import posixpath
import zlib
from collections.abc import Iterable
from typing import NamedTuple

from corral.errors import InvalidArgument

__all__ = [
    "AREAS",
    "FULL_EVERY",
    "Change",
    "Delta",
    "Entry",
    "Manifest",
    "apply",
    "blobs_of",
    "changes",
    "check_path",
    "decode",
    "delta",
    "differs",
    "encode",
    "sandbox_path",
]

AREAS = ("workspace", "home", "system")
FULL_EVERY = 50
# Entry types: file, dir, opaque dir (an overlay upper dir hiding its lower), symlink, fifo,
# whiteout (an overlay upper's mark of a deleted lower file).
TYPES = ("f", "d", "D", "l", "p", "w")


class Entry(NamedTuple):
    type: str
    mode: int  # permission bits (and setuid/setgid/sticky)
    size: int
    mtime_ns: int
    ref: str | None = None  # file: sha256 of its data; symlink: its target
    extents: tuple[tuple[int, int], ...] | None = None  # a sparse file's data: (offset, length); blob = their bytes


Manifest = dict[str, Entry]


class Delta(NamedTuple):
    put: Manifest
    delete: list[str]
    full: bool


class Change(NamedTuple):
    path: str
    what: str  # added | changed | deleted


def check_path(path: str) -> str:
    """A manifest path: relative, under a known area, no `..`, no empty parts. Defends restore
    against a manifest from a store someone else can write (a shared PostgreSQL)."""
    parts = path.split("/")
    if parts[0] not in AREAS or posixpath.normpath(path) != path or ".." in parts or "" in parts:
        raise InvalidArgument(f"bad path in a checkpoint manifest: {path!r}")
    return path


_ROOTS = {"workspace": "/workspace/", "home": "/root/", "system": "/"}


def sandbox_path(path: str) -> str:
    """A manifest path (`area/relative`) as the sandbox sees it."""
    area, _, rel = path.partition("/")
    return _ROOTS[area] + rel


def delta(old: Manifest | None, new: Manifest, *, full: bool) -> Delta:
    if full or old is None:
        return Delta(put=dict(new), delete=[], full=True)
    put = {path: entry for path, entry in new.items() if old.get(path) != entry}
    delete = [path for path in old if path not in new]
    return Delta(put=put, delete=delete, full=False)


def apply(base: Manifest | None, step: Delta) -> Manifest:
    if step.full or base is None:
        return dict(step.put)
    out = dict(base)
    for path in step.delete:
        out.pop(path, None)
    out.update(step.put)
    return out


def blobs_of(entries: Iterable[Entry]) -> set[str]:
    return {e.ref for e in entries if e.type == "f" and e.ref}


def differs(before: Entry | None, after: Entry) -> bool:
    """Whether an entry changed: a new time alone (`touch`) is not a change."""
    return before is None or before._replace(mtime_ns=0) != after._replace(mtime_ns=0)


def changes(old: Manifest, new: Manifest) -> list[Change]:
    """What differs between two manifests, by path (mtime alone is not a change)."""
    out = []
    for path in sorted(old.keys() | new.keys()):
        before, after = old.get(path), new.get(path)
        if before is None:
            out.append(Change(path, "added"))
        elif after is None:
            out.append(Change(path, "deleted"))
        elif differs(before, after):
            out.append(Change(path, "changed"))
    return out


def encode(step: Delta) -> bytes:
    body = {"full": step.full, "put": step.put, "delete": step.delete}
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1)


def decode(raw: bytes) -> Delta:
    try:
        body = json.loads(zlib.decompress(raw))
        put = {check_path(p): _entry(e) for p, e in body["put"].items()}
        return Delta(put=put, delete=[check_path(p) for p in body["delete"]], full=bool(body["full"]))
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise InvalidArgument(f"a checkpoint manifest is corrupt: {err}") from err


def _entry(raw: list) -> Entry:
    kind, mode, size, mtime, ref, extents = (list(raw) + [None, None])[:6]
    if kind not in TYPES or not isinstance(mode, int) or not isinstance(size, int) or size < 0:
        raise ValueError(f"bad entry {raw!r}")
    return Entry(
        kind, mode & 0o7777, size, int(mtime), ref, tuple(tuple(x) for x in extents) if extents is not None else None
    )
