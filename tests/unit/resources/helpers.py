"""Small helpers shared by the resource tests."""

from __future__ import annotations

import textwrap

import pytest

from verity.resources import FieldError, InvalidResource, Resource, load_documents


def load(text: str) -> list[Resource]:
    return load_documents(textwrap.dedent(text))


def load_one(text: str) -> Resource:
    resources = load(text)
    assert len(resources) == 1
    return resources[0]


def rejection(text: str) -> InvalidResource:
    with pytest.raises(InvalidResource) as caught:
        load(text)
    return caught.value


def error_at(text: str, path: str) -> FieldError:
    """The error reported at `path`; fails with every error if there is none."""
    exc = rejection(text)
    found = [e for e in exc.errors if e.path == path]
    assert found, f"no error at {path!r}; got:\n{exc}"
    return found[0]


def istio(spec: str, kind: str = "AuthorizationPolicy", version: str = "v1") -> str:
    """An Istio document in namespace foo, named p, with the given (indented) spec body."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        f"apiVersion: security.istio.io/{version}\n"
        f"kind: {kind}\n"
        "metadata:\n  name: p\n  namespace: foo\n"
        f"spec:\n{body}\n"
    )
