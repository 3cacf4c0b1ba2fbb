"""Where the CLI finds the API and its token when no flag or environment variable says.

`control-plane run` writes this file for the user who started it: the API address and the
path of the admin token file (never the token itself, so there is one secret file to guard).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from verity.controlplane.privatefile import write_private_file


@dataclass(frozen=True)
class ClientConfig:
    api: str
    token_file: Path | None


def config_path() -> Path:
    explicit = os.environ.get("VERITY_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "verity" / "config.json"


def write_client_config(api: str, token_file: Path) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = {"api": api, "tokenFile": str(token_file.resolve())}
    write_private_file(path, json.dumps(config).encode())
    return path


def read_client_config() -> ClientConfig | None:
    path = config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the client config: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("api"), str):
        raise ValueError(f"{path}: expected a JSON object with an 'api' string")
    token_file = raw.get("tokenFile")
    return ClientConfig(api=raw["api"], token_file=Path(token_file) if token_file else None)
