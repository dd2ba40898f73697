"""`corral run "TASK" [--session ID] [--model M]` and `corral wake SESSION_ID`."""

from __future__ import annotations

import argparse
import os
import sys

from corral.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run the reference harness on a task (new session, or --session to continue one)",
        description="Run Claude on TASK with the sandbox, session and credentials servers; streams progress.",
    )
    run.add_argument("task", help="what the agent should do")
    run.add_argument("--session", metavar="ID", help="continue this session instead of starting a new one")
    run.add_argument("--model", metavar="M", help="Claude model (default: $CORRAL_MODEL)")
    run.add_argument(
        "--detach",
        action="store_true",
        help="queue the session for `corral worker`s instead of running it here (PostgreSQL store)",
    )
    run.set_defaults(func=_run)
    wake = sub.add_parser(
        "wake",
        help="resume a session from its log (after a crash, or to continue)",
        description="Rebuild the agent from the session log alone and carry on where it stopped.",
    )
    wake.add_argument("session_id", metavar="SESSION_ID")
    wake.add_argument("--model", metavar="M", help="Claude model (default: $CORRAL_MODEL)")
    wake.add_argument(
        "--detach",
        action="store_true",
        help="queue the session for `corral worker`s instead of waking it here (PostgreSQL store)",
    )
    wake.set_defaults(func=_wake)


def _run(args: argparse.Namespace) -> int:
    if args.detach:  # the worker pool's side: harness/worker_cli.py
        from corral.harness.worker_cli import run_detached

        return run_detached(args.task, args.session, args.model)
    return _go(args, task=args.task, session_id=args.session)


def _wake(args: argparse.Namespace) -> int:
    if args.detach:  # the worker pool's side: harness/worker_cli.py
        from corral.harness.worker_cli import run_detached

        return run_detached(None, args.session_id, args.model)
    return _go(args, task=None, session_id=args.session_id)


def _go(args: argparse.Namespace, *, task: str | None, session_id: str | None) -> int:
    import anyio

    from corral.harness.config import HarnessSettings
    from corral.harness.run import run_session
    from corral.harness.view import RichView

    settings = HarnessSettings(**({"model": args.model} if args.model else {}))  # the flag wins over CORRAL_MODEL
    if not settings.anthropic_api_key:
        raise InvalidArgument(
            "ANTHROPIC_API_KEY is not set",
            hint="export ANTHROPIC_API_KEY=sk-ant-...; ANTHROPIC_BASE_URL points at a gateway if you use one",
        )
    view = RichView()
    started: list[str] = []
    try:
        outcome = anyio.run(
            lambda: run_session(
                settings, task=task, session_id=session_id, view=view, env=dict(os.environ), on_session=started.append
            )
        )
    except KeyboardInterrupt:
        if started:
            print(f"corral: stopped; resume with `corral wake {started[0]}`", file=sys.stderr)
        return 130
    view.console.print(
        f'[bold]done[/] · session [cyan]{outcome.session_id}[/] (continue with `corral run "..." --session {outcome.session_id}`)'
    )
    return 0
