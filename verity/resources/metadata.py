"""Object metadata and the Kubernetes naming rules: names, namespaces, labels, annotations."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from verity.resources.common import Model
from verity.resources.errors import Problems, describe

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ANNOTATIONS_MAX_BYTES = 256 * 1024

# Fields the store owns: accepted on input (so `get -o yaml` output re-applies) and dropped.
STORE_OWNED_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "updateTimestamp",
)


def dns_subdomain_reason(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (a Kubernetes object name), or None."""
    if not value:
        return "must not be empty"
    if len(value) > 253:
        return f"must be at most 253 characters (got {len(value)})"
    if not _DNS_SUBDOMAIN.fullmatch(value):
        return (
            "must be a DNS-1123 name: lowercase letters, digits, '-' and '.', starting and "
            f"ending with a letter or digit (got {describe(value)})"
        )
    return None


def dns_label_reason(value: str) -> str | None:
    """Why `value` is not a DNS-1123 label (a namespace or service name), or None."""
    if not value:
        return "must not be empty"
    if len(value) > 63:
        return f"must be at most 63 characters (got {len(value)})"
    if not _DNS_LABEL.fullmatch(value):
        return (
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and "
            f"ending with a letter or digit (got {describe(value)})"
        )
    return None


def _raise_if(reason: str | None) -> None:
    if reason:
        raise ValueError(reason)


def check_name(value: str) -> str:
    _raise_if(dns_subdomain_reason(value))
    return value


def check_dns_label(value: str) -> str:
    _raise_if(dns_label_reason(value))
    return value


def check_namespace(value: str) -> str:
    # "" means "not set", as in Kubernetes.
    if value:
        _raise_if(dns_label_reason(value))
    return value


Name = Annotated[str, AfterValidator(check_name)]
DnsLabel = Annotated[str, AfterValidator(check_dns_label)]
Namespace = Annotated[str, AfterValidator(check_namespace)]


def label_key_reason(key: str) -> str | None:
    """Kubernetes label/annotation key: `[prefix/]name`, prefix a DNS subdomain."""
    prefix, slash, name = key.rpartition("/")
    if slash and dns_subdomain_reason(prefix):
        return f"key prefix must be a DNS-1123 subdomain (got {describe(key)})"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            "key name must be at most 63 characters of letters, digits, '-', '_' and '.', "
            f"starting and ending with a letter or digit (got {describe(key)})"
        )
    return None


def label_value_reason(value: str) -> str | None:
    if value == "":
        return None
    if len(value) > 63 or not _LABEL_NAME.fullmatch(value):
        return (
            "must be empty or at most 63 characters of letters, digits, '-', '_' and '.', "
            f"starting and ending with a letter or digit (got {describe(value)})"
        )
    return None


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    problems = Problems()
    for key, value in labels.items():
        key_reason = label_key_reason(key)
        if key_reason:
            problems.add((key,), key_reason)
        value_reason = label_value_reason(value)
        if value_reason:
            problems.add((key,), value_reason)
    problems.raise_if_any()
    return labels


def check_annotations(annotations: dict[str, str]) -> dict[str, str]:
    problems = Problems()
    for key in annotations:
        reason = label_key_reason(key)
        if reason:
            problems.add((key,), reason)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > _ANNOTATIONS_MAX_BYTES:
        problems.add((), f"must total at most 256 KiB (got {size} bytes)")
    problems.raise_if_any()
    return annotations


Labels = Annotated[dict[str, str], AfterValidator(check_labels)]
Annotations = Annotated[dict[str, str], AfterValidator(check_annotations)]


class ObjectMeta(Model):
    """`metadata` of a Kubernetes-form document (store-owned fields already removed)."""

    name: Name
    namespace: Namespace | None = None
    labels: Labels = {}
    annotations: Annotations = {}
