"""Events -> Messages API request: a deterministic transform with prompt-cache breakpoints.

The same events always give the same request bytes, and a new turn only appends to the
previous turn's messages, so the prefix up to the previous breakpoint is read from the
prompt cache. Breakpoints (at most 4 are allowed; we use 3):
  1. the last system block     -> tools + system are cached across turns and wakes
  2. the previous user turn    -> what the last request cached is read back
  3. the last message          -> written now, read by the next turn

After a `context.compacted` event the context is its summary plus the events after
`end`; the originals stay in the log, readable through the session tools.
"""

from __future__ import annotations

import json
from typing import Any

from corral.harness.events import AGENT_MESSAGE, TOOL_RESULT, TOOL_USE, USER_MESSAGE
from corral.servers.session import Event

CACHE = {"type": "ephemeral"}

SUMMARY_PROMPT = (
    "The conversation is about to be compacted to save context. Write a summary that lets you continue the task "
    "without the messages above: the goal, what is done, what is left, key facts (ids, paths, names, values), "
    "and anything the user asked for. Reply with the summary only."
)


def todo_text(todo: list[dict[str, Any]]) -> str:
    marks = {"done": "x", "in_progress": "~"}
    lines = [f"[{marks.get(i.get('status', ''), ' ')}] {i.get('text', '')}" for i in todo]
    return "Your plan (update it with the todo tool; finish every open item before ending your turn):\n" + "\n".join(
        lines
    )


def summary_text(compaction: Event) -> str:
    d = compaction.data
    return (
        f"[Earlier events {d['start']}..{d['end'] - 1} of this session were compacted. Summary:]\n{d['summary']}\n"
        "[The originals are in the session log: read them with the session tools (get_events, slice, rewind).]"
    )


def _add(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": list(blocks)})


def build_messages(compaction: Event | None, tail: list[Event]) -> list[dict[str, Any]]:
    """The conversation as Messages API messages (no cache markers)."""
    messages: list[dict[str, Any]] = []
    todo = compaction.data.get("todo") if compaction else None
    if compaction:
        _add(messages, "user", [{"type": "text", "text": summary_text(compaction)}])
    order: list[str] = []  # tool_use ids of the current assistant turn, in order
    results: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        if results:
            blocks = [results.pop(i) for i in order if i in results] + list(results.values())
            if todo:
                blocks.append({"type": "text", "text": todo_text(todo)})
            _add(messages, "user", blocks)
        results.clear()
        order.clear()

    for e in tail:
        if e.type == USER_MESSAGE:
            flush()
            _add(messages, "user", [{"type": "text", "text": e.data["text"]}])
        elif e.type == AGENT_MESSAGE:
            if results:
                flush()
            if e.data.get("text"):
                _add(messages, "assistant", [{"type": "text", "text": e.data["text"]}])
        elif e.type == TOOL_USE:
            if results:
                flush()
            order.append(e.data["id"])
            _add(
                messages,
                "assistant",
                [{"type": "tool_use", "id": e.data["id"], "name": e.data["name"], "input": e.data["input"]}],
            )
        elif e.type == TOOL_RESULT:
            if e.data.get("todo") is not None:
                todo = e.data["todo"]
            results[e.data["tool_use_id"]] = {
                "type": "tool_result",
                "tool_use_id": e.data["tool_use_id"],
                "content": e.data["content"],
                "is_error": bool(e.data.get("is_error")),
            }
    flush()
    return messages


def with_cache_breakpoints(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with cache_control on the last message and the user turn before it.

    Only the marked messages are copied (shallowly, down to the marked block): the
    input is never changed, and a long context is not deep-copied on every turn."""
    out = list(messages)
    user_turns = [i for i, m in enumerate(out) if m["role"] == "user"]
    marks = {len(out) - 1} | ({user_turns[-2]} if len(user_turns) >= 2 else set())
    for i in marks:
        if 0 <= i < len(out) and out[i]["content"]:
            content = list(out[i]["content"])
            content[-1] = {**content[-1], "cache_control": CACHE}
            out[i] = {**out[i], "content": content}
    return out


def system_blocks(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "cache_control": CACHE}]


def estimate_tokens(*parts: Any) -> int:
    """A cheap, deterministic upper-ish estimate (about 3.5 characters per token)."""
    return int(sum(len(json.dumps(p, ensure_ascii=False)) for p in parts) / 3.5)


def compaction_cut(tail: list[Event]) -> int | None:
    """The position where compaction may end: the start of the last model response, so the
    latest exchange stays verbatim and no tool_use is separated from its result."""
    starts = [
        i
        for i, e in enumerate(tail)
        if e.type in (AGENT_MESSAGE, TOOL_USE) and (i == 0 or tail[i - 1].type not in (AGENT_MESSAGE, TOOL_USE))
    ]
    if len(starts) < 2:
        return None  # nothing worth compacting yet
    return tail[starts[-1]].position


def todo_at(compaction: Event | None, tail: list[Event], before: int) -> list[dict[str, Any]] | None:
    todo = compaction.data.get("todo") if compaction else None
    for e in tail:
        if e.position < before and e.type == TOOL_RESULT and e.data.get("todo") is not None:
            todo = e.data["todo"]
    return todo
