"""`verity check`: the reference evaluator's answer for one request, with the reasons.

It evaluates the same stored policies translate() turns into Envoy RBAC, with the same pure
semantics (verity.policy), so the answer is the one the receiving sidecar gives.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from verity.controlplane import auth
from verity.controlplane.api_common import ApiError, Caller
from verity.controlplane.xdscontrol import XdsController
from verity.policy import Decision, PolicyResult, Token, evaluate
from verity.policy import Request as PolicyRequest
from verity.policy.request import RequestProtocol
from verity.resources import Dataplane

router = APIRouter(prefix="/api/v1")


class CheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    source: str | None = Field(default=None, alias="from")  # SPIFFE ID; None = plaintext
    to: str = Field(min_length=1)  # the destination service
    namespace: str = "default"
    port: int | None = Field(default=None, ge=1, le=65535)
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    source_ip: str = Field(default="127.0.0.1", alias="sourceIp")
    jwt_claims: dict[str, Any] | None = Field(default=None, alias="jwtClaims")


def _destination(
    xds: XdsController, body: CheckRequest
) -> tuple[Dataplane, RequestProtocol, int | None]:
    """The first Dataplane of the service (by name), the port's protocol, and the port."""
    candidates = sorted(
        (
            d
            for d in xds.index.of_kind("Dataplane")
            if isinstance(d, Dataplane)
            and d.namespace == body.namespace
            and d.spec.service == body.to
        ),
        key=lambda d: d.name,
    )
    if not candidates:
        raise ApiError(
            404, f"to: no Dataplane of service {body.to!r} in namespace {body.namespace!r}"
        )
    workload = candidates[0]
    ports = {i.port: i for i in workload.spec.inbound}
    port = body.port if body.port is not None else next(iter(sorted(ports)), None)
    if port is not None and port not in ports:
        raise ApiError(422, f"port: {body.to} serves ports {sorted(ports)}, not {port}")
    protocol: RequestProtocol = (
        "tcp" if port is not None and ports[port].protocol == "tcp" else "http"
    )
    return workload, protocol, port


def _policy_view(result: PolicyResult) -> dict[str, Any]:
    return {
        "policy": result.policy.describe(),
        "action": result.action,
        "dryRun": result.dry_run,
        "matchedRule": result.matched_rule,
        "rules": [
            {"index": r.index, "matched": r.matched, "reason": r.reason} for r in result.rules
        ],
    }


def decision_view(decision: Decision, workload: Dataplane) -> dict[str, Any]:
    return {
        "workload": f"{workload.namespace}/{workload.name}",
        "verdict": decision.verdict,
        "status": decision.status,
        "decidedBy": decision.decided_by,
        "envoyPolicyId": decision.envoy_policy_id,
        "provider": decision.provider,
        "policies": [_policy_view(p) for p in decision.policies],
        "audited": [p.policy.describe() for p in decision.audited_by],
        "dryRunVerdict": decision.dry_run_verdict,
        "steps": list(decision.steps),
    }


@router.post("/check")
async def check(body: CheckRequest, who: Caller, request: Request) -> dict[str, Any]:
    auth.authorize(who, "get", "AuthorizationPolicy", body.namespace)
    xds: XdsController | None = request.app.state.xds
    if xds is None:
        raise ApiError(503, "the policy index is not running in this process")
    workload, protocol, port = _destination(xds, body)
    snapshot = xds.index.snapshot(workload.spec.mesh, frozenset())
    if snapshot is None:
        raise ApiError(404, f"mesh {workload.spec.mesh!r} does not exist")
    policies = snapshot.authorization(workload)
    token = Token(body.jwt_claims) if body.jwt_claims is not None else None
    probe = PolicyRequest(
        source_principal=body.source,
        source_ip=body.source_ip,
        token=token,
        host=body.host,
        method=body.method,
        path=body.path,
        headers=body.headers,
        destination_port=port,
        protocol=protocol,
    )
    return decision_view(evaluate(policies, probe), workload)
