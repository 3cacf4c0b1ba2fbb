"""The effective mTLS mode: Istio's PeerAuthentication examples and precedence rules."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from verity.policy import EffectiveMtls, ModeSource, effective_mtls
from verity.resources import Dataplane, MeshSpec, PeerAuthentication, load_documents

ROOT = "verity-system"


def mesh(mode: str = "STRICT") -> MeshSpec:
    return MeshSpec.model_validate({"mtls": {"mode": mode}, "rootNamespace": ROOT})


def policies(text: str) -> list[PeerAuthentication]:
    loaded = load_documents(textwrap.dedent(text))
    assert all(isinstance(p, PeerAuthentication) for p in loaded)
    return [p for p in loaded if isinstance(p, PeerAuthentication)]


def policy(namespace: str, name: str, spec: str, version: str = "v1beta1") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        f"apiVersion: security.istio.io/{version}\nkind: PeerAuthentication\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{body}\n---\n"
    )


def workload(
    namespace: str = "foo",
    labels: dict[str, str] | None = None,
    ports: tuple[tuple[int, int], ...] = ((8080, 8080),),
) -> Dataplane:
    return Dataplane.model_validate(
        {
            "api_version": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "name": "w-1",
            "namespace": namespace,
            "spec": {
                "service": "finance",
                "labels": {"app": "finance"} if labels is None else labels,
                "address": "10.0.0.7",
                "inbound": [{"port": p, "appPort": a} for p, a in ports],
            },
        }
    )


def modes(result: EffectiveMtls) -> dict[int, str]:
    return {p.port: p.mode for p in result.ports}


# --- no policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("default", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_without_any_policy_the_mesh_default_applies(default: str) -> None:
    result = effective_mtls(mesh(default), [], workload())
    assert result.mode == default and modes(result) == {8080: default}
    assert result.source == ModeSource("mesh-default")
    assert "mesh default" in result.source.describe()


def test_verity_default_is_strict() -> None:
    assert effective_mtls(MeshSpec(), [], workload()).mode == "STRICT"


# --- Istio's documented examples ----------------------------------------------------------------


def test_istio_example_namespace_strict() -> None:
    pas = policies(policy("foo", "default", "mtls: {mode: STRICT}"))
    result = effective_mtls(mesh("PERMISSIVE"), pas, workload())
    assert result.mode == "STRICT"
    assert result.source == ModeSource("namespace", "foo", "default")
    # Another namespace is not affected.
    other = effective_mtls(mesh("PERMISSIVE"), pas, workload(namespace="bar"))
    assert other.mode == "PERMISSIVE" and other.source.level == "mesh-default"


def test_istio_example_permissive_namespace_strict_finance() -> None:
    pas = policies(
        policy("foo", "default", "mtls: {mode: PERMISSIVE}")
        + policy("foo", "finance", "selector: {matchLabels: {app: finance}}\nmtls: {mode: STRICT}")
    )
    finance = effective_mtls(mesh(), pas, workload())
    assert finance.mode == "STRICT"
    assert finance.source == ModeSource("workload", "foo", "finance")
    other = effective_mtls(mesh(), pas, workload(labels={"app": "web"}))
    assert other.mode == "PERMISSIVE" and other.source.level == "namespace"


def test_istio_example_strict_but_port_8080_plaintext() -> None:
    pas = policies(
        policy(
            "foo",
            "default",
            """
            selector: {matchLabels: {app: finance}}
            mtls: {mode: STRICT}
            portLevelMtls: {8080: {mode: DISABLE}}
            """,
        )
    )
    result = effective_mtls(mesh(), pas, workload(ports=((8080, 8080), (9000, 9000))))
    assert modes(result) == {8080: "DISABLE", 9000: "STRICT"}
    assert result.port_mode(8080).source == ModeSource("port", "foo", "default")
    assert result.port_mode(9000).source == ModeSource("workload", "foo", "default")


def test_istio_example_unset_inherits_namespace_and_port_overrides() -> None:
    # Istio: "inherit mTLS mode from namespace (or mesh) settings, and overwrite settings for
    # port 8080".
    pas = policies(
        policy("foo", "ns-wide", "mtls: {mode: PERMISSIVE}")
        + policy(
            "foo",
            "default",
            """
            selector: {matchLabels: {app: finance}}
            mtls: {mode: UNSET}
            portLevelMtls: {8080: {mode: DISABLE}}
            """,
        )
    )
    result = effective_mtls(mesh(), pas, workload(ports=((8080, 8080), (9000, 9000))))
    assert result.mode == "PERMISSIVE"
    assert result.source == ModeSource("namespace", "foo", "ns-wide")
    assert modes(result) == {8080: "DISABLE", 9000: "PERMISSIVE"}


def test_port_level_overrides_a_strict_namespace_policy() -> None:
    pas = policies(
        policy("foo", "default", "mtls: {mode: STRICT}")
        + policy(
            "foo",
            "metrics",
            "selector: {matchLabels: {app: finance}}\nportLevelMtls: {9090: {mode: PERMISSIVE}}",
        )
    )
    result = effective_mtls(mesh("DISABLE"), pas, workload(ports=((8080, 8080), (9090, 9090))))
    assert modes(result) == {8080: "STRICT", 9090: "PERMISSIVE"}
    assert result.port_mode(8080).source.level == "namespace"


# --- precedence and inheritance -----------------------------------------------------------------


def test_mesh_level_lives_in_the_root_namespace() -> None:
    pas = policies(policy(ROOT, "default", "mtls: {mode: DISABLE}"))
    result = effective_mtls(mesh("STRICT"), pas, workload())
    assert result.mode == "DISABLE" and result.source == ModeSource("mesh", ROOT, "default")


def test_each_level_overrides_the_one_above() -> None:
    mesh_wide = policy(ROOT, "mesh", "mtls: {mode: DISABLE}")
    namespace = policy("foo", "ns", "mtls: {mode: PERMISSIVE}")
    workload_level = policy(
        "foo", "wl", "selector: {matchLabels: {app: finance}}\nmtls: {mode: STRICT}"
    )
    assert effective_mtls(mesh(), policies(mesh_wide), workload()).mode == "DISABLE"
    assert effective_mtls(mesh(), policies(mesh_wide + namespace), workload()).mode == "PERMISSIVE"
    everything = policies(mesh_wide + namespace + workload_level)
    assert effective_mtls(mesh(), everything, workload()).mode == "STRICT"


def test_unset_inherits_through_every_level() -> None:
    pas = policies(
        policy(ROOT, "mesh", "mtls: {mode: PERMISSIVE}")
        + policy("foo", "ns", "mtls: {mode: UNSET}")
        + policy("foo", "wl", "selector: {matchLabels: {app: finance}}")
    )
    result = effective_mtls(mesh("STRICT"), pas, workload())
    assert result.mode == "PERMISSIVE" and result.source == ModeSource("mesh", ROOT, "mesh")


def test_unset_port_level_inherits_the_workload_mode() -> None:
    pas = policies(
        policy(
            "foo",
            "wl",
            """
            selector: {matchLabels: {app: finance}}
            mtls: {mode: DISABLE}
            portLevelMtls: {8080: {mode: UNSET}}
            """,
        )
    )
    result = effective_mtls(mesh(), pas, workload())
    assert result.port_mode(8080).mode == "DISABLE"
    assert result.port_mode(8080).source == ModeSource("workload", "foo", "wl")


def test_port_level_is_keyed_by_the_app_port() -> None:
    pas = policies(
        policy(
            "foo",
            "wl",
            "selector: {matchLabels: {app: finance}}\nportLevelMtls: {3000: {mode: DISABLE}}",
        )
    )
    # Sidecar port 8080 forwards to app port 3000: the port-level entry for 3000 applies.
    result = effective_mtls(mesh(), pas, workload(ports=((8080, 3000), (3000, 4000))))
    assert modes(result) == {3000: "STRICT", 8080: "DISABLE"}
    assert result.port_mode(8080).app_port == 3000


def test_string_port_keys_count_like_numbers() -> None:
    pas = policies(
        policy(
            "foo",
            "wl",
            "selector: {matchLabels: {app: finance}}\nportLevelMtls: {'8080': {mode: DISABLE}}",
        )
    )
    assert modes(effective_mtls(mesh(), pas, workload())) == {8080: "DISABLE"}


def test_selector_in_root_namespace_is_ignored() -> None:
    pas = policies(
        policy(ROOT, "wl", "selector: {matchLabels: {app: finance}}\nmtls: {mode: DISABLE}")
    )
    assert effective_mtls(mesh(), pas, workload()).mode == "STRICT"
    # ... even for a workload in the root namespace itself.
    assert effective_mtls(mesh(), pas, workload(namespace=ROOT)).mode == "STRICT"


def test_empty_match_labels_is_namespace_wide() -> None:
    pas = policies(policy("foo", "ns", "selector: {matchLabels: {}}\nmtls: {mode: DISABLE}"))
    result = effective_mtls(mesh(), pas, workload(labels={"app": "other"}))
    assert result.mode == "DISABLE" and result.source.level == "namespace"


def test_selector_needs_every_label() -> None:
    pas = policies(
        policy(
            "foo", "wl", "selector: {matchLabels: {app: finance, tier: db}}\nmtls: {mode: DISABLE}"
        )
    )
    assert effective_mtls(mesh(), pas, workload()).mode == "STRICT"
    both = workload(labels={"app": "finance", "tier": "db", "extra": "x"})
    assert effective_mtls(mesh(), pas, both).mode == "DISABLE"


def test_policies_of_other_namespaces_do_not_apply() -> None:
    pas = policies(
        policy("bar", "ns", "mtls: {mode: DISABLE}")
        + policy("bar", "wl", "selector: {matchLabels: {app: finance}}\nmtls: {mode: DISABLE}")
    )
    assert effective_mtls(mesh(), pas, workload()).mode == "STRICT"


def test_v1_and_v1beta1_mean_the_same() -> None:
    for version in ("v1", "v1beta1"):
        pas = policies(policy("foo", "ns", "mtls: {mode: PERMISSIVE}", version))
        assert effective_mtls(mesh(), pas, workload()).mode == "PERMISSIVE"


# --- several policies at one level ---------------------------------------------------------------

TWO_WORKLOAD_POLICIES = policy(
    "foo", "b-first-created", "selector: {matchLabels: {app: finance}}\nmtls: {mode: DISABLE}"
) + policy("foo", "a-later", "selector: {matchLabels: {app: finance}}\nmtls: {mode: PERMISSIVE}")


def test_oldest_workload_policy_wins_when_creation_times_are_known() -> None:
    pas = policies(TWO_WORKLOAD_POLICIES)
    created = {
        ("foo", "b-first-created"): datetime(2024, 1, 1, tzinfo=UTC),
        ("foo", "a-later"): datetime(2024, 6, 1, tzinfo=UTC),
    }
    result = effective_mtls(mesh(), pas, workload(), created_at=created)
    assert result.mode == "DISABLE" and result.source.name == "b-first-created"
    assert effective_mtls(mesh(), reversed(pas), workload(), created_at=created) == result


def test_without_creation_times_the_first_name_wins() -> None:
    pas = policies(TWO_WORKLOAD_POLICIES)
    result = effective_mtls(mesh(), pas, workload())
    assert result.mode == "PERMISSIVE" and result.source.name == "a-later"
    assert effective_mtls(mesh(), list(reversed(pas)), workload()) == result


def test_a_known_creation_time_beats_an_unknown_one() -> None:
    pas = policies(TWO_WORKLOAD_POLICIES)
    created = {("foo", "b-first-created"): datetime(2024, 1, 1, tzinfo=UTC)}
    assert effective_mtls(mesh(), pas, workload(), created_at=created).mode == "DISABLE"


def test_oldest_namespace_policy_wins_too() -> None:
    pas = policies(
        policy("foo", "zz", "mtls: {mode: DISABLE}")
        + policy("foo", "aa", "mtls: {mode: PERMISSIVE}")
    )
    created = {
        ("foo", "zz"): datetime(2023, 1, 1, tzinfo=UTC),
        ("foo", "aa"): datetime(2023, 1, 2, tzinfo=UTC),
    }
    assert effective_mtls(mesh(), pas, workload(), created_at=created).mode == "DISABLE"
    assert effective_mtls(mesh(), pas, workload()).mode == "PERMISSIVE"


def test_ports_are_ordered_and_unknown_port_is_an_error() -> None:
    result = effective_mtls(mesh(), [], workload(ports=((9000, 9000), (80, 3000))))
    assert [p.port for p in result.ports] == [80, 9000]
    with pytest.raises(KeyError):
        result.port_mode(1234)
