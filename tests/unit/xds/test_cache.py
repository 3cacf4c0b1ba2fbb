"""SnapshotCache: content versions, change detection per type, serialized-once responses."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.unit.xds.conftest import cluster, config, endpoints, listener, route
from verity.xds import typeurls
from verity.xds.cache import SnapshotCache
from verity.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE


def parse(body: bytes) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(body)


def test_versions_are_content_hashes() -> None:
    one, two = SnapshotCache(), SnapshotCache()
    one.set_resources("a", config(clusters=[cluster("x"), cluster("y")]))
    two.set_resources("b", config(clusters=[cluster("y"), cluster("x")]))

    assert one.version("a", CLUSTER) == two.version("b", CLUSTER)
    assert one.version("a", LISTENER) == two.version("b", LISTENER)  # both empty
    assert one.version("a", CLUSTER) != one.version("a", LISTENER)


def test_set_returns_the_changed_types_only() -> None:
    cache = SnapshotCache()
    first = cache.set_resources("a", config(clusters=[cluster("x")], listeners=[listener("l")]))
    assert first >= {CLUSTER, LISTENER}

    assert (
        cache.set_resources("a", config(clusters=[cluster("x")], listeners=[listener("l")]))
        == set()
    )
    changed = cache.set_resources(
        "a", config(clusters=[cluster("x", 9)], listeners=[listener("l")])
    )
    assert changed == {CLUSTER}
    # A type left out of a full set is emptied.
    assert cache.set_resources("a", config(clusters=[cluster("x", 9)])) == {LISTENER}


def test_partial_set_keeps_the_other_types() -> None:
    cache = SnapshotCache()
    cache.set_resources("a", config(clusters=[cluster("x")], listeners=[listener("l")]))
    before = cache.version("a", LISTENER)

    changed = cache.set_resources("a", {CLUSTER: {"z": cluster("z")}}, partial=True)

    assert changed == {CLUSTER}
    assert cache.version("a", LISTENER) == before


def test_changes_wake_only_that_nodes_watchers() -> None:
    cache = SnapshotCache()
    seen: dict[str, list[frozenset[str]]] = {"a": [], "b": []}
    cache.watch("a", seen["a"].append)
    unwatch_b = cache.watch("b", seen["b"].append)
    cache.set_resources("b", config())
    unwatch_b()

    cache.set_resources("a", config(listeners=[listener("l")]))
    cache.set_resources("b", config(listeners=[listener("l")]))
    cache.set_resources("a", config(listeners=[listener("l")]))

    assert len(seen["a"]) == 1 and LISTENER in seen["a"][0]
    assert len(seen["b"]) == 1


def test_response_bytes_are_a_valid_discovery_response() -> None:
    cache = SnapshotCache()
    cache.set_resources(
        "a", config(assignments=[endpoints("x"), endpoints("y")], routes=[route("r")])
    )
    eds = cache.get("a", ENDPOINT)
    assert eds is not None

    everything = parse(eds.response(None, "7"))
    only_y = parse(eds.response(frozenset({"y", "absent"}), "8"))

    assert everything.version_info == eds.version and everything.nonce == "7"
    assert everything.type_url == ENDPOINT
    assert [r.type_url for r in everything.resources] == [ENDPOINT, ENDPOINT]
    assert len(only_y.resources) == 1 and only_y.nonce == "8"
    unpacked = endpoints("y").__class__()
    assert only_y.resources[0].Unpack(unpacked) and unpacked == endpoints("y")


def test_identical_resources_of_different_nodes_share_their_bytes() -> None:
    cache = SnapshotCache()
    cache.set_resources("a", config(clusters=[cluster("x")]))
    cache.set_resources("b", config(clusters=[cluster("x")]))
    a, b = cache.get("a", CLUSTER), cache.get("b", CLUSTER)

    assert a is not None and b is not None
    assert a.resources["x"] is b.resources["x"]


def test_wrong_type_or_name_is_refused_and_nothing_changes() -> None:
    cache = SnapshotCache()
    cache.set_resources("a", config(clusters=[cluster("x")]))
    before = cache.versions("a")

    with pytest.raises(ValueError, match="not a"):
        cache.set_resources("a", {CLUSTER: {"x": listener("x")}})
    with pytest.raises(ValueError, match="names itself"):
        cache.set_resources("a", {CLUSTER: {"x": cluster("y")}, ENDPOINT: {}})
    with pytest.raises(ValueError, match="names itself"):
        cache.set_resources("a", {ENDPOINT: {"x": endpoints("y")}})

    assert cache.versions("a") == before


def test_unknown_and_removed_nodes() -> None:
    cache = SnapshotCache()
    assert cache.get("a", CLUSTER) is None and cache.version("a", CLUSTER) is None
    cache.set_resources("a", {})

    assert cache.get("a", CLUSTER) is not None and "a" in cache
    assert cache.remove("a") and "a" not in cache and not cache.remove("a")


def test_push_order_is_make_before_break() -> None:
    shuffled = [typeurls.ROUTE, typeurls.SECRET, typeurls.LISTENER, "x.Other", CLUSTER, ENDPOINT]
    assert sorted(shuffled, key=typeurls.push_rank) == [
        CLUSTER,
        ENDPOINT,
        LISTENER,
        ROUTE,
        typeurls.SECRET,
        "x.Other",
    ]
    assert typeurls.short_name(ENDPOINT) == "eds"


def test_large_resources_round_trip() -> None:
    cache = SnapshotCache()
    big = cluster("big")
    big.alt_stat_name = "x" * 70_000  # multi-byte lengths at every level
    cache.set_resources("a", {CLUSTER: {"big": big, "small": cluster("small")}})
    cds = cache.get("a", CLUSTER)
    assert cds is not None

    response = parse(cds.response(None, "1"))

    unpacked = [cluster_pb2.Cluster() for _ in response.resources]
    assert all(r.Unpack(u) for r, u in zip(response.resources, unpacked, strict=True))
    assert unpacked == [big, cluster("small")]
