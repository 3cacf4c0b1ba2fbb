"""The SDS server driven by a real gRPC client over its Unix socket, the way Envoy drives it."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.unit.dataplane.certs import ThrowawayCA
from verity.dataplane.keys import WorkloadKey
from verity.dataplane.sds import (
    BUNDLE_SECRET,
    CERT_SECRET,
    SDS_CLUSTER,
    SECRET_TYPE_URL,
    CertificateSecret,
    InvalidSecret,
    SdsServer,
    SpiffeTrustBundle,
    TrustBundle,
    bundle_proto,
    sds_secret_config,
)

SERVER_ID = "spiffe://cluster.local/ns/shop/sa/web"


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SdsServer]:
    sds = SdsServer(tmp_path / "run" / "sds.sock")
    await sds.start()
    try:
        yield sds
    finally:
        await sds.stop()


@pytest.fixture
async def stub(server: SdsServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        yield sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


def request(*names: str, nonce: str = "", version: str = "", error: str | None = None) -> Any:
    req = discovery_pb2.DiscoveryRequest(
        resource_names=list(names),
        type_url=SECRET_TYPE_URL,
        response_nonce=nonce,
        version_info=version,
    )
    req.node.id = "shop/web-1"
    if error is not None:
        req.error_detail.code = 3  # INVALID_ARGUMENT, as Envoy sends
        req.error_detail.message = error
    return req


async def read(call: Any, timeout: float = 2.0) -> Any:
    return await asyncio.wait_for(call.read(), timeout)


def secrets_of(response: Any) -> dict[str, Any]:
    out = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        out[secret.name] = secret
    return out


async def subscribe(stub: Any, *names: str) -> tuple[Any, Any]:
    call = stub.StreamSecrets()
    await call.write(request(*names))
    response = await read(call)
    return call, response


async def ack(call: Any, response: Any, *names: str) -> None:
    await call.write(request(*names, nonce=response.nonce, version=response.version_info))


def test_socket_is_0600_in_a_0700_directory(server: SdsServer) -> None:
    assert stat.S_ISSOCK(server.socket_path.lstat().st_mode)
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o700


async def test_refuses_a_directory_others_can_enter(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="0700"):
        await SdsServer(shared / "sds.sock").start()


async def test_stale_socket_is_replaced_and_stop_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "sds.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: a dead agent's
        stale.bind(str(path))
    server = SdsServer(path)
    await server.start()
    await server.stop()
    assert not path.exists()


async def test_a_live_servers_socket_is_not_taken_over(server: SdsServer) -> None:
    with pytest.raises(FileExistsError, match="another SDS server"):
        await SdsServer(server.socket_path).start()
    assert server.socket_path.is_socket()


async def test_first_push_waits_for_the_secret_then_ack(
    server: SdsServer, stub: Any, ca: ThrowawayCA
) -> None:
    call = stub.StreamSecrets()
    await call.write(request(CERT_SECRET))
    svid = ca.issue(SERVER_ID)
    versions = server.update(certificate=svid.secret())
    response = await read(call)
    assert response.type_url == SECRET_TYPE_URL
    assert response.version_info == versions[CERT_SECRET]
    assert response.nonce
    secret = secrets_of(response)[CERT_SECRET]
    assert secret.tls_certificate.certificate_chain.inline_bytes == svid.certificate_pem
    assert secret.tls_certificate.private_key.inline_bytes == svid.key_pem
    assert server.acked_version(CERT_SECRET) is None
    await ack(call, response, CERT_SECRET)
    await server.wait_acked(CERT_SECRET, versions[CERT_SECRET], timeout=2)
    assert server.acked_version(CERT_SECRET) == versions[CERT_SECRET]
    [status] = server.streams()
    assert status.node_id == "shop/web-1"
    assert status.resource_names == (CERT_SECRET,)


async def test_update_reaches_every_stream_and_acked_needs_all(
    server: SdsServer, stub: Any, ca: ThrowawayCA
) -> None:
    v1 = server.update(certificate=ca.issue(SERVER_ID).secret())[CERT_SECRET]
    call_a, first_a = await subscribe(stub, CERT_SECRET)
    call_b, first_b = await subscribe(stub, CERT_SECRET)
    await ack(call_a, first_a, CERT_SECRET)
    await ack(call_b, first_b, CERT_SECRET)
    await server.wait_acked(CERT_SECRET, v1, timeout=2)

    rotated = ca.issue(SERVER_ID)
    v2 = server.update(certificate=rotated.secret())[CERT_SECRET]
    assert int(v2) > int(v1)
    second_a, second_b = await read(call_a), await read(call_b)
    for response in (second_a, second_b):
        assert response.version_info == v2
        cert = secrets_of(response)[CERT_SECRET].tls_certificate.certificate_chain.inline_bytes
        assert cert == rotated.certificate_pem
    assert second_a.nonce != second_b.nonce != first_a.nonce

    await ack(call_a, second_a, CERT_SECRET)
    with pytest.raises(TimeoutError):
        await server.wait_acked(CERT_SECRET, v2, timeout=0.2)
    assert server.acked_version(CERT_SECRET) == v1  # stream b is still on v1
    await ack(call_b, second_b, CERT_SECRET)
    await server.wait_acked(CERT_SECRET, v2, timeout=2)
    assert server.acked_version(CERT_SECRET) == v2


async def test_unchanged_content_keeps_its_version(server: SdsServer, ca: ThrowawayCA) -> None:
    secret = ca.issue(SERVER_ID).secret()
    bundle = TrustBundle(ca.pem)
    first = server.update(certificate=secret, trust_bundle=bundle)
    assert first[CERT_SECRET] == first[BUNDLE_SECRET]
    assert server.update(certificate=secret, trust_bundle=bundle) == first
    third = server.update(trust_bundle=TrustBundle(ca.pem + ThrowawayCA("second").pem))
    assert int(third[BUNDLE_SECRET]) > int(first[BUNDLE_SECRET])
    assert server.current_version(CERT_SECRET) == first[CERT_SECRET]


async def test_nack_is_kept_scrubbed_and_does_not_count_as_ack(
    server: SdsServer, stub: Any, ca: ThrowawayCA, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = server.update(certificate=ca.issue(SERVER_ID).secret())[CERT_SECRET]
    call, first = await subscribe(stub, CERT_SECRET)
    await ack(call, first, CERT_SECRET)
    await server.wait_acked(CERT_SECRET, v1, timeout=2)

    bad = ca.issue(SERVER_ID)
    v2 = server.update(certificate=bad.secret())[CERT_SECRET]
    pushed = await read(call)
    key_text = bad.key_pem.decode()
    detail = f"Failed to load private key: inline_bytes: {key_text!r} {key_text}"
    with caplog.at_level(logging.DEBUG):
        await call.write(request(CERT_SECRET, nonce=pushed.nonce, version=v1, error=detail))
        await call.write(request(CERT_SECRET, nonce=pushed.nonce, version=v1, error=detail))
        # An ACK on a fresh stream round-trips through the server: the NACK was handled by then.
        other, response = await subscribe(stub, CERT_SECRET)
        await ack(other, response, CERT_SECRET)
        await server.wait_acked(CERT_SECRET, v1, timeout=2)
    nack = server.last_nack(CERT_SECRET)
    assert nack is not None
    assert nack.rejected_version == v2
    assert nack.secret_names == (CERT_SECRET,)
    assert nack.node_id == "shop/web-1"
    assert nack.message.startswith("Failed to load private key")
    body_line = key_text.splitlines()[1]
    for text in (nack.message, repr(nack), caplog.text):
        assert "PRIVATE KEY" not in text
        assert body_line[:24] not in text
    assert "Envoy rejected SDS secrets" in caplog.text
    assert server.acked_version(CERT_SECRET) == v1


async def test_stale_nonce_is_ignored(server: SdsServer, stub: Any, ca: ThrowawayCA) -> None:
    server.update(certificate=ca.issue(SERVER_ID).secret())
    call, first = await subscribe(stub, CERT_SECRET)
    v2 = server.update(certificate=ca.issue(SERVER_ID).secret())[CERT_SECRET]
    second = await read(call)
    await ack(call, first, CERT_SECRET)  # replies to the superseded push
    assert server.acked_version(CERT_SECRET) is None
    await ack(call, second, CERT_SECRET)
    await server.wait_acked(CERT_SECRET, v2, timeout=2)


async def test_subscription_change_gets_the_new_secret(
    server: SdsServer, stub: Any, ca: ThrowawayCA
) -> None:
    versions = server.update(
        certificate=ca.issue(SERVER_ID).secret(), trust_bundle=TrustBundle(ca.pem)
    )
    call, first = await subscribe(stub, CERT_SECRET)
    assert set(secrets_of(first)) == {CERT_SECRET}
    await call.write(
        request(CERT_SECRET, BUNDLE_SECRET, nonce=first.nonce, version=first.version_info)
    )
    second = await read(call)
    assert set(secrets_of(second)) == {CERT_SECRET, BUNDLE_SECRET}
    await ack(call, second, CERT_SECRET, BUNDLE_SECRET)
    await server.wait_acked(BUNDLE_SECRET, versions[BUNDLE_SECRET], timeout=2)


async def test_leaving_stream_no_longer_holds_back_acked(
    server: SdsServer, stub: Any, ca: ThrowawayCA
) -> None:
    v1 = server.update(certificate=ca.issue(SERVER_ID).secret())[CERT_SECRET]
    call_a, first_a = await subscribe(stub, CERT_SECRET)
    call_b, _ = await subscribe(stub, CERT_SECRET)
    await ack(call_a, first_a, CERT_SECRET)
    assert server.acked_version(CERT_SECRET) is None
    call_b.cancel()
    await server.wait_acked(CERT_SECRET, v1, timeout=2)
    call_a.cancel()
    for _ in range(100):
        if not server.streams():
            break
        await asyncio.sleep(0.01)
    assert server.acked_version(CERT_SECRET) is None


async def test_fetch_secrets(server: SdsServer, stub: Any, ca: ThrowawayCA) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.FetchSecrets(request(CERT_SECRET))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    versions = server.update(trust_bundle=TrustBundle(ca.pem))
    response = await stub.FetchSecrets(request(BUNDLE_SECRET))
    assert response.version_info == versions[BUNDLE_SECRET]
    bundle = secrets_of(response)[BUNDLE_SECRET]
    assert bundle.validation_context.trusted_ca.inline_bytes == ca.pem


async def test_wrong_type_is_refused(stub: Any) -> None:
    call = stub.StreamSecrets()
    wrong = request(CERT_SECRET)
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    await call.write(wrong)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read(call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delta_is_unimplemented(stub: Any) -> None:
    call = stub.DeltaSecrets()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read(call)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mismatched_key_is_refused_before_anything_is_pushed(ca: ThrowawayCA) -> None:
    svid = ca.issue(SERVER_ID)
    other_key = WorkloadKey.generate().private_key_pem()
    with pytest.raises(InvalidSecret, match="does not match"):
        CertificateSecret(svid.certificate_pem, other_key)
    with pytest.raises(InvalidSecret, match="not PEM"):
        CertificateSecret(b"garbage", svid.key_pem)
    with pytest.raises(InvalidSecret, match="private key"):
        CertificateSecret(svid.certificate_pem, b"garbage")


def test_a_leaf_is_not_a_trust_root(ca: ThrowawayCA) -> None:
    with pytest.raises(InvalidSecret, match="not a CA"):
        TrustBundle(ca.issue(SERVER_ID).certificate_pem)
    with pytest.raises(InvalidSecret, match="not PEM"):
        TrustBundle(b"")
    with pytest.raises(InvalidSecret, match="trust domain"):
        SpiffeTrustBundle({"Not A Domain": ca.pem})


def test_certificate_secret_repr_hides_the_key(ca: ThrowawayCA) -> None:
    svid = ca.issue(SERVER_ID)
    secret = svid.secret()
    assert f"{svid.serial:x}" in repr(secret)
    assert "PRIVATE" not in repr(secret) and "PRIVATE" not in str(secret)


def test_certificate_secret_from_workload_key(ca: ThrowawayCA) -> None:
    key = WorkloadKey.generate()
    loaded = serialization.load_pem_private_key(key.private_key_pem(), password=None)
    svid = ca.issue(SERVER_ID, loaded)  # type: ignore[arg-type]
    secret = CertificateSecret.from_key(key, svid.certificate_pem)
    assert secret.serial == svid.serial


def test_spiffe_bundle_uses_envoys_spiffe_validator(ca: ThrowawayCA) -> None:
    other = ThrowawayCA("partner")
    proto = bundle_proto(
        BUNDLE_SECRET, SpiffeTrustBundle({"cluster.local": ca.pem, "partner.example": other.pem})
    )
    validator = proto.validation_context.custom_validator_config
    assert validator.name == "envoy.tls.cert_validator.spiffe"
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert validator.typed_config.Unpack(config)
    domains = {d.name: d.trust_bundle.inline_bytes for d in config.trust_domains}
    assert domains == {"cluster.local": ca.pem, "partner.example": other.pem}
    assert not proto.validation_context.HasField("trusted_ca")


def test_sds_secret_config_points_at_the_sds_cluster() -> None:
    config = sds_secret_config(CERT_SECRET)
    assert config["name"] == CERT_SECRET
    source = config["sds_config"]["api_config_source"]
    assert source["grpc_services"] == [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]
    assert source["transport_api_version"] == "V3"


def test_socket_path_length_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        SdsServer(tmp_path / ("x" * 120) / "sds.sock")
