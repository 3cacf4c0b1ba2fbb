"""The resources each proxy should have, serialized once and ready to send.

The control plane computes a proxy's configuration and hands it in with `set_resources`;
the ADS streams of that proxy (node id) are woken for the types whose content changed.
Each resource is serialized once, when it is set, into the bytes of one entry of
`DiscoveryResponse.resources`. A response is then a concatenation of byte strings (protobuf
merges concatenated messages), so pushing one version to many streams costs no
re-serialization; only the nonce differs between them.

Versions are content hashes: the same resources always give the same version, so setting an
identical configuration again changes nothing and pushes nothing.

The cache belongs to one asyncio event loop: call it from that loop's thread only.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from verity.xds import typeurls

ChangeCallback = Callable[[frozenset[str]], None]

_VERSION_CHARS = 20
# Fields that carry a resource's name, by message type (a ClusterLoadAssignment names its
# cluster; every other served type has `name`).
_NAME_FIELDS = ("name", "cluster_name")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CachedResource:
    """One resource, serialized: `wire` is its encoded `DiscoveryResponse.resources` entry."""

    name: str
    digest: bytes
    wire: bytes


@dataclass(frozen=True, slots=True)
class TypeResources:
    """Every resource of one type for one proxy, with the content version of the set."""

    type_url: str
    version: str
    resources: Mapping[str, CachedResource]
    _all_wire: bytes = field(repr=False)
    _header: bytes = field(repr=False)

    def select(self, names: frozenset[str] | None) -> list[CachedResource]:
        """The resources a subscription gets: all of them (None: wildcard) or those named."""
        if names is None:
            return list(self.resources.values())
        return [self.resources[name] for name in sorted(names) if name in self.resources]

    def response(self, names: frozenset[str] | None, nonce: str) -> bytes:
        """A serialized DiscoveryResponse for a subscription, with the given nonce."""
        if names is None or names.issuperset(self.resources):
            body = self._all_wire
        else:
            body = b"".join(r.wire for r in self.select(names))
        return b"".join((self._header, body, _encode(nonce=nonce)))


def _encode(**fields: str) -> bytes:
    # Protobuf merges concatenated messages: each part is encoded on its own and joined.
    return bytes(discovery_pb2.DiscoveryResponse(**fields).SerializeToString())


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _resource_entry(type_url: str, value: bytes) -> bytes:
    """`DiscoveryResponse.resources` entry (field 2) holding Any{type_url (1), value (2)}.

    Encoded by hand: building an Any and a DiscoveryResponse per resource only to serialize
    them again costs twice as much, for every proxy on every change.
    """
    packed = _length_delimited(1, type_url.encode()) + _length_delimited(2, value)
    return _length_delimited(2, packed)


def _content_version(ordered: Iterable[CachedResource]) -> str:
    hasher = hashlib.sha256()
    for resource in ordered:
        name = resource.name.encode()
        hasher.update(len(name).to_bytes(4, "big") + name + resource.digest)
    return hasher.hexdigest()[:_VERSION_CHARS]


def _type_resources(type_url: str, resources: Mapping[str, CachedResource]) -> TypeResources:
    ordered = dict(sorted(resources.items()))
    version = _content_version(ordered.values())
    return TypeResources(
        type_url=type_url,
        version=version,
        resources=MappingProxyType(ordered),
        _all_wire=b"".join(r.wire for r in ordered.values()),
        _header=_encode(version_info=version, type_url=type_url),
    )


_shapes: dict[Any, tuple[str, str | None]] = {}


def _shape(message_type: Any) -> tuple[str, str | None]:
    """A message class's type URL and the field holding its resource name, if any."""
    shape = _shapes.get(message_type)
    if shape is None:
        descriptor = message_type.DESCRIPTOR
        fields = descriptor.fields_by_name
        name_field = next((f for f in _NAME_FIELDS if f in fields), None)
        shape = _shapes[message_type] = (typeurls.type_url_of(descriptor.full_name), name_field)
    return shape


def _check(type_url: str, name: str, message: Message) -> None:
    """Refuse a resource Envoy would file under another type or name (it would go missing)."""
    actual_type, name_field = _shape(type(message))
    if actual_type != type_url:
        raise ValueError(f"resource {name!r} is a {actual_type}, not a {type_url}")
    own_name = None if name_field is None else getattr(message, name_field)
    if own_name is not None and own_name != name:
        raise ValueError(f"resource {name!r} of {type_url} names itself {own_name!r}")


class SnapshotCache:
    """Per-proxy xDS resources by type URL, with change notification per proxy."""

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, TypeResources]] = {}
        self._watchers: dict[str, dict[object, ChangeCallback]] = {}
        self._empty: dict[str, TypeResources] = {}
        # Proxies often get identical resources (shared clusters, the same trust bundle):
        # keep one copy of each serialized resource while anything uses it.
        self._interned: weakref.WeakValueDictionary[tuple[str, str, bytes], CachedResource] = (
            weakref.WeakValueDictionary()
        )

    def set_resources(
        self,
        node_id: str,
        resources: Mapping[str, Mapping[str, Message]],
        *,
        partial: bool = False,
    ) -> frozenset[str]:
        """Set a proxy's resources; returns the type URLs whose content changed.

        `resources` maps type URL -> resource name -> message. By default it is the proxy's
        whole configuration: a type left out has no resources. With `partial=True` only the
        given types are replaced and the others are kept. Every resource is checked before
        anything changes (ValueError if a message's type or own name does not match). Only
        this proxy's streams are woken, and only for the changed types.
        """
        built = {t: self._build(t, messages) for t, messages in resources.items()}
        previous = self._nodes.get(node_id)
        current = dict(previous) if previous is not None and partial else {}
        current.update(built)
        changed = self._changed(previous, current)
        self._nodes[node_id] = current
        if changed:
            self._notify(node_id, changed)
        return changed

    def _changed(
        self, previous: Mapping[str, TypeResources] | None, current: Mapping[str, TypeResources]
    ) -> frozenset[str]:
        if previous is None:
            # A proxy seen for the first time: every type went from unknown to known.
            return frozenset(current) | frozenset(typeurls.PUSH_ORDER)
        type_urls = set(previous) | set(current)
        return frozenset(
            t for t in type_urls if self._version(previous, t) != self._version(current, t)
        )

    def _version(self, node: Mapping[str, TypeResources], type_url: str) -> str:
        found = node.get(type_url)
        return (found or self._empty_of(type_url)).version

    def _build(self, type_url: str, messages: Mapping[str, Message]) -> TypeResources:
        cached = {name: self._serialize(type_url, name, msg) for name, msg in messages.items()}
        return _type_resources(type_url, cached)

    def _serialize(self, type_url: str, name: str, message: Message) -> CachedResource:
        _check(type_url, name, message)
        wire = _resource_entry(type_url, message.SerializeToString(deterministic=True))
        digest = hashlib.sha256(wire).digest()
        key = (type_url, name, digest)
        interned = self._interned.get(key)
        if interned is None:
            interned = CachedResource(name=name, digest=digest, wire=wire)
            self._interned[key] = interned
        return interned

    def _empty_of(self, type_url: str) -> TypeResources:
        empty = self._empty.get(type_url)
        if empty is None:
            empty = self._empty[type_url] = _type_resources(type_url, {})
        return empty

    def get(self, node_id: str, type_url: str) -> TypeResources | None:
        """A proxy's resources of one type (empty if none were set); None for an unknown proxy."""
        node = self._nodes.get(node_id)
        if node is None:
            return None
        return node.get(type_url) or self._empty_of(type_url)

    def version(self, node_id: str, type_url: str) -> str | None:
        """The content version a proxy should have for a type; None for an unknown proxy."""
        found = self.get(node_id, type_url)
        return None if found is None else found.version

    def versions(self, node_id: str) -> Mapping[str, str]:
        """The content version of every type set for a proxy (empty for an unknown proxy)."""
        return {t: r.version for t, r in self._nodes.get(node_id, {}).items()}

    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def remove(self, node_id: str) -> bool:
        """Forget a proxy's resources. Its open streams stay open and get nothing new."""
        return self._nodes.pop(node_id, None) is not None

    def watch(self, node_id: str, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback(changed_type_urls)` on each change for this proxy; returns unwatch."""
        token = object()
        self._watchers.setdefault(node_id, {})[token] = callback

        def unwatch() -> None:
            watchers = self._watchers.get(node_id)
            if watchers is not None:
                watchers.pop(token, None)
                if not watchers:
                    del self._watchers[node_id]

        return unwatch

    def _notify(self, node_id: str, changed: frozenset[str]) -> None:
        for callback in tuple(self._watchers.get(node_id, {}).values()):
            callback(changed)
