"""Every stop_reason the Messages API documents has one defined behaviour (see harness/agent.py):
end_turn and stop_sequence end the turn; tool_use runs the calls; max_tokens on a text answer
is recorded and reported; refusal is recorded and nothing it started runs; pause_turn is sent
back so the model continues; model_context_window_exceeded compacts then asks again; an
unknown reason is recorded, surfaced and not acted on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.harness.model import UnknownStopReason
from corral.harness.run import run_session
from corral.harness.view import NullView
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.harness.test_crash import assert_valid_history, read_log
from tests.harness.test_faults import failed_attempts, read_log_all

pytestmark = pytest.mark.anyio


async def run(
    env: dict[str, str], script: Script, task: str | None, session_id: str | None = None, **over: Any
) -> tuple[str, str, FakeAnthropic]:
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        out = await run_session(settings_from(e, **over), task=task, session_id=session_id, view=NullView(), env=e)
    assert fake.invalid == []
    return out.session_id, out.text, fake


def status(env: dict[str, str], sid: str) -> dict[str, Any]:
    return next(e.data for e in reversed(read_log(env, sid)) if e.type == "session.status")


async def test_stop_sequence_ends_the_turn(env: dict[str, str]) -> None:
    sid, answer, fake = await run(
        env,
        Script({"SEQ": [Turn([text("stopped at the sequence")], stop_reason="stop_sequence"), Turn([text("x")])]}),
        "SEQ",
    )
    assert answer == "stopped at the sequence" and sum(fake.counts.values()) == 1
    assert status(env, sid) == {**status(env, sid), "status": "idle", "reason": "stop_sequence"}


async def test_a_text_answer_cut_by_max_tokens_is_recorded_and_reported(env: dict[str, str]) -> None:
    sid, answer, fake = await run(
        env,
        Script({"CUT": [Turn([text("the answer is long and")], stop_reason="max_tokens"), Turn([text("x")])]}),
        "CUT",
    )
    assert answer == "the answer is long and" and sum(fake.counts.values()) == 1  # reported, not continued
    s = status(env, sid)
    assert s["status"] == "idle" and s["reason"].startswith(
        "max_tokens: the answer was cut at 8192 tokens; raise CORRAL_MAX_TOKENS"
    )
    assert f"--session {sid}" in s["reason"]


async def test_a_refusal_is_recorded_and_nothing_it_started_runs(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script(
        {
            "REFUSE": [
                Turn(
                    [text("I can't help with that."), tool("toolbox__append_line", {"text": "no"})],
                    stop_reason="refusal",
                )
            ]
        }
    )
    sid, answer, fake = await run(env, script, "REFUSE")
    assert answer == "I can't help with that."
    log = read_log(env, sid)
    assert [e.type for e in log if e.type.startswith("agent.")] == ["agent.message"]
    assert not (toolbox_dir / "lines.txt").exists()
    s = status(env, sid)
    assert s["status"] == "idle" and s["reason"].startswith("refusal: the model declined")
    _, again, fake = await run(env, script, None, session_id=sid)  # a wake does not ask again
    assert again == answer and sum(fake.counts.values()) == 0


async def test_pause_turn_is_sent_back_so_the_model_continues(env: dict[str, str]) -> None:
    seen: list[dict[str, Any]] = []

    def resume(body: dict[str, Any]) -> Turn:
        seen.append(body["messages"][-1])
        return Turn([text("and finished.")])

    sid, answer, _ = await run(
        env, Script({"PAUSE": [Turn([text("Working on it")], stop_reason="pause_turn"), resume]}), "PAUSE"
    )
    assert answer == "and finished."
    assert (
        seen[0]["role"] == "assistant" and seen[0]["content"][0]["text"] == "Working on it"
    )  # its own turn, sent back
    assert_valid_history(read_log(env, sid))


async def test_context_window_exceeded_compacts_then_asks_again(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script(
        {
            "WINDOW": [
                Turn([tool("toolbox__count_lines", {})]),
                Turn([tool("toolbox__count_lines", {})]),
                [
                    Turn([text("cut off by the window")], stop_reason="model_context_window_exceeded"),
                    Turn([text("done after compacting")]),
                ],
            ]
        }
    )
    sid, answer, fake = await run(env, script, "WINDOW")
    assert answer == "done after compacting"
    log = read_log(env, sid)
    [failed] = failed_attempts(log)
    assert failed["fault"] == "context_window_exceeded" and failed["arrived"]["text"] == "cut off by the window"
    types = [e.type for e in log]
    assert types.index("session.error") < types.index("context.compacted")
    assert fake.counts[("WINDOW", "compaction")] == 1
    assert "cut off by the window" not in [e.data.get("text") for e in log if e.type == "agent.message"]


async def test_an_unknown_stop_reason_is_recorded_and_surfaced_not_acted_on(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    script = Script(
        {"NEW": [Turn([text("hm"), tool("toolbox__append_line", {"text": "guess"})], stop_reason="brand_new_reason")]}
    )
    with pytest.raises(UnknownStopReason, match="brand_new_reason"):
        await run(env, script, "NEW")
    [sid] = {e.session_id for e in read_log_all(env)}
    log = read_log(env, sid)
    assert [e.type for e in log if e.type.startswith("agent.")] == []
    fatal = next(e.data for e in log if e.type == "session.error")
    assert (
        fatal["fatal"]
        and fatal["fault"] == "unknown_stop_reason"
        and fatal["arrived"]["tool_uses"] == ["toolbox__append_line"]
    )
    assert status(env, sid)["status"] == "failed"
    assert not (toolbox_dir / "lines.txt").exists()
