"""The CLI's connection to the control-plane API: where it is, which token, and the calls.

Precedence for both the address and the token: flags, then VERITY_API / VERITY_TOKEN, then the
local config that `verity control-plane run` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from verity.controlplane.clientconfig import read_client_config

DEFAULT_API = "http://127.0.0.1:5681"


class CliError(Exception):
    """A failure shown to the user as one line, with a non-zero exit."""


@dataclass(frozen=True)
class Target:
    api: str
    token: str | None


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read token file {path}: {exc.strerror}") from exc


def resolve_target(api: str | None, token: str | None, token_file: Path | None) -> Target:
    config = read_client_config()
    resolved_api = api or os.environ.get("VERITY_API") or (config.api if config else DEFAULT_API)
    if token is None and token_file is not None:
        token = _read_token_file(token_file)
    token = token or os.environ.get("VERITY_TOKEN")
    if token is None and config is not None and config.token_file is not None:
        token = _read_token_file(config.token_file)
    return Target(api=resolved_api.rstrip("/"), token=token)


class ApiClient:
    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self._http = httpx.Client(base_url=target.api, headers=headers, timeout=timeout)
        self.api = target.api

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        content: str | None = None,
    ) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        headers = {"Content-Type": "application/yaml"} if content is not None else None
        try:
            response = self._http.request(
                method, path, params=clean, json=json, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the control plane at {self.api}: {exc}") from exc
        if response.status_code >= 400:
            raise CliError(_error_text(response))
        return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        message = None
    reason = message or response.text.strip() or response.reason_phrase
    return f"{reason} (HTTP {response.status_code})"
