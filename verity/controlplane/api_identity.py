"""REST endpoints of identity: dataplane tokens, identity revocation, the mesh CA and rotation."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from verity.controlplane import auth
from verity.controlplane.agents import AgentRegistry, progress
from verity.controlplane.api_common import ApiError, Caller
from verity.controlplane.identity import DATAPLANE_KIND, DATAPLANE_PREFIX, WorkloadIdentity
from verity.controlplane.meshca import MeshCAs, MeshNotFound
from verity.pki import InvalidSpiffeId, PkiError, RotationError, RotationState, SpiffeId
from verity.resources import RevocationList, load_documents
from verity.store.base import ObjectKey, Store, TokenRecord, WriteAction, WriteOp

log = logging.getLogger("verity.api")
router = APIRouter(prefix="/api/v1")

DEFAULT_DATAPLANE_TOKEN_VALIDITY = timedelta(hours=720)
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class DataplaneTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    mesh: str = Field(default="default", pattern=_NAME_PATTERN)
    namespace: str = Field(pattern=_NAME_PATTERN, max_length=63)
    service_account: str = Field(alias="serviceAccount", pattern=_NAME_PATTERN, max_length=253)
    name: str | None = Field(default=None, pattern=_NAME_PATTERN, max_length=63)
    valid_for_seconds: int | None = Field(default=None, gt=0, alias="validForSeconds")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    spiffe_id: str = Field(alias="spiffeId")
    mesh: str = "default"
    reason: str = Field(default="", max_length=500)


def _services(request: Request) -> tuple[Store, MeshCAs, AgentRegistry]:
    state = request.app.state
    if state.cas is None:
        raise ApiError(503, "identity services are not running in this process")
    return state.store, state.cas, state.agents


async def _mesh_or_404(cas: MeshCAs, mesh: str) -> None:
    try:
        await cas.mesh(mesh)
    except MeshNotFound as exc:
        raise ApiError(404, str(exc)) from exc


@router.post("/tokens/dataplane", status_code=201)
async def create_dataplane_token(
    body: DataplaneTokenRequest, who: Caller, request: Request
) -> dict[str, Any]:
    """A token bound to one workload identity; it can only get that identity's certificate."""
    store, cas, _ = _services(request)
    auth.authorize(who, "apply", "Dataplane", body.namespace)
    await _mesh_or_404(cas, body.mesh)
    identity = WorkloadIdentity(body.mesh, body.namespace, body.service_account)
    now = datetime.now(UTC)
    secret = auth.new_secret(DATAPLANE_PREFIX)
    valid_for = (
        timedelta(seconds=body.valid_for_seconds)
        if body.valid_for_seconds
        else DEFAULT_DATAPLANE_TOKEN_VALIDITY
    )
    name = body.name or f"{body.namespace}-{body.service_account}-{secret[-6:].lower()}"
    record = TokenRecord(
        name=name,
        kind=DATAPLANE_KIND,
        secret_hash=auth.hash_secret(secret),
        scope=identity.scope(),
        created_at=now.isoformat(),
        expires_at=auth.expiry(now, valid_for),
    )
    await store.put_token(record)
    log.info("dataplane token created", extra={"token_name": name, "by": who.name})
    return {
        "name": name,
        "type": DATAPLANE_KIND,
        "scope": identity.scope(),
        "expiresAt": record.expires_at,
        "token": secret,
    }


def _revocation_document(mesh: str, entries: list[dict[str, str]]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "verity.dev/v1alpha1",
            "kind": "RevocationList",
            "metadata": {"name": mesh},
            "spec": {"identities": entries},
        }
    )


@router.post("/identities/revoke")
async def revoke_identity(body: RevokeRequest, who: Caller, request: Request) -> dict[str, Any]:
    """Stop issuance for an identity at once, deny it in traffic, and revoke its tokens."""
    store, cas, _ = _services(request)
    auth.authorize(who, "apply", "RevocationList", "")
    try:
        spiffe_id = SpiffeId.parse(body.spiffe_id)
        mesh = await cas.mesh(body.mesh)
    except InvalidSpiffeId as exc:
        raise ApiError(422, f"spiffeId: {exc}") from exc
    except MeshNotFound as exc:
        raise ApiError(404, str(exc)) from exc
    if spiffe_id.trust_domain != mesh.spec.trust_domain:
        raise ApiError(
            422,
            f"spiffeId: trust domain {spiffe_id.trust_domain!r} is not mesh "
            f"{body.mesh!r}'s ({mesh.spec.trust_domain!r})",
        )
    key = ObjectKey("RevocationList", "", body.mesh)
    current = await store.get(key)
    entries: list[dict[str, str]] = []
    if current is not None:
        entries = [dict(e) for e in current.document.get("spec", {}).get("identities", [])]
    if all(e["spiffeId"] != str(spiffe_id) for e in entries):
        entries.append(
            {
                "spiffeId": str(spiffe_id),
                "revokedAt": datetime.now(UTC).isoformat(),
                "reason": body.reason,
            }
        )
    (resource,) = load_documents(_revocation_document(body.mesh, entries))
    assert isinstance(resource, RevocationList)
    await store.write(
        [
            WriteOp(
                WriteAction.APPLY,
                key,
                api_version=resource.api_version,
                document=resource.to_document(),
                expected_version=current.resource_version if current else None,
            )
        ],
        actor=who.name,
    )
    revoked_tokens = await _revoke_tokens_of(store, body.mesh, spiffe_id)
    log.info("identity revoked", extra={"spiffe_id": str(spiffe_id), "by": who.name})
    return {"spiffeId": str(spiffe_id), "mesh": body.mesh, "revokedTokens": revoked_tokens}


async def _revoke_tokens_of(store: Store, mesh: str, spiffe_id: SpiffeId) -> list[str]:
    wanted = {
        "mesh": mesh,
        "namespace": spiffe_id.namespace,
        "serviceAccount": spiffe_id.service_account,
    }
    now = datetime.now(UTC).isoformat()
    revoked = []
    for token in await store.list_tokens():
        if token.kind == DATAPLANE_KIND and dict(token.scope) == wanted and not token.revoked_at:
            await store.revoke_token(token.name, now)
            revoked.append(token.name)
    return revoked


def _ca_view(mesh: str, state: RotationState, agents: AgentRegistry) -> dict[str, Any]:
    signing = state.signing_ca.root_fingerprint_sha256
    current = state.current.root_fingerprint_sha256
    roots = [
        {
            "subject": root.subject,
            "sha256": root.sha256,
            "notAfter": root.not_after.isoformat(),
            "role": "signing"
            if root.sha256 == signing
            else ("previous" if root.sha256 == current else "incoming"),
            "certificatePem": root.pem.decode(),
        }
        for root in state.bundle.roots
    ]
    step = progress(state, agents.of_mesh(mesh))
    return {
        "mesh": mesh,
        "trustDomain": state.current.trust_domain,
        "backend": state.current.kind.value,
        "stage": state.stage.value,
        "signingRootFingerprint": signing,
        "roots": roots,
        "progress": {"reached": step.reached, "total": step.total, "lagging": list(step.lagging)},
    }


@router.get("/meshes/{mesh}/ca")
async def show_ca(mesh: str, who: Caller, request: Request) -> dict[str, Any]:
    """The mesh's roots (certificates only, never a key), fingerprints, expiry, rotation stage."""
    _, cas, agents = _services(request)
    auth.authorize(who, "get", "Mesh", "")
    await _mesh_or_404(cas, mesh)
    try:
        state = await cas.state(mesh)
    except PkiError as exc:
        raise ApiError(409, str(exc)) from exc
    return _ca_view(mesh, state, agents)


@router.post("/meshes/{mesh}/ca/rotate")
async def rotate_ca(mesh: str, who: Caller, request: Request) -> dict[str, Any]:
    """Advance the root rotation one stage, if the current stage reached every proxy."""
    _, cas, agents = _services(request)
    auth.require_admin(who, "rotate a mesh CA")
    await _mesh_or_404(cas, mesh)
    state = await cas.state(mesh)
    step = progress(state, agents.of_mesh(mesh))
    try:
        new_state = await cas.rotate(mesh, reached_all_proxies=step.complete)
    except RotationError as exc:
        lagging = ", ".join(step.lagging[:10])
        raise ApiError(
            409, f"{exc} ({step.reached}/{step.total} proxies; waiting for: {lagging})"
        ) from exc
    except PkiError as exc:
        raise ApiError(409, str(exc)) from exc
    agents.notify_bundle_changed(mesh)
    log.info(
        "ca rotation advanced", extra={"mesh": mesh, "stage": new_state.stage.value, "by": who.name}
    )
    return _ca_view(mesh, new_state, agents)
