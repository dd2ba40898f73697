"""What the credentials tools return: pydantic models, so clients get output schemas."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["CredentialInfo", "CredentialPage", "GitGrant", "HttpResult"]


class CredentialInfo(BaseModel):
    """A credential's policy as list_credentials shows it: everything but the secret."""

    name: str
    kind: str
    hosts: list[str]
    methods: list[str]
    ports: list[int]
    schemes: list[str]
    allow_private: bool
    header: str | None = None
    template: str = "{secret}"
    query_param: str | None = None
    username: str | None = None
    description: str = ""
    has_secret: bool = Field(description="false when the keyring lost the secret: http_request will say so")


class CredentialPage(BaseModel):
    credentials: list[CredentialInfo]
    next_cursor: str | None = Field(None, description="pass as cursor for the next page; null on the last page")
    total: int = Field(description="credentials in the vault")


class HttpResult(BaseModel):
    status: int
    headers: list[list[str]] = Field(description="[name, value] pairs, redacted")
    body: str = Field(description="decoded body, redacted; base64 when it is not UTF-8 text")
    body_encoding: Literal["text", "base64"]
    body_bytes: int = Field(description="decoded body size (counted up to CORRAL_PROXY_DRAIN_BYTES)")
    body_bytes_exact: bool = True
    truncated: bool
    body_withheld: str | None = Field(None, description="why the body is not returned at all, if it is not")


class GitGrant(BaseModel):
    remote_url: str
    expires_at: str
    access: Literal["read", "write"]
    gateway_dir: str
    run_git_with: str
    how: str
