"""The issue's "done when" (issue 11): a scripted run of 12 steps writes, changes, renames and
deletes files in its default sandbox (real bubblewrap, over stdio, checkpointed after every
step); it is forked at three positions with `corral sessions fork`; each child, woken with
`corral wake`, sees exactly the files the parent had at its position (file by file, against
a model of the script) and runs the rest of the script to the end."""

from __future__ import annotations

import json
from typing import Any

from tests.harness.conftest import corral
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.harness.test_cli import session_id
from tests.harness.test_crash import assert_valid_history, read_log

# Every entry of the workdir: `f|path|base64 content`, `d|path`, `l|path|target`.
SNAP = (
    "find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do "
    'if [ -L "$p" ]; then echo "l|$p|$(readlink "$p")"; elif [ -d "$p" ]; then echo "d|$p"; '
    'else echo "f|$p|$(base64 -w0 < "$p")"; fi; done'
)
Files = dict[str, str]  # path -> "f:<content>" | "d" | "l:<target>"


def write(path: str, content: str) -> dict[str, Any]:
    return tool("sandbox__write_file", {"path": path, "content": content})


def sh(command: str) -> dict[str, Any]:
    return tool("sandbox__execute", {"command": command})


def _rm(files: Files, prefix: str) -> None:
    for p in [p for p in files if p == prefix or p.startswith(prefix + "/")]:
        del files[p]


def _mv(files: Files, src: str, dst: str) -> None:
    files[dst] = files.pop(src)


def _rm_d_add_empty(files: Files) -> None:
    _rm(files, "d")
    files["empty.txt"] = "f:"


def _final(files: Files) -> None:
    files["a.txt"] = "f:final\n"
    _rm(files, "link")


# (the model's call, what it does to the files)
STEPS: list[tuple[dict[str, Any], Any]] = [
    (write("a.txt", "alpha\n"), lambda f: f.update({"a.txt": "f:alpha\n"})),
    (sh("mkdir -p d/e && echo one > d/one.txt"), lambda f: f.update({"d": "d", "d/e": "d", "d/one.txt": "f:one\n"})),
    (write("b.txt", "beta\n"), lambda f: f.update({"b.txt": "f:beta\n"})),
    (sh("echo more >> a.txt"), lambda f: f.update({"a.txt": "f:alpha\nmore\n"})),
    (sh("rm b.txt"), lambda f: _rm(f, "b.txt")),
    (write("d/two.txt", "two"), lambda f: f.update({"d/two.txt": "f:two"})),
    (sh("mv d/one.txt d/uno.txt"), lambda f: _mv(f, "d/one.txt", "d/uno.txt")),
    (sh("ln -s a.txt link"), lambda f: f.update({"link": "l:a.txt"})),
    (sh("rm -r d/e"), lambda f: _rm(f, "d/e")),
    (write("c.txt", "gamma\n"), lambda f: f.update({"c.txt": "f:gamma\n"})),
    (sh("rm -r d && : > empty.txt"), _rm_d_add_empty),
    (sh("echo final > a.txt && rm link"), _final),
]
FORKS = (3, 7, 11)  # fork after this many steps


def files_after(steps: int) -> Files:
    files: Files = {}
    for _, apply in STEPS[:steps]:
        apply(files)
    return files


def parse_snap(stdout: str) -> Files:
    import base64

    files: Files = {}
    for line in stdout.splitlines():
        kind, path, *rest = line.split("|", 2)
        path = path.removeprefix("./")
        if kind == "f":
            files[path] = "f:" + base64.b64decode(rest[0]).decode()
        elif kind == "l":
            files[path] = "l:" + rest[0]
        else:
            files[path] = "d"
    return files


def parent_script() -> Script:
    return Script({"TT-TASK": [*(Turn([call]) for call, _ in STEPS), Turn([sh(SNAP)]), Turn([text("done")])]})


def child_script(k: int) -> Script:
    """A child forked after k steps: look at the files, do the remaining steps, look again, end."""
    asked_before = [Turn([text("never asked: recorded in the parent")])] * k
    rest = [Turn([call]) for call, _ in STEPS[k:]]
    return Script({"TT-TASK": [*asked_before, Turn([sh(SNAP)]), *rest, Turn([sh(SNAP)]), Turn([text("done")])]})


def snaps(log: list[Any], after: int = 0) -> list[dict[str, Any]]:
    """The results of the SNAP calls at positions >= `after`, parsed."""
    ids = {e.data["id"] for e in log if e.type == "agent.tool_use" and e.data["input"].get("command") == SNAP}
    out = []
    for e in log:
        if e.position >= after and e.type == "agent.tool_result" and e.data["tool_use_id"] in ids:
            assert not e.data["is_error"], e.data
            out.append(json.loads(e.data["content"][0]["text"]))
    return out


def test_forks_at_three_positions_continue_with_the_files_of_their_position(real_env: dict[str, str]) -> None:
    env = {**real_env, "CORRAL_SERVERS": "sandbox"}
    with FakeAnthropic(parent_script()) as fake:
        ran = corral(["run", "TT-TASK: twelve steps"], {**env, **fake.env()}, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    parent = session_id(ran.stdout)
    log = read_log(env, parent)
    assert_valid_history(log)
    checkpoints = [e for e in log if e.type == "sandbox.checkpoint"]
    assert len(checkpoints) == len(STEPS) + 1 and all(e.data["default"] for e in checkpoints)  # the SNAP too
    assert len({e.data["checkpoint_id"] for e in checkpoints}) == len(checkpoints)
    final = snaps(log)
    assert parse_snap(final[0]["stdout"]) == files_after(len(STEPS))  # the model of the script is the parent's truth
    parent_sandbox = checkpoints[0].data["sandbox_id"]

    for k in FORKS:
        at = checkpoints[k - 1].position + 1  # the child shares the events up to step k's checkpoint
        forked = corral(["sessions", "fork", parent, "--at", str(at)], env)
        assert forked.returncode == 0, forked.stderr
        child = forked.stdout.strip()
        assert checkpoints[k - 1].data["checkpoint_id"] in forked.stderr, forked.stderr

        with FakeAnthropic(child_script(k)) as fake:
            woke = corral(["wake", child], {**env, **fake.env()}, timeout=300)
        assert woke.returncode == 0, woke.stdout + woke.stderr
        assert all(isinstance(t, int) and t >= k for _, t in fake.counts), fake.counts  # nothing recorded asked again
        assert not fake.invalid, fake.invalid  # every request's history was one the API takes
        child_log = read_log(env, child)
        assert_valid_history([e for e in child_log if e.position >= at])  # (each fake numbers its messages from 1)
        first, last = snaps(child_log, after=at)
        assert parse_snap(first["stdout"]) == files_after(k), f"the child forked after step {k}"
        assert checkpoints[k - 1].data["checkpoint_id"] in (first.get("notice") or ""), first
        assert first["sandbox_id"] != parent_sandbox  # its own sandbox, restored
        assert parse_snap(last["stdout"]) == files_after(len(STEPS))  # and it ran to the end
        own = [e.data for e in child_log if e.position >= at and e.type == "sandbox.checkpoint"]
        assert len(own) == len(STEPS) - k + 2 and {d["sandbox_id"] for d in own} == {first["sandbox_id"]}
        assert child_log[-1].data["status"] == "idle"
