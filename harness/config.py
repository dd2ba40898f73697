"""Harness settings (`CORRAL_*`, plus the SDK's `ANTHROPIC_*`), read once by the CLI.

Nothing below `harness/cli.py` reads the environment: the loop, the router and the
model client get these values passed in.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from corral.servers.session.config import SessionSettings

DEFAULT_SERVERS = ("sandbox", "session", "credentials")


class HarnessSettings(SessionSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore", protected_namespaces=())

    model: str = Field("claude-sonnet-4-6", description="the Claude model the harness calls")
    max_tokens: int = Field(8192, gt=0, description="max output tokens per model response")
    context_budget_tokens: int = Field(
        150_000,
        gt=1000,
        description="when a request's input nears this many tokens, older events are compacted into a summary",
    )
    anthropic_api_key: str = Field("", validation_alias=AliasChoices("ANTHROPIC_API_KEY"), repr=False)
    anthropic_base_url: str | None = Field(None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL"))
    model_retries: int = Field(
        5, ge=0, description="retries of a model request on 429/5xx/overloaded/connection errors"
    )
    retry_base_s: float = Field(
        1.0, ge=0, description="first backoff delay; doubles per retry (a retry-after header wins)"
    )
    model_timeout_s: float = Field(600.0, gt=0, description="timeout of one model request")
    model_idle_timeout_s: float = Field(
        90.0,
        gt=0,
        description="a model stream that delivers no bytes for this long is abandoned and retried; above the slowest first "
        "token of a full context window (tens of seconds), far below the SDK's 10 minutes",
    )

    extra_servers: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object name -> URL or command line of further MCP servers, e.g. {"git": "uvx mcp-server-git"}',
    )
    servers: Annotated[list[str], NoDecode] = Field(
        list(DEFAULT_SERVERS),
        description="comma-separated MCP servers the harness connects to (of sandbox, session, credentials and CORRAL_EXTRA_SERVERS)",
    )
    sandbox_url: str = Field(
        "", description="streamable HTTP URL of the sandbox server; empty: launch `corral serve sandbox` over stdio"
    )
    session_url: str = Field("", description="streamable HTTP URL of the session server; empty: stdio")
    credentials_url: str = Field("", description="streamable HTTP URL of the credential proxy; empty: stdio")
    server_token: str = Field(
        "", repr=False, description="bearer token for the HTTP servers (as printed by `corral up`)"
    )
    tool_timeout_s: float = Field(
        300.0, gt=0, description="timeout of one tool call; the call becomes a timeout tool error"
    )
    connect_timeout_s: float = Field(60.0, gt=0, description="how long connecting to one MCP server may take")
    max_turns: int = Field(
        200, gt=0, description="model responses per `corral run`/`wake` before the harness stops (resumable)"
    )
    subagent_summary_chars: int = Field(2000, gt=0, description="longest summary a subagent returns to its parent")
    eager_sandbox: bool = Field(
        False, description="provision a sandbox before the first model call (the benchmark's baseline); default lazy"
    )
    checkpoints: Literal["each-call", "off"] = Field(
        "each-call",
        description="each-call: checkpoint the sandbox after every tool call that may change it and record "
        "`sandbox.checkpoint` in the log, so a fork or a wake restores the files of its position; off: never",
    )
    kill_after_appends: int = Field(
        0, ge=0, description="TEST HOOK: SIGKILL the harness right after its Nth append (crash tests)"
    )

    @field_validator("servers", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("servers")
    @classmethod
    def _known(cls, names: list[str], info: ValidationInfo) -> list[str]:
        extra = info.data.get("extra_servers", {})  # declared above, so already validated
        unknown = [n for n in names if n not in DEFAULT_SERVERS and n not in extra]
        if unknown:
            raise ValueError(
                f"unknown MCP server {unknown[0]!r}; known: {', '.join([*DEFAULT_SERVERS, *extra])} (add others to CORRAL_EXTRA_SERVERS)"
            )
        return names

    def server_targets(self) -> dict[str, str | list[str]]:
        """name -> URL (streamable HTTP) or argv (stdio subprocess), for every configured server."""
        urls = {"sandbox": self.sandbox_url, "session": self.session_url, "credentials": self.credentials_url}
        targets: dict[str, str | list[str]] = {}
        for name in self.servers:
            if urls.get(name):
                targets[name] = urls[name]
            elif name in urls:
                # `python -m corral.cli` rather than `corral`: the same interpreter, whatever PATH says.
                targets[name] = [sys.executable, "-m", "corral.cli", "serve", name]
        for name, target in self.extra_servers.items():
            targets[name] = target if target.startswith(("http://", "https://")) else shlex.split(target)
        return targets
