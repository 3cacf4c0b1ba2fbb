"""AdsServer over a real loopback gRPC channel, driven by an Envoy-like client."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from tests.unit.xds.conftest import (
    FORBIDDEN_TOKEN,
    AdsHarness,
    cluster,
    config,
    endpoints,
    listener,
    route,
)
from tests.unit.xds.fakeenvoy import FakeEnvoy, StreamEnded, names_of
from verity.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

KEY_BODY = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRETSECRET"
PEM_KEY = f"-----BEGIN PRIVATE KEY-----\\n{KEY_BODY}\\n-----END PRIVATE KEY-----"


def base_config() -> dict[str, dict[str, object]]:
    return config(
        listeners=[listener("in")],
        clusters=[cluster("app"), cluster("db")],
        assignments=[endpoints("app"), endpoints("db")],
        routes=[route("r1")],
    )


async def connected(
    harness: AdsHarness, node_id: str, types: tuple[str, ...] = (CLUSTER, LISTENER)
) -> FakeEnvoy:
    """A client subscribed (wildcard) to the given types, its ACKs recorded by the server."""
    envoy = harness.envoy(node_id)
    for type_url in types:
        await envoy.subscribe(type_url)
        await envoy.receive_and_ack()
        assert await acked(harness, node_id, type_url)
    return envoy


async def acked(harness: AdsHarness, node_id: str, type_url: str) -> bool:
    version = harness.cache.version(node_id, type_url)
    assert version is not None
    return await harness.status.wait_acked([node_id], [type_url], {type_url: version}, 2.0)


# Initial fetch.


async def test_initial_fetch_answers_each_type_even_when_empty(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", config(clusters=[cluster("app")]))
    envoy = harness.envoy("node-a")

    await envoy.subscribe(CLUSTER)
    clusters = await envoy.receive_and_ack()
    await envoy.subscribe(LISTENER)
    listeners = await envoy.receive_and_ack()

    assert names_of(clusters) == ["app"]
    assert clusters.version_info == harness.cache.version("node-a", CLUSTER)
    assert listeners.resources == [] and listeners.type_url == LISTENER
    assert await acked(harness, "node-a", LISTENER)
    assert await acked(harness, "node-a", CLUSTER)


async def test_nothing_is_served_before_the_proxy_has_resources(harness: AdsHarness) -> None:
    envoy = harness.envoy("node-a")
    await envoy.subscribe(CLUSTER)
    await envoy.expect_nothing()

    harness.cache.set_resources("node-a", config(clusters=[cluster("app")]))

    assert names_of(await envoy.receive()) == ["app"]


async def test_config_computed_lazily_on_connect_is_served(
    harness: AdsHarness, on_connect: dict[str, object]
) -> None:
    on_connect["node-a"] = lambda h, node: h.cache.set_resources(node, base_config())
    envoy = harness.envoy("node-a")
    await envoy.subscribe(LISTENER)

    assert names_of(await envoy.receive()) == ["in"]
    assert harness.connects == ["node-a"]


# Pushes.


async def test_change_is_pushed_to_the_affected_node_and_type_only(harness: AdsHarness) -> None:
    for node in ("node-a", "node-b"):
        harness.cache.set_resources(node, base_config())
    envoy_a = await connected(harness, "node-a")
    envoy_b = await connected(harness, "node-b")

    changed_config = base_config()
    changed_config[LISTENER] = {"in": listener("in", port=10001)}
    changed = harness.cache.set_resources("node-a", changed_config)

    assert changed == {LISTENER}
    pushed = await envoy_a.receive_and_ack()
    assert pushed.type_url == LISTENER
    assert pushed.version_info == harness.cache.version("node-a", LISTENER)
    await envoy_a.expect_nothing()
    await envoy_b.expect_nothing()
    assert await acked(harness, "node-a", LISTENER)


async def test_identical_config_pushes_nothing(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a")

    assert harness.cache.set_resources("node-a", base_config()) == frozenset()
    await envoy.expect_nothing()


async def test_changes_are_pushed_clusters_first_routes_last(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (CLUSTER, LISTENER))
    for type_url, names in ((ENDPOINT, ["app"]), (ROUTE, ["r1"])):
        await envoy.subscribe(type_url, names)
        await envoy.receive_and_ack()

    harness.cache.set_resources(
        "node-a",
        config(
            listeners=[listener("in", 10001)],
            clusters=[cluster("app", 2)],
            assignments=[endpoints("app", 9090)],
            routes=[route("r1", "db")],
        ),
    )

    order = [(await envoy.receive_and_ack()).type_url for _ in range(4)]
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE]


# Subscriptions.


async def test_eds_and_rds_send_only_the_subscribed_names(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a")

    await envoy.subscribe(ENDPOINT, ["app", "missing"])
    assert names_of(await envoy.receive_and_ack()) == ["app"]
    await envoy.subscribe(ROUTE, ["r1"])
    assert names_of(await envoy.receive_and_ack()) == ["r1"]

    # A new name arrives with the next ACK-like request: the newly named resource is sent.
    await envoy.re_request(ENDPOINT, ["app", "db"])
    assert names_of(await envoy.receive_and_ack()) == ["app", "db"]


async def test_ack_that_changes_names_is_answered(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a")
    await envoy.subscribe(ENDPOINT, ["app"])
    response = await envoy.receive()

    envoy.subscriptions[ENDPOINT].names = ["app", "db"]
    await envoy.ack(response)

    assert names_of(await envoy.receive()) == ["app", "db"]


# ACK, NACK, stale nonces.


async def test_stale_nonce_is_ignored(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (CLUSTER,))
    await envoy.subscribe(ENDPOINT, ["app"])
    first = await envoy.receive()
    harness.cache.set_resources(
        "node-a",
        config(clusters=[cluster("app"), cluster("db")], assignments=[endpoints("app", 1)]),
    )
    second = await envoy.receive()

    # A request still answering the first response, even one that asks for more names.
    await envoy.send(ENDPOINT, ["app", "db"], version=first.version_info, nonce=first.nonce)
    await envoy.expect_nothing()
    status = harness.status.snapshot("node-a")
    assert status is not None and status.types[ENDPOINT].version_acked is None

    await envoy.ack(second)
    assert await acked(harness, "node-a", ENDPOINT)


async def test_nack_is_recorded_scrubbed_and_not_answered_with_the_same_version(
    harness: AdsHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    harness.cache.set_resources("node-a", config(listeners=[listener("in")]))
    envoy = await connected(harness, "node-a", (CLUSTER,))
    good = harness.cache.version("node-a", LISTENER)
    await envoy.subscribe(LISTENER)
    await envoy.receive_and_ack()
    assert await acked(harness, "node-a", LISTENER)  # before the next push makes it stale

    harness.cache.set_resources("node-a", config(listeners=[listener("in", 1)]))
    bad_version = harness.cache.version("node-a", LISTENER)
    error = f'Error adding/updating listener(s) in: secret {{ inline_string: "{PEM_KEY}" }}'
    await envoy.nack(await envoy.receive(), error)
    await envoy.expect_nothing()
    await envoy.re_request(LISTENER)  # asking again for what it rejected changes nothing
    await envoy.expect_nothing()

    status = harness.status.snapshot("node-a")
    assert status is not None
    lds = status.types[LISTENER]
    assert lds.version_acked == good and lds.version_sent == bad_version
    assert lds.last_nack is not None and lds.last_nack.version == bad_version
    assert "Error adding/updating listener(s) in" in lds.last_nack.error
    assert KEY_BODY not in repr(status)
    assert KEY_BODY not in caplog.text and "SECRET" not in caplog.text
    assert "proxy rejected lds" in caplog.text

    harness.cache.set_resources("node-a", config(listeners=[listener("in", 2)]))
    assert (await envoy.receive_and_ack()).version_info == harness.cache.version("node-a", LISTENER)


async def test_eds_re_request_after_cds_update_is_answered(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (CLUSTER,))
    await envoy.subscribe(ENDPOINT, ["app", "db"])
    eds = await envoy.receive_and_ack()
    assert await acked(harness, "node-a", ENDPOINT)

    # Only a cluster changes; its endpoints do not.
    updated = base_config()
    updated[CLUSTER] = {"app": cluster("app", 5), "db": cluster("db")}
    assert harness.cache.set_resources("node-a", updated) == {CLUSTER}
    cds = await envoy.receive()
    # Envoy: re-request EDS with the last EDS nonce and version (the updated cluster warms),
    # then ACK the CDS update.
    await envoy.re_request(ENDPOINT)
    await envoy.ack(cds)

    again = await envoy.receive_and_ack()
    assert again.type_url == ENDPOINT
    assert again.version_info == eds.version_info and again.nonce != eds.nonce
    assert names_of(again) == ["app", "db"]
    await envoy.expect_nothing()


# Authentication and node binding.


async def test_unknown_credentials_are_unauthenticated(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = harness.envoy("node-a", token="no-such-token")
    await envoy.subscribe(LISTENER)

    ended = await envoy.ended()
    assert ended.code is grpc.StatusCode.UNAUTHENTICATED
    assert harness.connects == []


async def test_forbidden_credentials_are_permission_denied(harness: AdsHarness) -> None:
    envoy = harness.envoy("node-a", token=FORBIDDEN_TOKEN)
    await envoy.subscribe(LISTENER)

    assert (await envoy.ended()).code is grpc.StatusCode.PERMISSION_DENIED


async def test_credentials_of_another_node_are_refused(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = harness.envoy("node-a", token="token-b")
    await envoy.subscribe(LISTENER)

    assert (await envoy.ended()).code is grpc.StatusCode.PERMISSION_DENIED


async def test_first_request_without_node_is_refused(harness: AdsHarness) -> None:
    envoy = harness.envoy("node-a")
    await envoy.send(LISTENER, node_id="")

    assert (await envoy.ended()).code is grpc.StatusCode.INVALID_ARGUMENT


async def test_switching_node_id_mid_stream_is_refused(harness: AdsHarness) -> None:
    for node in ("node-a", "node-b"):
        harness.cache.set_resources(node, base_config())
    envoy = await connected(harness, "node-a", (LISTENER,))

    await envoy.send(CLUSTER, node_id="node-b")

    assert (await envoy.ended()).code is grpc.StatusCode.PERMISSION_DENIED
    status = harness.status.snapshot("node-b")
    assert status is None or CLUSTER not in status.types


# Connection bookkeeping.


async def test_connect_and_disconnect_are_reported(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (LISTENER,))
    status = harness.status.snapshot("node-a")
    assert status is not None and status.connected and status.connected_since is not None
    assert harness.ads.connected_nodes() == {"node-a"}

    await envoy.close()
    async with asyncio.timeout(3):
        while harness.disconnects != ["node-a"]:
            await asyncio.sleep(0.01)
    status = harness.status.snapshot("node-a")
    assert status is not None and not status.connected and status.disconnected_at is not None
    assert harness.connects == ["node-a"]


async def test_control_plane_can_end_a_proxys_streams(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (LISTENER,))

    assert harness.ads.disconnect("node-a") == 1

    assert (await envoy.ended()).code is grpc.StatusCode.UNAVAILABLE


async def test_wait_acked_ends_false_on_nack(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (LISTENER,))
    harness.cache.set_resources("node-a", config(listeners=[listener("in", 7)]))
    waiting = asyncio.create_task(
        harness.status.wait_acked(["node-a"], [LISTENER], harness.cache.version, 5.0)
    )

    await envoy.nack(await envoy.receive(), "bad port")

    assert await waiting is False


async def test_stream_ends_are_reported_as_errors_to_the_client(harness: AdsHarness) -> None:
    envoy = harness.envoy("node-a", token="nope")
    await envoy.subscribe(LISTENER)
    with pytest.raises(StreamEnded):
        await envoy.receive()


async def test_request_without_type_url_is_refused(harness: AdsHarness) -> None:
    harness.cache.set_resources("node-a", base_config())
    envoy = await connected(harness, "node-a", (LISTENER,))

    await envoy.send("")

    assert (await envoy.ended()).code is grpc.StatusCode.INVALID_ARGUMENT
