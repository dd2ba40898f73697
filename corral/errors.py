"""Corral's error kinds, shared by every server, the vault and the harness.

    CorralError                      kind
     ├── InvalidArgument (ValueError)        invalid_argument
     ├── NotFound (LookupError)              not_found
     ├── Conflict                            conflict
     ├── PolicyDenied (PermissionError)      policy_denied
     ├── Timeout (TimeoutError)              timeout
     ├── SandboxLost                         sandbox_lost
     └── Unavailable (ConnectionError)       unavailable

Each error says what went wrong and, in `hint`, what to do next. `str(error)` is the
one line a client or a terminal sees: ``"<kind>: <message> (<hint>)"``. Vendor
exceptions are translated into these at one boundary per backend (``raise ... from e``);
the MCP layer turns them into `ToolError` (see `servers/mcp_shell.py`).
"""

from __future__ import annotations

__all__ = [
    "CorralError",
    "InvalidArgument",
    "NotFound",
    "Conflict",
    "PolicyDenied",
    "Timeout",
    "SandboxLost",
    "Unavailable",
    "KINDS",
]


class CorralError(Exception):
    kind = "error"
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class InvalidArgument(CorralError, ValueError):
    kind = "invalid_argument"
    default_hint = "fix the argument and call again"


class NotFound(CorralError, LookupError):
    kind = "not_found"


class Conflict(CorralError):
    kind = "conflict"
    default_hint = "read the latest state and retry"


class PolicyDenied(CorralError, PermissionError):
    kind = "policy_denied"


class Timeout(CorralError, TimeoutError):
    kind = "timeout"


class SandboxLost(CorralError):
    kind = "sandbox_lost"
    default_hint = "the sandbox is gone; call provision (or omit sandbox_id) to get a fresh one"


class Unavailable(CorralError, ConnectionError):
    kind = "unavailable"
    default_hint = "retry later"


KINDS = {
    cls.kind: cls for cls in (InvalidArgument, NotFound, Conflict, PolicyDenied, Timeout, SandboxLost, Unavailable)
}
