"""Documents in, Resources out (and the `get -o yaml` form back out).

Two document forms are read: the Kubernetes form (`apiVersion`, `kind`, `metadata`,
`spec`) and Kuma's universal form (`type`, `name`, `mesh` and the spec at the top level).
Every error of a document is collected and reported with its path.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from verity.resources.common import Model
from verity.resources.errors import FieldError, InvalidResource, describe, translate
from verity.resources.kinds import (
    API_VERSIONS,
    UNIVERSAL_TYPES,
    KindInfo,
    find_kind,
    find_universal,
    kinds_of,
)
from verity.resources.kuma import KUMA_API_VERSION
from verity.resources.metadata import STORE_OWNED_METADATA, Labels, Name, ObjectMeta
from verity.resources.resource import Resource, subject_of
from verity.resources.yaml_source import read_documents

M = TypeVar("M", bound=BaseModel)

# Store-owned fields of the universal form, at the top level as kumactl prints them.
UNIVERSAL_STORE_FIELDS = ("creationTime", "modificationTime", "resourceVersion")
_KUBERNETES_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec")
_UNIVERSAL_IDENTITY = ("type", "name", "mesh", "labels")


class _MeshReference(Model):
    """Kuma's top-level `mesh` beside metadata and spec."""

    mesh: Name = "default"


class _UniversalIdentity(Model):
    """The identity fields of a universal-form document."""

    name: Name
    mesh: Name | None = None
    labels: Labels = {}


def load_documents(text: str) -> list[Resource]:
    """Every resource of a multi-document YAML/JSON text; InvalidResource for the first bad one."""
    resources: list[Resource] = []
    positions: dict[tuple[str, str, str], int] = {}
    for position, data in read_documents(text):
        if data is None:
            continue
        resource = parse_document(data, position)
        earlier = positions.setdefault(resource.key(), position)
        if earlier != position:
            path = "name" if _is_universal(data) else "metadata.name"
            raise InvalidResource(
                resource.subject,
                [FieldError(path, f"the same resource is also document {earlier}")],
            )
        resources.append(resource)
    return resources


def parse_document(doc: Mapping[str, Any], index: int = 1) -> Resource:
    """One document (already parsed from YAML) as a validated Resource."""
    if not isinstance(doc, Mapping):
        raise InvalidResource(
            f"document {index}", [FieldError("", f"must be a mapping (got {describe(doc)})")]
        )
    if _is_universal(doc):
        return _parse_universal(doc, index)
    return _parse_kubernetes(doc, index)


def with_store_metadata(
    doc: Mapping[str, Any],
    *,
    uid: str,
    resource_version: int,
    generation: int,
    created_at: str,
    updated_at: str,
) -> dict[str, Any]:
    """The document as `get -o yaml` shows it; parse_document() accepts and drops the additions."""
    document = copy.deepcopy(dict(doc))
    if _is_universal(document):
        return _stamp_universal(document, resource_version, created_at, updated_at)
    metadata = {
        k: v
        for k, v in dict(document.get("metadata") or {}).items()
        if k not in STORE_OWNED_METADATA
    }
    metadata.update(
        uid=uid,
        resourceVersion=str(resource_version),
        generation=generation,
        creationTimestamp=created_at,
        updateTimestamp=updated_at,
    )
    document["metadata"] = metadata
    return document


def _stamp_universal(
    document: dict[str, Any], resource_version: int, created_at: str, updated_at: str
) -> dict[str, Any]:
    # kumactl's layout: identity first, then the timestamps, then the spec fields.
    for key in UNIVERSAL_STORE_FIELDS:
        document.pop(key, None)
    stamped = {key: document.pop(key) for key in _UNIVERSAL_IDENTITY if key in document}
    stamped.update(
        creationTime=created_at, modificationTime=updated_at, resourceVersion=str(resource_version)
    )
    stamped.update(document)
    return stamped


def _is_universal(doc: Mapping[str, Any]) -> bool:
    return "type" in doc and "apiVersion" not in doc and "kind" not in doc


# --- Kubernetes form -----------------------------------------------------------------------


def _parse_kubernetes(doc: Mapping[str, Any], index: int) -> Resource:
    info = _identify(doc, index)
    document, resource_version = _without_store_metadata(doc)
    metadata = document.get("metadata")
    subject = _kubernetes_subject(info, metadata, index)

    errors = [
        FieldError(key, "unknown field")
        for key in document
        if key not in (*_KUBERNETES_TOP_LEVEL, *info.top_level)
    ]
    meta = (
        _validate(ObjectMeta, metadata, ("metadata",), errors) if "metadata" in document else None
    )
    if "metadata" not in document:
        errors.append(FieldError("metadata", "required field is missing"))
    spec_data = document.get("spec")
    spec = _validate(info.spec_model, {} if spec_data is None else spec_data, ("spec",), errors)
    extras = _kubernetes_extras(info, document, errors)
    version = _resource_version(resource_version, "metadata.resourceVersion", errors)
    namespace = _namespace(info, meta, errors)
    if errors or meta is None or spec is None:
        raise InvalidResource(subject, errors)
    return info.resource.build(
        document,
        api_version=info.api_version,
        kind=info.store_kind,
        name=meta.name,
        namespace=namespace,
        labels=meta.labels,
        annotations=meta.annotations,
        resource_version=version,
        spec=spec,
        **extras,
    )


def _without_store_metadata(doc: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The document minus store-owned metadata, and the resourceVersion the user gave."""
    document = dict(doc)
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return document, None
    document["metadata"] = {k: v for k, v in metadata.items() if k not in STORE_OWNED_METADATA}
    return document, metadata.get("resourceVersion")


def _identify(doc: Mapping[str, Any], index: int) -> KindInfo:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    supported = ", ".join(API_VERSIONS)
    error: FieldError | None = None
    if api_version is None:
        error = FieldError("apiVersion", f"required field is missing; supported: {supported}")
    elif not isinstance(api_version, str) or api_version not in API_VERSIONS:
        error = FieldError(
            "apiVersion", f"unsupported apiVersion {describe(api_version)}; supported: {supported}"
        )
    else:
        kinds = ", ".join(kinds_of(api_version))
        if kind is None:
            error = FieldError(
                "kind", f"required field is missing; supported for {api_version}: {kinds}"
            )
        elif not isinstance(kind, str) or find_kind(api_version, kind) is None:
            error = FieldError(
                "kind", f"unsupported kind {describe(kind)} for {api_version}; supported: {kinds}"
            )
    if error is not None:
        raise InvalidResource(f"document {index}", [error])
    info = find_kind(str(api_version), str(kind))
    assert info is not None
    return info


def _kubernetes_subject(info: KindInfo, metadata: Any, index: int) -> str:
    if (
        not isinstance(metadata, dict)
        or not isinstance(metadata.get("name"), str)
        or not metadata["name"]
    ):
        return f"document {index}"
    namespace = metadata.get("namespace")
    if not info.namespaced:
        namespace = ""
    elif not isinstance(namespace, str) or not namespace:
        namespace = "default"
    return subject_of(info.store_kind, namespace, metadata["name"])


def _kubernetes_extras(
    info: KindInfo, document: Mapping[str, Any], errors: list[FieldError]
) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if info.kuma:
        extras["form"] = "kubernetes"
    if "mesh" in info.top_level:
        given = {"mesh": document["mesh"]} if "mesh" in document else {}
        reference = _validate(_MeshReference, given, (), errors)
        extras["mesh"] = reference.mesh if reference else "default"
    return extras


def _namespace(info: KindInfo, meta: ObjectMeta | None, errors: list[FieldError]) -> str:
    written = meta.namespace if meta else None
    if info.namespaced:
        return written or "default"
    if written:
        errors.append(
            FieldError(
                "metadata.namespace",
                f"{info.store_kind} is cluster-scoped: metadata.namespace must not be set",
            )
        )
    return ""


# --- Kuma universal form -------------------------------------------------------------------


def _parse_universal(doc: Mapping[str, Any], index: int) -> Resource:
    info = find_universal(doc["type"]) if isinstance(doc["type"], str) else None
    if info is None:
        supported = ", ".join(UNIVERSAL_TYPES)
        reason = (
            f"unsupported type {describe(doc['type'])}; "
            f"supported (Kuma universal form): {supported}"
        )
        raise InvalidResource(f"document {index}", [FieldError("type", reason)])
    document = {k: v for k, v in doc.items() if k not in UNIVERSAL_STORE_FIELDS}
    name = document.get("name")
    subject = (
        subject_of(info.store_kind, "", name)
        if isinstance(name, str) and name
        else f"document {index}"
    )

    errors: list[FieldError] = []
    identity_fields = ("name", "labels", *info.top_level)
    identity = _validate(
        _UniversalIdentity, {k: document[k] for k in identity_fields if k in document}, (), errors
    )
    body = {k: v for k, v in document.items() if k not in ("type", *identity_fields)}
    spec = _validate(info.spec_model, body, (), errors)
    version = _resource_version(doc.get("resourceVersion"), "resourceVersion", errors)
    if errors or identity is None or spec is None:
        raise InvalidResource(subject, errors)
    extras: dict[str, Any] = {"form": "universal"}
    if "mesh" in info.top_level:
        extras["mesh"] = identity.mesh or "default"
    return info.resource.build(
        document,
        api_version=KUMA_API_VERSION,
        kind=info.store_kind,
        name=identity.name,
        labels=identity.labels,
        resource_version=version,
        spec=spec,
        **extras,
    )


# --- shared --------------------------------------------------------------------------------


def _validate(
    model: type[M], data: Any, prefix: tuple[str, ...], errors: list[FieldError]
) -> M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(translate(exc, prefix))
        return None


def _resource_version(value: Any, path: str, errors: list[FieldError]) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return value
    errors.append(
        FieldError(path, f'must be a string of digits such as "42" (got {describe(value)})')
    )
    return None
