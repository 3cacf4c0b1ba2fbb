"""Refuse private keys inside resources: the store and `get -o yaml` must never hold one.

A provided CA's key is given as a file on the control-plane host (`keyFile`, Kuma's `file`);
inline PEM (Verity `keyPem`, Kuma `inline` / `inlineString`) would sit in the database, the
audit digests and every `get` output.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from typing import Any

_MARKER = "PRIVATE KEY-----"


def _looks_like_key(value: str) -> bool:
    if _MARKER in value:
        return True
    try:
        return _MARKER in base64.b64decode(value, validate=True).decode("utf-8", "ignore")
    except (binascii.Error, ValueError):
        return False


def _walk(node: Any, path: str) -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")
    elif isinstance(node, str) and _looks_like_key(node):
        yield path


def inline_private_keys(document: Mapping[str, Any]) -> list[str]:
    """Field paths of the document that hold a private key."""
    return list(_walk(document, ""))
