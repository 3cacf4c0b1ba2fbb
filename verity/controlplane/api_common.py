"""What every REST handler shares: the error type and the authenticated caller."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from verity.controlplane import auth
from verity.store.base import Store


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or []


async def current_caller(request: Request) -> auth.Caller:
    """The authenticated caller of this request (401 when there is none)."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise auth.Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
    store: Store = request.app.state.store
    record = await store.find_token(auth.hash_secret(secret.strip()))
    if record is None:
        raise auth.Unauthenticated("unknown token")
    return auth.caller_from_record(record, datetime.now(UTC))


Caller = Annotated[auth.Caller, Depends(current_caller)]
