"""`corral sessions list | show ID | tail ID | fork ID --at N | diff ID --at A --to B`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.servers.session import Event, EventStore
from corral.servers.session.workspace import workspace_at, workspace_note


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sessions", help="inspect and branch session logs", description=__doc__)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="sessions, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_list)
    show = verbs.add_parser("show", help="a session's events as a timeline")
    show.add_argument("session_id")
    show.add_argument("--json", action="store_true", help="one JSON event per line instead of the timeline")
    show.set_defaults(func=_show)
    tail = verbs.add_parser("tail", help="follow a session's new events live (Ctrl-C stops)")
    tail.add_argument("session_id")
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many past events to show first")
    tail.add_argument("--interval", type=float, default=0.2, help="seconds between polls")
    tail.set_defaults(func=_tail)
    fork = verbs.add_parser(
        "fork",
        help="branch a session at a position (copy-on-write); its sandbox gets the files of the latest checkpoint before it",
    )
    fork.add_argument("session_id")
    fork.add_argument("--at", type=int, required=True, help="the new session shares the events below this position")
    fork.set_defaults(func=_fork)
    diff = verbs.add_parser("diff", help="which workspace files changed between two positions (their checkpoints)")
    diff.add_argument("session_id")
    diff.add_argument("--at", type=int, required=True, help="from the workspace as of this position")
    diff.add_argument("--to", type=int, required=True, help="to the workspace as of this position")
    diff.add_argument("--json", action="store_true", help="one JSON object per changed path")
    diff.set_defaults(func=_diff)


def _store():
    from corral.servers.session.config import SessionSettings

    return SessionSettings().open_store()


def _list(args: argparse.Namespace) -> int:
    store = _store()
    sessions = store.sessions(limit=args.limit)
    table = Table(box=None, header_style="bold")
    for column in ("session", "created", "events", "status", "tries", "parent", "lease", "title / why it failed"):
        table.add_column(column)
    for s in sessions:
        lease = s.lease.get("worker", "") if s.lease else ""
        tries, why = attempts(store.select(s.session_id, types=["session.status"]))
        title = (
            why if s.status == "failed" and why else str(s.metadata.get("title") or s.metadata.get("task") or "")[:60]
        )
        parent = (s.parent or "") + (f"@{s.forked_at}" if s.forked_at is not None else "")
        cells = (
            s.session_id,
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(s.length),
            str(s.status or ""),
            str(tries or ""),
            parent,
            str(lease),
            title,
        )
        table.add_row(*map(Text, cells))  # Text, not str: stored values are data, never rich markup
    Console(width=240).print(table) if sessions else print("no sessions yet")
    return 0


def attempts(statuses: list[Event]) -> tuple[int, str]:
    """(how many times a harness took the session up, the reason of its last failure) from its status events."""
    tries = sum(1 for e in statuses if isinstance(e.data, dict) and e.data.get("status") == "running")
    failed = [
        e.data.get("reason", "") for e in statuses if isinstance(e.data, dict) and e.data.get("status") == "failed"
    ]
    return tries, str(failed[-1] if failed else "")[:120]


def _show(args: argparse.Namespace) -> int:
    store = _store()
    info = store.get(args.session_id)
    console = Console(highlight=False)
    if not args.json:
        origin = (
            f", forked from {info.parent} at {info.forked_at}"
            if info.forked_at is not None
            else (f", child of {info.parent}" if info.parent else "")
        )
        console.print(
            Text.assemble((info.session_id, "bold"), f"  {info.length} events, status {info.status or '-'}{origin}")
        )
    after, events = 0, []
    while True:
        page = store.select(args.session_id, gte=after, limit=500)
        for event in page:
            print(event_json(event)) if args.json else events.append(event)
        if len(page) < 500:
            break
        after = page[-1].position + 1
    if not args.json:  # the rich timeline (corral/viewer/timeline.py): icons, tool calls, errors, token figures
        from corral.viewer.timeline import render_timeline

        console.print(render_timeline(events))
    return 0


def event_json(event: Event) -> str:
    """One event as a JSON line; data nested too deep for an encoder's stack is printed as bounded text."""
    from corral.viewer.summary import compact

    fields = event.model_dump(mode="json", exclude={"data"})
    try:
        data = json.dumps(event.data, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        data = json.dumps(compact(event.data))
    return json.dumps(fields, ensure_ascii=False)[:-1] + f', "data": {data}}}'


def _tail(args: argparse.Namespace) -> int:
    from corral.viewer.timeline import event_line

    store = _store()
    console = Console(highlight=False)
    past = list(reversed(store.select(args.session_id, desc=True, limit=max(args.lines, 0))))
    nxt = past[-1].position + 1 if past else store.length(args.session_id) if args.lines == 0 else 0
    for event in past:
        console.print(event_line(event))
    try:
        while True:
            for event in store.select(args.session_id, gte=nxt, limit=500):
                console.print(event_line(event))
                nxt = event.position + 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _fork(args: argparse.Namespace) -> int:
    """The child's id on stdout (for scripts); which workspace it gets on stderr."""
    store = _store()
    child = store.fork(args.session_id, args.at)
    print(child.session_id)
    print(workspace_note(args.at, workspace_at(store, child.session_id, args.at)), file=sys.stderr)
    return 0


_MARKS = {"added": "+", "changed": "M", "deleted": "-"}


def _checkpoint_at(store: EventStore, session_id: str, position: int) -> str | None:
    """The workspace as of `position`: the default sandbox's last `sandbox.checkpoint` at or before it."""
    workspace = workspace_at(store, session_id, position + 1)
    return workspace.checkpoint_id if workspace else None


def _diff(args: argparse.Namespace) -> int:
    from corral.errors import InvalidArgument, NotFound
    from corral.servers.sandbox.checkpoints.manifest import changes, sandbox_path
    from corral.servers.sandbox.config import SandboxSettings

    events = _store()
    kept = SandboxSettings().open_checkpoints()
    if kept is None:
        raise InvalidArgument("checkpoints are off here (CORRAL_CHECKPOINT_STORE=off)")
    manifests = []
    for position in (args.at, args.to):
        checkpoint_id = _checkpoint_at(events, args.session_id, position)
        record = kept.get(checkpoint_id) if checkpoint_id is not None else None
        if record is not None and record.native is not None:
            raise InvalidArgument(
                f"checkpoint {checkpoint_id} is a snapshot E2B keeps: Corral holds no list of its files to compare"
            )
        if checkpoint_id is not None and record is None:
            raise NotFound(
                f"checkpoint {checkpoint_id} (position {position}) is not in this host's checkpoint store",
                hint="run on the host that took it, or set CORRAL_CHECKPOINT_STORE to the shared store",
            )
        manifests.append(kept.manifest(checkpoint_id) if checkpoint_id else {})
    for change in changes(*manifests):
        path = sandbox_path(change.path)
        print(json.dumps({"path": path, "change": change.what}) if args.json else f"{_MARKS[change.what]} {path}")
    return 0
