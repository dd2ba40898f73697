"""Lean tool input schemas: what a model needs to call a tool, and nothing it pays for in vain.

Every tool definition is sent to the model on every request. Pydantic's JSON Schema carries
a `title` per property, `anyOf: [X, {"type": "null"}]` for every optional parameter and
`$defs`/`$ref` for nested models (which some client-side converters leave dangling). None of
that tells the model anything the property name, `type` and `description` do not, so:

- `$ref`s are inlined (our models are small and not recursive) and `$defs` dropped;
- `title` keywords go (property *names* that happen to be "title" stay);
- an optional parameter is its non-null schema; leaving it out is how a caller says "none"
  (it is not in `required`), and a `default: null` says nothing more.

Validation is unaffected: the server validates arguments with the pydantic model, not with
this schema.
"""

from __future__ import annotations

from typing import Any

__all__ = ["lean"]

_NULL = {"type": "null"}


def lean(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})
    out = _walk({k: v for k, v in schema.items() if k != "$defs"}, defs)
    assert isinstance(out, dict)
    return out


def _walk(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_walk(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _walk(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key in ("properties", "patternProperties"):  # keys here are names, not keywords
            out[key] = {name: _walk(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _walk(value, defs)
    return _drop_null_branch(out)


def _drop_null_branch(node: dict[str, Any]) -> dict[str, Any]:
    options = node.get("anyOf")
    if not isinstance(options, list) or _NULL not in options:
        return node
    rest = [o for o in options if o != _NULL]
    if len(rest) != 1:
        return node
    merged = {**rest[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged
