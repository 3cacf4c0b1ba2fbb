"""translate(): the shape of what each mTLS mode, protocol and snapshot fact produces."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import json_format

from tests.unit.xds.test_translate_marketplace import (
    MARKETPLACE_KEYS,
    REVOKED,
    as_json,
    snapshot,
    with_reports,
)
from verity.dataplane import sds
from verity.xds import tlsconfig, typeurls
from verity.xds.snapshot import MeshSnapshot
from verity.xds.translate import translate

INVOICES_ID = "spiffe://cluster.local/ns/shop/sa/invoices"
REPORTS_ID = "spiffe://cluster.local/ns/shop/sa/reports"
USERS_ID = "spiffe://cluster.local/ns/shop/sa/users"
USERS_CLUSTER = "outbound|8080|users.shop"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)


def out(mesh: MeshSnapshot, key: str) -> dict[str, dict[str, Any]]:
    """translate() as plain JSON dicts: short type -> name -> resource."""
    loaded: dict[str, dict[str, Any]] = json.loads(as_json(translate(mesh, key)))
    return loaded


def listener(mesh: MeshSnapshot, key: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = out(mesh, key)["lds"][name]
    return found


def filters(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """A chain's network filters, and the HTTP filters of its connection manager, in order."""
    found: list[dict[str, Any]] = []
    for network in chain["filters"]:
        found.append(network)
        found += network["typed_config"].get("http_filters", [])
    return found


def names(chain: dict[str, Any]) -> list[str]:
    return [f["name"] for f in filters(chain)]


def manager(chain: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        f["typed_config"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    assert len(found) == 1
    return found[0]


def rbac_policies(chain: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(action, policies) of each RBAC filter of the chain, in order."""
    return [
        (
            f["typed_config"]["rules"].get("action", "ALLOW"),
            f["typed_config"]["rules"].get("policies", {}),
        )
        for f in filters(chain)
        if f["name"].endswith(".rbac") and "rules" in f["typed_config"]
    ]


def peer_authentication(name: str, spec: str) -> str:
    return (
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    )


USERS_DISABLE = peer_authentication(
    "users", "{selector: {matchLabels: {app: users}}, mtls: {mode: DISABLE}}"
)


# --- the SDS names are the agent's ---------------------------------------------------------------


def test_sds_names_and_config_match_the_agent() -> None:
    assert tlsconfig.CERT_SECRET == sds.CERT_SECRET
    assert tlsconfig.BUNDLE_SECRET == sds.BUNDLE_SECRET
    assert tlsconfig.SDS_CLUSTER == sds.SDS_CLUSTER
    for name in (sds.CERT_SECRET, sds.BUNDLE_SECRET):
        ours = json_format.MessageToDict(
            tlsconfig.sds_secret_config(name), preserving_proto_field_name=True
        )
        assert ours == sds.sds_secret_config(name)


# --- output as a whole ---------------------------------------------------------------------------


def test_output_has_the_four_config_types_and_no_secrets() -> None:
    resources = translate(with_reports(), "shop/reports-1")
    assert set(resources) == {
        typeurls.CLUSTER,
        typeurls.ENDPOINT,
        typeurls.LISTENER,
        typeurls.ROUTE,
    }
    for named in resources.values():
        assert list(named) == sorted(named)


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_no_secret_material_anywhere(mode: str) -> None:
    for mesh, keys in (
        (snapshot(mode), MARKETPLACE_KEYS),
        (with_reports(mode), ("shop/reports-1",)),
    ):
        for key in keys:
            text = as_json(translate(mesh, key))
            for marker in ("PRIVATE KEY", "BEGIN CERTIFICATE", "inline_bytes", "inline_string"):
                assert marker not in text
            for field in (
                '"tls_certificates"',
                '"trusted_ca"',
                '"private_key"',
                '"validation_context"',
            ):
                assert field not in text
            assert typeurls.SECRET not in translate(mesh, key)


def test_unknown_dataplane_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="shop/nobody"):
        translate(snapshot(), "shop/nobody")


def test_dataplane_of_another_mesh_is_refused() -> None:
    base = snapshot()
    other = base.dataplanes[0].model_copy(
        update={"spec": base.dataplanes[0].spec.model_copy(update={"mesh": "other"})}
    )
    with pytest.raises(ValueError, match="belongs to mesh 'other'"):
        MeshSnapshot(base.mesh_name, base.mesh, (other,))
    with pytest.raises(ValueError, match="more than once"):
        MeshSnapshot(base.mesh_name, base.mesh, (base.dataplanes[0], base.dataplanes[0]))


# --- inbound: the three modes --------------------------------------------------------------------


def test_strict_is_mtls_only_with_a_required_client_certificate() -> None:
    inbound = listener(snapshot("STRICT"), "shop/users-1", "inbound:8080")
    assert inbound["address"]["socket_address"] == {"address": "10.0.0.11", "port_value": 8080}
    assert inbound["traffic_direction"] == "INBOUND"
    assert "listener_filters" not in inbound
    (chain,) = inbound["filter_chains"]
    assert "filter_chain_match" not in chain
    context = chain["transport_socket"]["typed_config"]
    assert context["@type"] == DOWNSTREAM_TLS
    assert context["require_client_certificate"] is True
    common = context["common_tls_context"]
    assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == ["verity-svid"]
    assert common["validation_context_sds_secret_config"]["name"] == "verity-trust-bundle"
    # Identity is RBAC's job: no SAN matcher on the server side.
    assert "match_typed_subject_alt_names" not in json.dumps(context)
    assert common["alpn_protocols"] == ["h2", "http/1.1"]


def test_permissive_accepts_mtls_and_plaintext_on_one_port() -> None:
    inbound = listener(snapshot("PERMISSIVE"), "shop/users-1", "inbound:8080")
    assert [f["name"] for f in inbound["listener_filters"]] == [
        "envoy.filters.listener.tls_inspector"
    ]
    tls, plain = inbound["filter_chains"]
    assert tls["filter_chain_match"] == {"transport_protocol": "tls"}
    assert tls["transport_socket"]["typed_config"]["require_client_certificate"] is True
    assert plain["filter_chain_match"] == {"transport_protocol": "raw_buffer"}
    assert "transport_socket" not in plain
    # Plaintext gets the same policies (which never match a peer without identity by
    # principal), but no revoked-identity filter: there is no identity to revoke.
    assert [list(p) for _, p in rbac_policies(plain)] == [
        ["ns[shop]-policy[no-admin-from-outside]-rule[0]"],
        ["ns[shop]-policy[users]-rule[0]"],
    ]
    assert list(rbac_policies(tls)[0][1]) == ["verity-deny-revoked"]


def test_disable_is_plaintext_only() -> None:
    inbound = listener(snapshot("DISABLE"), "shop/users-1", "inbound:8080")
    (chain,) = inbound["filter_chains"]
    assert "transport_socket" not in chain and "listener_filters" not in inbound
    assert [action for action, _ in rbac_policies(chain)] == ["DENY", "ALLOW"]


def test_port_level_modes_shape_each_port() -> None:
    lds = out(with_reports("STRICT"), "shop/reports-1")["lds"]
    assert len(lds["inbound:5432"]["filter_chains"]) == 2  # PERMISSIVE by port level
    assert "transport_socket" not in lds["inbound:8080"]["filter_chains"][0]  # DISABLE
    (grpc,) = lds["inbound:9090"]["filter_chains"]  # STRICT: the mesh default
    assert "transport_socket" in grpc


# --- inbound: HTTP and TCP ------------------------------------------------------------------


def test_http_port_forwards_only_the_peer_uri_and_never_the_clients_xfcc() -> None:
    (chain,) = listener(snapshot(), "shop/users-1", "inbound:8080")["filter_chains"]
    hcm = manager(chain)
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    assert hcm["use_remote_address"] is True
    assert hcm["stat_prefix"] == "inbound_8080"
    assert hcm["rds"]["route_config_name"] == "inbound|8080"
    assert names(chain)[-3:] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]


def test_inbound_route_and_cluster_reach_the_app_on_loopback() -> None:
    resources = out(snapshot(), "shop/users-1")
    route = resources["rds"]["inbound|8080"]
    assert route["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == "inbound|8080"
    cluster = resources["cds"]["inbound|8080"]
    assert cluster["type"] == "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 3001}
    assert "typed_extension_protocol_options" not in cluster  # HTTP/1.1 app


def test_grpc_port_speaks_http2_to_the_app() -> None:
    resources = out(with_reports(), "shop/reports-1")
    options = resources["cds"]["inbound|9090"]["typed_extension_protocol_options"]
    (config,) = options.values()
    assert "http2_protocol_options" in config["explicit_http_config"]
    endpoint = resources["cds"]["inbound|9090"]["load_assignment"]["endpoints"][0]
    assert (
        endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 3090
    )


def test_tcp_port_uses_network_rbac_before_tcp_proxy() -> None:
    tls, plain = listener(with_reports(), "shop/reports-1", "inbound:5432")["filter_chains"]
    assert names(tls) == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.rbac",
        "envoy.filters.network.rbac",
        "envoy.filters.network.tcp_proxy",
    ]
    assert [f["typed_config"]["stat_prefix"] for f in tls["filters"][:3]] == [
        "inbound_5432.revoked.",
        "inbound_5432.deny.",
        "inbound_5432.allow.",
    ]
    assert names(plain) == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.rbac",
        "envoy.filters.network.tcp_proxy",
    ]
    assert tls["filters"][-1]["typed_config"]["cluster"] == "inbound|5432"
    # On TCP the ALLOW rule with `methods` matches nothing; the port rule remains.
    ((_, allow),) = [(a, p) for a, p in rbac_policies(tls) if a == "ALLOW"]
    assert list(allow) == ["ns[shop]-policy[reports]-rule[0]"]


# --- inbound authorization ------------------------------------------------------------------


def test_policies_allow_and_revoked_identities_are_denied_first() -> None:
    (chain,) = listener(snapshot(), "shop/users-1", "inbound:8080")["filter_chains"]
    (revoked_action, revoked), (deny_action, _), (allow_action, allow) = rbac_policies(chain)
    assert (revoked_action, deny_action, allow_action) == ("DENY", "DENY", "ALLOW")
    assert revoked["verity-deny-revoked"]["principals"] == [
        {"authenticated": {"principal_name": {"exact": REVOKED}}}
    ]
    (principal,) = allow["ns[shop]-policy[users]-rule[0]"]["principals"]
    assert principal["or_ids"]["ids"] == [
        {"authenticated": {"principal_name": {"exact": INVOICES_ID}}},
        {"authenticated": {"principal_name": {"exact": REPORTS_ID}}},
    ]


def test_no_revoked_filter_without_revocations() -> None:
    (chain,) = listener(snapshot(revoked=()), "shop/users-1", "inbound:8080")["filter_chains"]
    assert [action for action, _ in rbac_policies(chain)] == ["DENY", "ALLOW"]


def test_without_policies_the_default_action_decides() -> None:
    base = snapshot(revoked=())
    bare = MeshSnapshot(base.mesh_name, base.mesh, base.dataplanes, ready=base.ready)
    (chain,) = listener(bare, "shop/users-1", "inbound:8080")["filter_chains"]
    assert rbac_policies(chain) == [("ALLOW", {})]  # Verity's default: deny
    mesh = base.mesh.model_copy(
        update={
            "authorization": base.mesh.authorization.model_copy(update={"default_action": "ALLOW"})
        }
    )
    allowing = MeshSnapshot(base.mesh_name, mesh, base.dataplanes, ready=base.ready)
    (chain,) = listener(allowing, "shop/users-1", "inbound:8080")["filter_chains"]
    assert rbac_policies(chain) == []


def test_principals_cover_the_trust_domain_aliases() -> None:
    base = snapshot(revoked=())
    mesh = base.mesh.model_copy(update={"trust_domain_aliases": ["old.example"]})
    aliased = MeshSnapshot(
        base.mesh_name,
        mesh,
        base.dataplanes,
        ready=base.ready,
        authorization_policies=base.authorization_policies,
    )
    (chain,) = listener(aliased, "shop/invoices-1", "inbound:8080")["filter_chains"]
    (_, allow) = rbac_policies(chain)[-1]
    (principal,) = allow["ns[shop]-policy[invoices]-rule[0]"]["principals"]
    names = [p["authenticated"]["principal_name"]["exact"] for p in principal["or_ids"]["ids"]]
    assert names == [USERS_ID, "spiffe://old.example/ns/shop/sa/users"]


# --- TLS parameters from the Mesh ----------------------------------------------------------------


def tls_params_of(mesh: MeshSnapshot) -> tuple[dict[str, Any], dict[str, Any]]:
    resources = out(mesh, "shop/invoices-1")
    server = resources["lds"]["inbound:8080"]["filter_chains"][0]["transport_socket"]
    client = resources["cds"][USERS_CLUSTER]["transport_socket"]
    return (
        server["typed_config"]["common_tls_context"]["tls_params"],
        client["typed_config"]["common_tls_context"]["tls_params"],
    )


def test_default_tls_parameters_are_modern_and_explicit_on_both_sides() -> None:
    for params in tls_params_of(snapshot()):
        assert params["tls_minimum_protocol_version"] == "TLSv1_2"
        assert params["tls_maximum_protocol_version"] == "TLSv1_3"
        assert params["cipher_suites"] and all(
            s.startswith("ECDHE-") for s in params["cipher_suites"]
        )


def test_mesh_tls_settings_are_used() -> None:
    base = snapshot()
    only13 = base.mesh.model_copy(
        update={"tls": base.mesh.tls.model_copy(update={"min_version": "TLSv1_3"})}
    )
    for params in tls_params_of(MeshSnapshot(base.mesh_name, only13, base.dataplanes)):
        assert params["tls_minimum_protocol_version"] == "TLSv1_3"
        assert "cipher_suites" not in params
    suites = ["ECDHE-ECDSA-AES256-GCM-SHA384"]
    custom = base.mesh.model_copy(
        update={"tls": base.mesh.tls.model_copy(update={"cipher_suites": suites})}
    )
    for params in tls_params_of(MeshSnapshot(base.mesh_name, custom, base.dataplanes)):
        assert params["cipher_suites"] == suites


# --- outbound ------------------------------------------------------------------------------------


def client_tls(mesh: MeshSnapshot, key: str, cluster: str) -> dict[str, Any] | None:
    socket = out(mesh, key)["cds"][cluster].get("transport_socket")
    return None if socket is None else socket["typed_config"]


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_client_uses_mtls_when_the_server_accepts_it(mode: str) -> None:
    context = client_tls(snapshot(mode), "shop/invoices-1", USERS_CLUSTER)
    assert context is not None
    assert context["sni"] == "outbound_.8080_.users.shop"
    common = context["common_tls_context"]
    assert common["tls_params"]["tls_maximum_protocol_version"] == "TLSv1_3"
    assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == ["verity-svid"]
    validation = common["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "verity-trust-bundle"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": USERS_ID}}
    ]


def test_client_uses_plaintext_when_the_server_disables_mtls() -> None:
    assert client_tls(snapshot("DISABLE"), "shop/invoices-1", USERS_CLUSTER) is None
    # A workload-level DISABLE on users, in a STRICT mesh: only users is called in plaintext.
    mesh = snapshot("STRICT", extra=USERS_DISABLE)
    assert client_tls(mesh, "shop/invoices-1", USERS_CLUSTER) is None
    assert client_tls(mesh, "shop/invoices-1", "outbound|8080|items.shop") is not None


def test_mixed_server_modes_get_mtls() -> None:
    # users-1 has DISABLE, users-2 (another label) the mesh's STRICT.
    extra = USERS_DISABLE + "---\n" + _users_2(labels="{app: users, canary: 'true'}")
    policy = peer_authentication(
        "canary", "{selector: {matchLabels: {canary: 'true'}}, mtls: {mode: STRICT}}"
    )
    mesh = snapshot("DISABLE", extra=extra + "---\n" + policy)
    modes = {
        dp.name: mesh.mtls(dp).port_mode(8080).mode for dp in mesh.serving("users", "shop", 8080)
    }
    assert modes == {"users-1": "DISABLE", "users-2": "STRICT"}
    assert client_tls(mesh, "shop/invoices-1", USERS_CLUSTER) is not None


def _users_2(
    labels: str = "{app: users}", protocol: str = "http", address: str = "10.0.0.21"
) -> str:
    return (
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
        "metadata: {name: users-2, namespace: shop}\n"
        f"spec: {{service: users, serviceAccount: users, labels: {labels}, address: {address},"
        f" inbound: [{{port: 8080, appPort: 3001, protocol: {protocol}}}]}}\n"
    )


def test_endpoints_are_the_ready_instances_only() -> None:
    keys = {*MARKETPLACE_KEYS, "shop/users-2"}
    mesh = snapshot(extra=_users_2(), ready=keys - {"shop/users-1"})
    assignment = out(mesh, "shop/invoices-1")["eds"][USERS_CLUSTER]
    addresses = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for e in assignment["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == ["10.0.0.21"]
    nothing_ready = snapshot(ready=())
    assert out(nothing_ready, "shop/invoices-1")["eds"][USERS_CLUSTER] == {
        "cluster_name": USERS_CLUSTER
    }


def test_a_revoked_server_is_neither_endpoint_nor_accepted_identity() -> None:
    mesh = snapshot(revoked=(USERS_ID,))
    assert out(mesh, "shop/invoices-1")["eds"][USERS_CLUSTER] == {"cluster_name": USERS_CLUSTER}
    context = client_tls(mesh, "shop/invoices-1", USERS_CLUSTER)
    assert context is not None
    sans = context["common_tls_context"]["combined_validation_context"]
    matchers = sans["default_validation_context"]["match_typed_subject_alt_names"]
    # Never an empty list: that would accept any SAN.
    assert matchers == [{"san_type": "URI", "matcher": {"exact": tlsconfig.NO_IDENTITY}}]


def test_unknown_destination_fails_closed() -> None:
    text = "---\n".join(
        (
            "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
            "metadata: {name: caller-1, namespace: shop}\n"
            "spec: {service: caller, address: 10.0.0.40,"
            " outbound: [{service: ghost, port: 7000, localPort: 17000}]}\n",
        )
    )
    resources = out(snapshot(extra=text), "shop/caller-1")
    cluster = resources["cds"]["outbound|7000|ghost.shop"]
    assert "transport_socket" in cluster  # mTLS without knowing the server
    (chain,) = resources["lds"]["outbound:17000"]["filter_chains"]
    assert names(chain) == ["envoy.filters.network.tcp_proxy"]  # protocol unknown: tcp


def test_outbound_listener_and_cluster_shape() -> None:
    resources = out(snapshot(), "shop/invoices-1")
    outbound = resources["lds"]["outbound:10001"]
    assert outbound["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10001}
    assert outbound["traffic_direction"] == "OUTBOUND"
    (chain,) = outbound["filter_chains"]
    assert names(chain) == [
        "envoy.filters.network.http_connection_manager",
        "envoy.filters.http.router",
    ]
    assert manager(chain)["rds"]["route_config_name"] == USERS_CLUSTER
    cluster = resources["cds"][USERS_CLUSTER]
    assert cluster["type"] == "EDS" and cluster["eds_cluster_config"]["eds_config"]["ads"] == {}
    route = resources["rds"][USERS_CLUSTER]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["cluster"] == USERS_CLUSTER


def test_protocol_disagreement_falls_back_to_tcp() -> None:
    mesh = snapshot(extra=_users_2(protocol="tcp"))
    (chain,) = out(mesh, "shop/invoices-1")["lds"]["outbound:10001"]["filter_chains"]
    assert names(chain) == ["envoy.filters.network.tcp_proxy"]


def test_host_name_addresses() -> None:
    mesh = snapshot(extra=_users_2(address="users-2.example"))
    resources = out(mesh, "shop/invoices-1")
    lb = resources["eds"][USERS_CLUSTER]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in lb] == ["10.0.0.11"]
    inbound = out(mesh, "shop/users-2")["lds"]["inbound:8080"]
    assert inbound["address"]["socket_address"]["address"] == "0.0.0.0"  # noqa: S104


# --- transparent proxy ---------------------------------------------------------------------------


def test_transparent_proxy_listeners() -> None:
    lds = out(with_reports(), "shop/reports-1")["lds"]
    for name, port, direction in (
        ("virtual-outbound", 15001, "OUTBOUND"),
        ("virtual-inbound", 15006, "INBOUND"),
    ):
        redirect = lds[name]
        assert redirect["use_original_dst"] is True
        assert redirect["address"]["socket_address"]["port_value"] == port
        assert redirect["traffic_direction"] == direction
        assert [f["name"] for f in redirect["listener_filters"]] == [
            "envoy.filters.listener.original_dst"
        ]
    # Inbound listeners are reached through virtual-inbound and do not bind.
    assert all(lds[f"inbound:{p}"]["bind_to_port"] is False for p in (5432, 8080, 9090))
    # Every instance of a called service, ready or not, has a non-binding listener.
    for address in ("10.0.0.11", "10.0.0.21", "10.0.0.12"):
        per_address = lds[f"outbound:{address}:8080"]
        assert per_address["bind_to_port"] is False
        hcm = manager(per_address["filter_chains"][0])
        assert hcm["rds"]["route_config_name"].endswith(
            "|8080|users.shop" if address != "10.0.0.12" else "|8080|items.shop"
        )
    assert "outbound:10002" in lds and "bind_to_port" not in lds["outbound:10002"]


def test_unknown_destinations_follow_the_egress_policy() -> None:
    allowed = out(with_reports(), "shop/reports-1")
    assert allowed["cds"]["passthrough"]["type"] == "ORIGINAL_DST"
    outbound_chain = allowed["lds"]["virtual-outbound"]["filter_chains"][0]
    assert outbound_chain["filters"][0]["typed_config"]["cluster"] == "passthrough"
    inbound_chain = allowed["lds"]["virtual-inbound"]["filter_chains"][0]
    assert inbound_chain["filters"][0]["typed_config"]["cluster"] == "blackhole"
    base = with_reports()
    denying = base.mesh.model_copy(
        update={"egress": base.mesh.egress.model_copy(update={"default_action": "DENY"})}
    )
    denied = out(
        MeshSnapshot(base.mesh_name, denying, base.dataplanes, ready=base.ready), "shop/reports-1"
    )
    assert "passthrough" not in denied["cds"]
    assert "load_assignment" in denied["cds"]["blackhole"]
    assert denied["cds"]["blackhole"]["load_assignment"] == {"cluster_name": "blackhole"}
    outbound_chain = denied["lds"]["virtual-outbound"]["filter_chains"][0]
    assert outbound_chain["filters"][0]["typed_config"]["cluster"] == "blackhole"


def test_without_transparent_proxy_nothing_virtual() -> None:
    resources = out(snapshot(), "shop/invoices-1")
    assert not any(name.startswith("virtual") for name in resources["lds"])
    assert {"blackhole", "passthrough"}.isdisjoint(resources["cds"])
    assert "bind_to_port" not in resources["lds"]["inbound:8080"]


def test_own_address_is_not_an_outbound_listener() -> None:
    # reports calls its own service: its inbound listener already owns that address.
    text = with_reports_text_calling_itself()
    mesh = snapshot(extra=text, egress="ALLOW")
    lds = out(mesh, "shop/reports-1")["lds"]
    assert "outbound:10.0.0.30:8080" not in lds and "inbound:8080" in lds


def with_reports_text_calling_itself() -> str:
    return (
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
        "metadata: {name: reports-1, namespace: shop}\n"
        "spec: {service: reports, address: 10.0.0.30, transparentProxy: {enabled: true},"
        " inbound: [{port: 8080, protocol: http}], outbound: [{service: reports, port: 8080}]}\n"
    )


def test_local_port_is_not_an_outbound_listener_address() -> None:
    # An instance at 127.0.0.1:9000 while the caller's own localPort is 9000: one listener.
    text = (
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
        "metadata: {name: local-1, namespace: shop}\n"
        "spec: {service: local, address: 127.0.0.1, inbound: [{port: 9000, appPort: 9100}]}\n"
        "---\n"
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
        "metadata: {name: caller-1, namespace: shop}\n"
        "spec: {service: caller, address: 10.0.0.40, transparentProxy: {enabled: true},"
        " outbound: [{service: local, port: 9000, localPort: 9000}]}\n"
    )
    lds = out(snapshot(extra=text), "shop/caller-1")["lds"]
    assert "outbound:9000" in lds and "outbound:127.0.0.1:9000" not in lds
