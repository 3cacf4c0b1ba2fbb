"""Tables and summaries for the terminal (rich), kept apart from the commands."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

# A pipe or a log file has no width; rich would assume 80 columns and cut names short.
_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def print_table(table: Table) -> None:
    _console.print(table)


def age(timestamp: str | None, now: datetime | None = None) -> str:
    if not timestamp:
        return "-"
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _metadata(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = doc.get("metadata")
    return meta if isinstance(meta, Mapping) else doc  # Kuma universal form is flat


def summary(doc: Mapping[str, Any]) -> str:
    """One short phrase that tells objects of a kind apart in a table."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else doc
    assert isinstance(spec, Mapping)
    kind = doc.get("kind") or doc.get("type")
    if kind == "Dataplane":
        return f"service={spec.get('service', '-')}"
    if kind == "AuthorizationPolicy":
        return f"action={spec.get('action', 'ALLOW')} rules={len(spec.get('rules') or [])}"
    if kind == "PeerAuthentication":
        return f"mode={(spec.get('mtls') or {}).get('mode', 'UNSET')}"
    if kind == "TrafficPermission":
        sources, destinations = spec.get("sources") or [], spec.get("destinations") or []
        return f"sources={len(sources)} destinations={len(destinations)}"
    return ""


def object_table(items: list[dict[str, Any]], show_namespace: bool) -> Table:
    table = Table(box=None, header_style="bold")
    if show_namespace:
        table.add_column("NAMESPACE")
    for column in ("NAME", "KIND", "API VERSION", "VERSION", "AGE", "SUMMARY"):
        table.add_column(column)
    for doc in items:
        meta = _metadata(doc)
        row = [
            str(meta.get("name", "")),
            str(doc.get("kind") or doc.get("type", "")),
            str(doc.get("apiVersion", "kuma (universal)")),
            str(meta.get("resourceVersion", "-")),
            age(meta.get("creationTimestamp") or meta.get("creationTime")),
            summary(doc),
        ]
        table.add_row(*([str(meta.get("namespace", "")) or "-"] if show_namespace else []), *row)
    return table


def token_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "TYPE", "SCOPE", "EXPIRES", "STATUS"):
        table.add_column(column)
    for token in items:
        scope = token.get("scope") or {}
        text = (
            "admin"
            if scope.get("admin")
            else ", ".join(
                f"{key}={','.join(map(str, value))}"
                if isinstance(value, list)
                else f"{key}={value}"
                for key, value in scope.items()
                if key != "admin"
            )
        )
        status = "revoked" if token.get("revokedAt") else "active"
        table.add_row(token["name"], token["type"], text, token.get("expiresAt") or "never", status)
    return table


def audit_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "SEQ",
        "AT",
        "TOKEN",
        "ACTION",
        "KIND",
        "NAMESPACE",
        "NAME",
        "VERSION",
        "DIGEST",
    ):
        table.add_column(column)
    for entry in items:
        versions = f"{entry.get('old_version') or '-'} -> {entry.get('new_version') or '-'}"
        table.add_row(
            str(entry["seq"]),
            entry["at"],
            entry["actor"],
            entry["action"],
            entry["kind"],
            entry["namespace"] or "-",
            entry["name"],
            versions,
            str(entry["spec_digest"])[:12],
        )
    return table


def write_results(results: list[dict[str, Any]], dry_run: bool) -> list[str]:
    suffix = " (dry run)" if dry_run else ""
    lines = []
    for result in results:
        where = f"{result['namespace']}/" if result.get("namespace") else ""
        lines.append(f"{result['kind']} {where}{result['name']} {result['outcome']}{suffix}")
    return lines


def ca_summary(view: dict[str, Any]) -> list[str]:
    progress = view["progress"]
    return [
        f"mesh {view['mesh']}: trust domain {view['trustDomain']}, {view['backend']} CA",
        f"rotation stage: {view['stage']} "
        f"({progress['reached']}/{progress['total']} connected proxies have applied it)",
        f"signing root: {view['signingRootFingerprint']}",
    ]


def roots_table(roots: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("ROLE", "SUBJECT", "SHA-256", "NOT AFTER"):
        table.add_column(column)
    for root in roots:
        table.add_row(root["role"], root["subject"], root["sha256"], root["notAfter"])
    return table


def progress_line(view: dict[str, Any], reached_stage: bool = False) -> str:
    progress = view["progress"]
    if reached_stage:
        return f"stage {view['stage']}: started"
    waiting = ", ".join(progress["lagging"][:5])
    return f"stage {view['stage']}: {progress['reached']}/{progress['total']} proxies applied" + (
        f"; waiting for {waiting}" if waiting else ""
    )


def dataplane_table(
    items: list[dict[str, Any]], status: dict[str, str], show_namespace: bool
) -> Table:
    table = Table(box=None, header_style="bold")
    columns = ["NAME", "MESH", "SERVICE", "SERVICE ACCOUNT", "ADDRESS", "STATUS", "AGE"]
    for column in (["NAMESPACE"] if show_namespace else []) + columns:
        table.add_column(column)
    for doc in items:
        meta, spec = doc["metadata"], doc["spec"]
        key = f"{meta.get('namespace', 'default')}/{meta['name']}"
        row = [
            meta["name"],
            spec.get("mesh", "default"),
            spec["service"],
            spec.get("serviceAccount", "default"),
            spec["address"],
            status.get(key, "offline"),
            age(meta.get("creationTimestamp")),
        ]
        table.add_row(*([meta.get("namespace", "default")] if show_namespace else []), *row)
    return table


def inspect_lines(view: dict[str, Any]) -> list[str]:
    xds = view["xds"]
    lines = [
        f"dataplane {view['dataplane']} (service {view['service']}, mesh {view['mesh']})",
        f"identity: {view['spiffeId']}" + ("  [REVOKED]" if view["revoked"] else ""),
        "connected: " + (f"yes, since {xds.get('connectedSince')}" if xds["connected"] else "no"),
    ]
    cert = view.get("certificate")
    if cert:
        lines.append(f"certificate: serial {cert['serial']}, expires {cert['notAfter']}")
    else:
        lines.append("certificate: no report from the agent")
    lines.append("xDS:")
    for name, t in xds["types"].items():
        line = f"  {name}: sent {t['sent']}, acked {t['acked']}"
        if t["nack"]:
            line += f", NACKED {t['nack']['version']}: {t['nack']['error']}"
        lines.append(line)
    lines.append("inbound mTLS:")
    for port in view["inbound"]:
        lines.append(
            f"  port {port['port']} (app {port['appPort']}): {port['mode']}, "
            f"because of {port['because']}"
        )
    return lines


def check_lines(view: dict[str, Any], explain: bool) -> list[str]:
    lines = [
        f"{view['verdict']} ({view['status']}) for {view['workload']}",
        f"decided by: {view['decidedBy']}",
    ]
    if view.get("envoyPolicyId"):
        lines.append(f"the sidecar's deny log names it: {view['envoyPolicyId']}")
    for policy in view["policies"]:
        if policy["matchedRule"] is not None:
            continue
        reasons = "; ".join(r["reason"] for r in policy["rules"])
        lines.append(
            f"  {policy['policy']} ({policy['action']}) did not match: "
            f"{reasons or 'it has no rules'}"
        )
    if view.get("audited"):
        lines.append("audited by: " + ", ".join(view["audited"]))
    if view.get("dryRunVerdict"):
        lines.append(f"dry-run policies would have decided: {view['dryRunVerdict']}")
    if explain:
        lines.append("evaluation:")
        lines.extend(f"  {i + 1}. {step}" for i, step in enumerate(view["steps"]))
    return lines
