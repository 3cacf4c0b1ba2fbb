"""Canonical JSON: the single byte form that digests and the audit hash chain are computed over."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def _plain(value: object) -> object:
    # Callers may hand in any Mapping (e.g. a read-only proxy); JSON only knows dicts.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text: equal values give equal strings.

    NaN and infinities are refused because they have no JSON form that round-trips.
    """
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_plain,
    )


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of value (the spec_digest of a document)."""
    return sha256_hex(canonical_json(value))
