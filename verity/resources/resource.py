"""`Resource`: the base of every kind, as the store and the rest of Verity see it."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr


class Resource(BaseModel):
    """A validated document: identity, labels, a typed `spec`, and the document as applied.

    `kind` is the store kind: a Kuma `Mesh` and a Verity `Mesh` are both "Mesh" (same key).
    `namespace` is "" for cluster-scoped kinds. `resource_version` is the user's
    `metadata.resourceVersion`, if any, for optimistic concurrency. Subclasses add `spec`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    STORE_KIND: ClassVar[str] = ""
    NAMESPACED: ClassVar[bool] = True

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    resource_version: str | None = None

    # The document exactly as applied, minus store-owned metadata: what to_document() gives.
    _document: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def build(cls, document: dict[str, Any], **fields: Any) -> Self:
        resource = cls(**fields)
        resource._document = copy.deepcopy(document)
        return resource

    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name): the store key."""
        return (self.kind, self.namespace, self.name)

    def to_document(self) -> dict[str, Any]:
        """The document in its original form, without store-owned metadata or defaults."""
        return copy.deepcopy(self._document)

    @property
    def subject(self) -> str:
        """How errors and logs name this resource: `AuthorizationPolicy foo/httpbin`."""
        return subject_of(self.kind, self.namespace, self.name)


def subject_of(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
