"""Every example file loads, and every document comes back exactly as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from verity.resources import load_documents

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))


def test_there_are_examples_for_every_kind() -> None:
    kinds = {r.kind for path in FILES for r in load_documents(path.read_text())}
    assert kinds == {
        "Mesh",
        "Dataplane",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "TrafficPermission",
    }


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_round_trips(path: Path) -> None:
    text = path.read_text()
    written = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    resources = load_documents(text)
    assert [r.to_document() for r in resources] == written


def test_all_examples_apply_together() -> None:
    """No two examples name the same resource, so the whole folder applies at once."""
    text = "\n---\n".join(path.read_text() for path in FILES)
    resources = load_documents(text)
    assert len({r.key() for r in resources}) == len(resources)


def test_universal_kuma_examples_stay_universal() -> None:
    for path in sorted((EXAMPLES / "kuma" / "universal").glob("*.yaml")):
        for resource in load_documents(path.read_text()):
            document = resource.to_document()
            assert "type" in document and "apiVersion" not in document
