"""Structured logs: one JSON object per line, with secrets scrubbed before they are written.

Every long-running Verity command logs through here. Tokens and PEM private keys must never
reach a log, so the formatter scrubs anything that looks like either, whatever the caller
passed: a defence in depth behind callers that never log them on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL
)
# Verity bearer tokens all start with "vrt" and a type letter (see controlplane.auth).
_TOKEN = re.compile(r"vrt[a-z]_[A-Za-z0-9_\-]{16,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def scrub(text: str) -> str:
    """Remove private keys and bearer tokens from text meant for a log or an error message."""
    text = _PRIVATE_KEY.sub("[private key removed]", text)
    text = _TOKEN.sub("[token removed]", text)
    return _BEARER.sub(r"\1[token removed]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str))


def configure(level: str = "info") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True
