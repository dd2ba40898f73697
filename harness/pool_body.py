"""What a worker's job runs by default: the reference harness waking the session.

Built once per worker process (`corral worker --body harness.pool_body:harness_body`), where
reading the settings is allowed; the body then runs `run_session` over the leased store, so
every append the harness makes carries the worker's lease token.
"""

from __future__ import annotations

import os

from corral.errors import InvalidArgument
from corral.harness.config import HarnessSettings
from corral.harness.pool import Body
from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import EventStore


def harness_body() -> Body:
    settings = HarnessSettings()
    if not settings.anthropic_api_key:
        raise InvalidArgument(
            "ANTHROPIC_API_KEY is not set",
            hint="the workers call Claude: export ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a gateway)",
        )
    env = dict(os.environ)
    import anthropic  # noqa: F401 - a slow first import belongs at start-up, not inside the first job

    async def body(store: EventStore, session_id: str) -> None:
        await run_session(settings, task=None, session_id=session_id, view=NullView(), env=env, store=store)

    return body
