"""Verity's resource model: every kind users apply, validated, in and out of YAML.

Imports nothing else of Verity (a layering contract checks it).
"""

from verity.resources.errors import FieldError, InvalidResource
from verity.resources.istio import (
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    PeerAuthentication,
    PeerAuthenticationSpec,
    RequestAuthentication,
    RequestAuthenticationSpec,
)
from verity.resources.kinds import SUPPORTED_KINDS, is_namespaced, kind_alias
from verity.resources.kuma import KumaMesh, KumaMeshSpec, TrafficPermission, TrafficPermissionSpec
from verity.resources.loader import load_documents, parse_document, with_store_metadata
from verity.resources.resource import Resource
from verity.resources.verity_kinds import (
    Dataplane,
    DataplaneSpec,
    Mesh,
    MeshSpec,
    RevocationList,
    RevocationListSpec,
    RevokedIdentity,
)

__all__ = [
    "SUPPORTED_KINDS",
    "AuthorizationPolicy",
    "AuthorizationPolicySpec",
    "Dataplane",
    "DataplaneSpec",
    "FieldError",
    "InvalidResource",
    "KumaMesh",
    "KumaMeshSpec",
    "Mesh",
    "MeshSpec",
    "PeerAuthentication",
    "PeerAuthenticationSpec",
    "RequestAuthentication",
    "RequestAuthenticationSpec",
    "Resource",
    "RevocationList",
    "RevocationListSpec",
    "RevokedIdentity",
    "TrafficPermission",
    "TrafficPermissionSpec",
    "is_namespaced",
    "kind_alias",
    "load_documents",
    "parse_document",
    "with_store_metadata",
]
