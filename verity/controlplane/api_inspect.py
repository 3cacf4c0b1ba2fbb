"""`verity inspect`: what the control plane knows about one proxy, and why it is configured so."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from verity.controlplane import auth
from verity.controlplane.agents import AgentRegistry
from verity.controlplane.api_common import ApiError, Caller
from verity.controlplane.xdscontrol import XdsController
from verity.xds.status import NodeStatus
from verity.xds.typeurls import short_name

router = APIRouter(prefix="/api/v1")


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _xds_view(status: NodeStatus | None) -> dict[str, Any]:
    if status is None:
        return {"connected": False, "types": {}}
    types = {}
    for type_url, t in sorted(status.types.items()):
        nack = t.last_nack
        types[short_name(type_url)] = {
            "sent": t.version_sent,
            "acked": t.version_acked,
            "ackedAt": _when(t.acked_at),
            "nack": None
            if nack is None
            else {"version": nack.version, "error": nack.error, "at": _when(nack.at)},
        }
    return {
        "connected": status.connected,
        "connectedSince": _when(status.connected_since),
        "disconnectedAt": _when(status.disconnected_at),
        "types": types,
    }


def _certificate_view(agents: AgentRegistry, key: str) -> dict[str, Any] | None:
    for agent in agents.all():
        if agent.dataplane == key and agent.reported:
            return {
                "spiffeId": agent.spiffe_id,
                "serial": agent.leaf_serial,
                "notAfter": datetime.fromtimestamp(agent.leaf_not_after, UTC).isoformat(),
                "rootFingerprint": agent.leaf_root,
                "trustedRoots": sorted(agent.applied_roots),
            }
    return None


def _xds(request: Request) -> tuple[XdsController, AgentRegistry]:
    xds, agents = request.app.state.xds, request.app.state.agents
    if xds is None or agents is None:
        raise ApiError(503, "the xDS server is not running in this process")
    return xds, agents


@router.get("/inspect/dataplanes/{namespace}/{name}")
async def inspect_dataplane(
    namespace: str, name: str, who: Caller, request: Request
) -> dict[str, Any]:
    auth.authorize(who, "get", "Dataplane", namespace)
    xds, agents = _xds(request)
    key = f"{namespace}/{name}"
    snapshot = xds.snapshot_for(key)
    dataplane = xds.index.dataplane(key)
    if snapshot is None or dataplane is None:
        raise ApiError(404, f"Dataplane {key} not found")
    mtls = snapshot.mtls(dataplane)
    return {
        "dataplane": key,
        "mesh": dataplane.spec.mesh,
        "service": dataplane.spec.service,
        "spiffeId": snapshot.spiffe_id(dataplane),
        "revoked": snapshot.is_revoked(dataplane),
        "xds": _xds_view(xds.status.snapshot(key)),
        "certificate": _certificate_view(agents, key),
        "inbound": [
            {"port": p.port, "appPort": p.app_port, "mode": p.mode, "because": p.source.describe()}
            for p in mtls.ports
        ],
    }


@router.get("/dataplane-status")
async def dataplane_status(
    who: Caller, request: Request, namespace: str | None = None
) -> dict[str, str]:
    """Whether each Dataplane's proxy is connected, for `verity get dataplanes`."""
    auth.authorize(who, "get", "Dataplane", namespace)
    xds, _ = _xds(request)
    connected = xds.ads.connected_nodes()
    keys = [
        f"{d.namespace}/{d.name}"
        for d in xds.index.of_kind("Dataplane")
        if namespace is None or d.namespace == namespace
    ]
    return {k: "online" if k in connected else "offline" for k in keys}
