"""StoredObject <-> plain JSON values, the form the change log keeps objects in."""

from __future__ import annotations

from typing import Any

from verity.store.base import ObjectKey, StoredObject


def object_to_json(obj: StoredObject) -> dict[str, Any]:
    return {
        "kind": obj.key.kind,
        "namespace": obj.key.namespace,
        "name": obj.key.name,
        "api_version": obj.api_version,
        "labels": dict(obj.labels),
        "document": obj.document,
        "spec_digest": obj.spec_digest,
        "uid": obj.uid,
        "resource_version": obj.resource_version,
        "generation": obj.generation,
        "created_at": obj.created_at,
        "updated_at": obj.updated_at,
    }


def object_from_json(data: dict[str, Any]) -> StoredObject:
    return StoredObject(
        key=ObjectKey(data["kind"], data["namespace"], data["name"]),
        api_version=data["api_version"],
        labels=data["labels"],
        document=data["document"],
        spec_digest=data["spec_digest"],
        uid=data["uid"],
        resource_version=data["resource_version"],
        generation=data["generation"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
    )
