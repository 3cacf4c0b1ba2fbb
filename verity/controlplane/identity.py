"""Dataplane tokens: each names exactly one workload identity (mesh, namespace, service account).

The token authenticates the agent to the CA service and Envoy to the ADS stream; whatever it
asks for, it only ever gets certificates and configuration for the identity it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from verity.controlplane import auth
from verity.pki import SpiffeId
from verity.store.base import Store, TokenRecord

DATAPLANE_PREFIX = "vrtd_"
DATAPLANE_KIND = "dataplane"


@dataclass(frozen=True)
class WorkloadIdentity:
    mesh: str
    namespace: str
    service_account: str

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.build(trust_domain, self.namespace, self.service_account)

    def scope(self) -> dict[str, str]:
        return {
            "mesh": self.mesh,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
        }


@dataclass(frozen=True)
class AuthenticatedDataplane:
    token_name: str
    identity: WorkloadIdentity


def identity_from_record(record: TokenRecord, now: datetime) -> WorkloadIdentity:
    auth.require_live(record, DATAPLANE_KIND, now, "not a dataplane token")
    scope = record.scope
    return WorkloadIdentity(
        mesh=str(scope["mesh"]),
        namespace=str(scope["namespace"]),
        service_account=str(scope["serviceAccount"]),
    )


def bearer_secret(metadata: object) -> str:
    """The token of an `authorization: Bearer ...` entry in gRPC invocation metadata."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key.lower() == "authorization":
            scheme, _, secret = str(value).partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return secret.strip()
    raise auth.Unauthenticated("missing dataplane token (authorization: Bearer <token>)")


async def authenticate_dataplane(
    store: Store, secret: str, now: datetime
) -> AuthenticatedDataplane:
    record = await store.find_token(auth.hash_secret(secret))
    if record is None:
        raise auth.Unauthenticated("unknown dataplane token")
    return AuthenticatedDataplane(record.name, identity_from_record(record, now))
