"""`corral-enter` (`enter.c`): enter a live sandbox in one exec instead of a chain of five.

Built once per source version with the machine's C compiler into the sandbox root (a dir
only the server can write), and used when it builds; without a compiler, or when
`CORRAL_SANDBOX_FAST_ENTER` is off, commands go through the portable chain
(`nsenter`, `setpriv`, `env -i`, `prlimit`), which does the same in more steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["build"]

log = logging.getLogger("corral.sandbox")
SOURCE = Path(__file__).with_name("enter.c")


def build(directory: Path) -> str | None:
    """The helper's path, compiled now if this source version was not yet; None if it cannot be."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SOURCE.is_file():
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = directory / f"corral-enter-{digest}"
    if os.access(target, os.X_OK):
        return str(target)
    directory.mkdir(mode=0o700, exist_ok=True)
    staging = directory / f".corral-enter-{os.getpid()}"
    try:
        done = subprocess.run(
            [compiler, "-O2", "-Wall", "-o", str(staging), str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not build corral-enter (%s): commands enter sandboxes through nsenter", err)
        return None
    if done.returncode != 0:
        log.warning("could not build corral-enter: %s", done.stderr.strip()[-500:])
        staging.unlink(missing_ok=True)
        return None
    staging.chmod(0o755)
    os.replace(staging, target)
    return str(target)
