"""One event -> one line a person can read, shared by the terminal timeline and the web page.

The harness writes `agent.message` with Anthropic-style content blocks, tool calls as
`agent.tool_use`, results as `agent.tool_result`, usage in `span.model_request`; the
summaries read those shapes tolerantly (and unknown types as compact JSON), because a
viewer that crashes on a log it does not know is worse than none.

Event data is untrusted (a model wrote it) and any JSON: rendering never recurses past
`MAX_DEPTH` levels or builds more than about `MAX_TEXT` characters, names are shown with
`str()`, and an event that still cannot be summarised becomes one "unreadable" line
instead of breaking the page or the terminal timeline for every event after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["USAGE_KEYS", "Line", "summarize", "totals", "usage_of"]

# Tool calls that are the sandbox lifecycle (the harness records them as tool calls).
SANDBOX_TOOLS = {"provision", "destroy", "list_sandboxes"}
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
MAX_TEXT = 600
MAX_DEPTH = 8  # nesting shown; deeper is `…` (and no recursion is ever deep)
MAX_BLOCKS = 200  # content blocks read from one message


@dataclass
class Line:
    kind: str  # css-ish class: user, model, tool, result, error, sandbox, checkpoint, status, usage, other
    title: str  # short label, e.g. "tool execute"
    text: str  # the readable body (clipped)
    usage: dict[str, int] = field(default_factory=dict)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compact(value: Any, depth: int = 0) -> str:
    """`value` as one line of JSON-ish text: nesting past MAX_DEPTH is `…`, length about MAX_TEXT."""
    if isinstance(value, str):
        return value if depth == 0 else json.dumps(value[: MAX_TEXT + 1], ensure_ascii=False)
    if depth >= MAX_DEPTH and isinstance(value, list | dict):
        return "[…]" if isinstance(value, list) else "{…}"
    if isinstance(value, list):
        return "[" + _joined(compact(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + _joined(f"{compact(str(k), depth + 1)}: {compact(v, depth + 1)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value) if not isinstance(value, int) or value.bit_length() < 200 else "…"
    return str(value)[:MAX_TEXT]


def _joined(parts: Any) -> str:
    """Join until about MAX_TEXT characters, then `…` (a huge list is not rendered whole)."""
    out: list[str] = []
    size = 0
    for part in parts:
        if size > MAX_TEXT:
            out.append("…")
            break
        out.append(part)
        size += len(part) + 2
    return ", ".join(out)


def text_of(value: Any, depth: int = 0) -> str:
    """Text from a string, a content-block list, or a dict holding either."""
    if isinstance(value, str):
        return value
    if depth >= MAX_DEPTH:
        return compact(value, depth)
    if isinstance(value, list):
        parts = [text_of(block, depth + 1) for block in value[:MAX_BLOCKS]]
        return "\n".join(p for p in parts if p)
    if isinstance(value, dict):
        if value.get("type") == "tool_use":
            return f"→ {value.get('name', '?')}({compact(value.get('input', {}), depth + 1)})"
        for key in ("text", "content", "message", "summary", "output", "stdout"):
            if key in value:
                return text_of(value[key], depth + 1)
        if value.get("type") == "thinking":
            return "(thinking)"
        return compact(value, depth)
    return "" if value is None else compact(value, depth)


def usage_of(data: Any) -> dict[str, int]:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return {}
    return {k: int(usage[k]) for k in USAGE_KEYS if isinstance(usage.get(k), int | float) and math.isfinite(usage[k])}


def _tidy(text: str) -> str:
    """A tool's JSON result on one line (MCP servers pretty-print it)."""
    if text[:1] in "{[":
        try:
            return compact(json.loads(text))
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack ("[[[[...")
            pass
    return text


def _bare(name: Any) -> str:
    """`sandbox__provision` (the harness prefixes a tool with its server) -> `provision`."""
    return str(name or "").rsplit("__", 1)[-1]


def summarize(type_: str, data: Any) -> Line:
    try:
        return _summarize(str(type_), data)
    except Exception as err:  # the last line of defence: one odd event never breaks the rest
        return Line("other", str(type_), f"(unreadable event: {type(err).__name__})")


def _summarize(type_: str, data: Any) -> Line:
    d = data if isinstance(data, dict) else {"value": data}
    domain = type_.split(".", 1)[0]
    usage = usage_of(d)
    if type_ == "user.message":
        return Line("user", "user", clip(text_of(d)), usage)
    if type_ == "agent.message":
        return Line("model", "model", clip(text_of(d)), usage)
    if type_ == "agent.tool_use":
        name = d.get("name") or d.get("tool") or "?"
        kind = "sandbox" if _bare(name) in SANDBOX_TOOLS else "tool"
        return Line(kind, f"tool {name}", clip(compact(d.get("input", d.get("arguments", {})))), usage)
    if type_ == "agent.tool_result":
        failed = bool(d.get("is_error") or d.get("isError"))
        label = "error" if failed else "result"
        kind = "error" if failed else ("sandbox" if _bare(d.get("name")) in SANDBOX_TOOLS else "result")
        return Line(kind, f"{label} {d.get('name', '')}".strip(), clip(_tidy(text_of(d.get("content", d)))), usage)
    if type_ == "span.model_request":
        figures = ", ".join(f"{k.replace('_input_tokens', '').replace('_tokens', '')} {v}" for k, v in usage.items())
        head = " ".join(
            str(x)
            for x in (
                d.get("model"),
                f"{d['latency_ms']:.0f} ms" if isinstance(d.get("latency_ms"), int | float) else None,
            )
            if x
        )
        return Line("usage", "model request", " · ".join(x for x in (head, figures) if x) or clip(compact(d)), usage)
    if type_ == "session.tools" and isinstance(d.get("tools"), list):
        names = [str(t.get("name", "?")) for t in d["tools"] if isinstance(t, dict)]
        return Line("status", "tools", clip(f"{len(names)} tools: {', '.join(names)}"), usage)
    if type_ == "agent.subagent":
        return Line("tool", "subagent", clip(f"{d.get('task', '')} → {d.get('session_id', '?')}"), usage)
    if type_ == "session.error" and d.get("fatal") is False:
        return Line("error", f"attempt {d.get('attempt', '?')} failed", clip(_failed_attempt(d)), usage)
    if type_.endswith((".error", ".failed")):
        return Line("error", type_, clip(text_of(d)), usage)
    if type_ == "sandbox.checkpoint":
        other = " (a sandbox the model named)" if d.get("default") is False else ""
        return Line(
            "checkpoint",
            "checkpoint",
            clip(f"{d.get('checkpoint_id', '?')} of {d.get('sandbox_id', '?')}{other}"),
            usage,
        )
    if domain == "sandbox":
        sid = d.get("sandbox_id", "")
        rest = {k: v for k, v in d.items() if k != "sandbox_id"}
        return Line("sandbox", type_, clip(f"{sid} {compact(rest) if rest else ''}".strip()), usage)
    if type_ == "session.status":
        reason = f" ({compact(d['reason'])})" if d.get("reason") else ""
        return Line("status", "status", clip(compact(d.get("status", d)) + reason), usage)
    if type_ == "context.compacted":
        return Line("status", "compacted", clip(text_of(d.get("summary", d))), usage)
    return Line("other", type_, clip(compact(data)), usage)


def _failed_attempt(d: dict[str, Any]) -> str:
    """A failed model attempt: how it failed, what of the response arrived (and was discarded), when it is retried."""
    parts = [f"{d['fault']}: " if d.get("fault") else "", str(d.get("message", ""))]
    arrived = d.get("arrived") if isinstance(d.get("arrived"), dict) else None
    if arrived:
        got = [f"{arrived.get('text_chars', 0)} chars of text"] + [f"call {n}" for n in arrived.get("tool_uses") or []]
        parts.append(f" — discarded, not the answer: {', '.join(got)}")
    if isinstance(d.get("retry_in_s"), int | float):
        parts.append(f" — retry in {d['retry_in_s']:g}s")
    return "".join(parts)


def totals(lines: list[Line]) -> dict[str, int]:
    out = {k: 0 for k in USAGE_KEYS}
    for line in lines:
        for k, v in line.usage.items():
            out[k] += v
    return out
