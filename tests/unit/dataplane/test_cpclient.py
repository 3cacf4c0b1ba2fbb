"""The CA-service client: TLS with the join CA (and server-name override), bearer metadata,
typed answers, gRPC errors mapped to clear exceptions. Served by an in-process grpc.aio server
on loopback over real TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from verity.dataplane.cpclient import (
    AgentReport,
    CaClient,
    ControlPlaneError,
    ControlPlaneTarget,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    check_token,
    map_error,
    parse_address,
)
from verity.protocol import ca_pb2, ca_pb2_grpc

TOKEN = "plain-secret-token-7c1e9a"
SERVER_NAME = "cp.verity.test"


# ---------------------------------------------------------------------------------------------
# A throwaway CA and serving certificate for the control plane's TLS (not a mesh CA)


@dataclass(frozen=True)
class ServingTls:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server_credentials(self) -> Any:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def serving_tls(*names: str) -> ServingTls:
    """A CA and a server certificate for `names` (DNS names or IP addresses)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test control-plane CA"))
        .issuer_name(_name("test control-plane CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServingTls(ca.public_bytes(pem), cert.public_bytes(pem), key_pem)


# ---------------------------------------------------------------------------------------------
# A scripted CA service


@dataclass
class Scripted:
    """Answers each method with `replies[method]`, or aborts with `aborts[method]`."""

    aborts: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    metadata: list[dict[str, str]] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)
    updates: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    async def _enter(self, method: str, context: Any) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if method in self.aborts:
            code, details = self.aborts[method]
            await context.abort(code, details)

    async def SignCertificate(self, request: Any, context: Any) -> Any:
        await self._enter("SignCertificate", context)
        return ca_pb2.SignCertificateResponse(
            spiffe_id="spiffe://cluster.local/ns/shop/sa/web",
            certificate_pem=b"LEAF",
            chain_pem=b"",
            trust_bundle_pem=b"ROOTS",
            not_before_unix=1_700_000_000,
            not_after_unix=1_700_086_400,
            serial_hex="abc",
        )

    async def GetTrustBundle(self, request: Any, context: Any) -> Any:
        await self._enter("GetTrustBundle", context)
        return ca_pb2.GetTrustBundleResponse(
            trust_domain="cluster.local",
            trust_bundle_pem=b"ROOTS",
            rotation_stage="stable",
            signing_root_fingerprint="ab" * 32,
        )

    async def RegisterDataplane(self, request: Any, context: Any) -> Any:
        await self._enter("RegisterDataplane", context)
        return ca_pb2.RegisterDataplaneResponse(namespace="shop", name="web-1", resource_version=7)

    async def WatchTrustBundle(self, requests: AsyncIterator[Any], context: Any) -> Any:
        await self._enter("WatchTrustBundle", context)

        async def read() -> None:
            async for report in requests:
                self.reports.append(report)

        reader = asyncio.create_task(read())
        try:
            while True:
                update = await self.updates.get()
                if update is None:
                    return
                if isinstance(update, tuple):
                    await context.abort(*update)
                yield ca_pb2.TrustBundleUpdate(bundle=update)
        finally:
            reader.cancel()


@dataclass
class Server:
    service: Scripted
    port: int
    tls: ServingTls

    def target(self, **overrides: Any) -> ControlPlaneTarget:
        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "ca_pem": self.tls.ca_pem,
            "server_name": SERVER_NAME,
        }
        fields.update(overrides)
        return ControlPlaneTarget(**fields)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    tls = serving_tls(SERVER_NAME)
    service = Scripted()
    grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await grpc_server.start()
    try:
        yield Server(service, port, tls)
    finally:
        await grpc_server.stop(0)


# ---------------------------------------------------------------------------------------------
# Calls


async def test_typed_answers_and_bearer_metadata(server: Server) -> None:
    async with CaClient(server.target(), TOKEN) as client:
        registration = await client.register_dataplane("kind: Dataplane")
        signed = await client.sign_certificate(b"CSR")
        bundle = await client.get_trust_bundle()
    assert (registration.namespace, registration.name, registration.resource_version) == (
        "shop",
        "web-1",
        7,
    )
    assert signed.certificate_pem == b"LEAF" and signed.serial_hex == "abc"
    assert signed.not_after - signed.not_before == datetime.timedelta(days=1)
    assert signed.not_after.tzinfo is not None
    assert bundle.trust_domain == "cluster.local" and bundle.rotation_stage == "stable"
    assert all(m["authorization"] == f"Bearer {TOKEN}" for m in server.service.metadata)
    assert len(server.service.metadata) == 3


async def test_watch_stream_updates_and_reports(server: Server) -> None:
    async with CaClient(server.target(), TOKEN) as client:
        watch = client.watch_trust_bundle()
        await server.service.updates.put(ca_pb2.GetTrustBundleResponse(trust_domain="a.test"))
        first = await watch.next()
        report = AgentReport("shop/web-1", ("r1", "r2"), "r1", "abc", 1_700_000_000)
        await asyncio.gather(watch.send(report), watch.send(report))  # serialized writes
        for _ in range(100):
            if len(server.service.reports) == 2:
                break
            await asyncio.sleep(0.01)
        await server.service.updates.put((grpc.StatusCode.PERMISSION_DENIED, "identity revoked"))
        with pytest.raises(PermissionDenied, match="identity revoked"):
            await watch.next()
        watch.cancel()
    assert first.trust_domain == "a.test"
    received = server.service.reports[0]
    assert list(received.applied_root_fingerprints) == ["r1", "r2"]
    assert received.leaf_serial_hex == "abc" and received.dataplane == "shop/web-1"


async def test_watch_ended_by_server_is_unavailable(server: Server) -> None:
    async with CaClient(server.target(), TOKEN) as client:
        watch = client.watch_trust_bundle()
        await server.service.updates.put(None)
        with pytest.raises(Unavailable, match="ended"):
            await watch.next()


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.INTERNAL, ControlPlaneError),
    ],
)
async def test_status_codes_map_to_exceptions(
    server: Server, code: grpc.StatusCode, exception: type[ControlPlaneError]
) -> None:
    server.service.aborts["RegisterDataplane"] = (code, "namespace shop is not yours")
    async with CaClient(server.target(), TOKEN) as client:
        with pytest.raises(exception, match="namespace shop is not yours") as caught:
            await client.register_dataplane("x")
    assert type(caught.value) is exception
    assert caught.value.code == code.name
    assert caught.value.retryable == (exception in (Unavailable, ControlPlaneError))


async def test_wrong_ca_is_refused_as_unavailable(server: Server) -> None:
    other = serving_tls(SERVER_NAME)
    async with CaClient(server.target(ca_pem=other.ca_pem), TOKEN, timeout=3) as client:
        with pytest.raises(Unavailable):
            await client.get_trust_bundle()
    assert server.service.metadata == []  # the token never reached an unverified server


async def test_name_mismatch_without_override_is_refused(server: Server) -> None:
    # The certificate names cp.verity.test, not 127.0.0.1.
    async with CaClient(server.target(server_name=None), TOKEN, timeout=3) as client:
        with pytest.raises(Unavailable):
            await client.get_trust_bundle()


async def test_unreachable_is_unavailable() -> None:
    tls = serving_tls(SERVER_NAME)
    target = ControlPlaneTarget(host="127.0.0.1", port=1, ca_pem=tls.ca_pem)
    async with CaClient(target, TOKEN, timeout=3) as client:
        with pytest.raises(Unavailable, match="unreachable"):
            await client.sign_certificate(b"CSR")


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_map_error_scrubs_tokens_and_keys() -> None:
    error = map_error(
        "UNAUTHENTICATED",
        "bad token vrtd_abcdefghijklmnopqrstuv; Bearer xyz\n-----BEGIN PRIVATE KEY-----\nAAA",
    )
    text = str(error)
    assert "vrtd_abc" not in text and "xyz" not in text and "AAA" not in text
    assert text.startswith("the control plane did not accept the dataplane token")
    assert "\n" not in text


def test_map_error_without_details() -> None:
    assert str(map_error("UNAVAILABLE", None)) == "the control plane is unreachable"
    assert isinstance(map_error("DEADLINE_EXCEEDED", ""), Unavailable)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cp.example:5678", ("cp.example", 5678)),
        ("cp.example", ("cp.example", 5678)),
        ("10.0.0.1:9000", ("10.0.0.1", 9000)),
        ("[::1]:5678", ("::1", 5678)),
        ("[::1]", ("::1", 5678)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":5678", "cp:0", "cp:99999", "cp:http", "::1:5678", "[::1"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_target_grpc_form_and_checks() -> None:
    tls = serving_tls(SERVER_NAME)
    assert ControlPlaneTarget(host="::1", ca_pem=tls.ca_pem).grpc_target == "[::1]:5678"
    target = ControlPlaneTarget(host="10.0.0.1", ca_pem=tls.ca_pem, server_name="cp")
    assert target.verified_name == "cp"
    with pytest.raises(ValueError, match="PEM"):
        ControlPlaneTarget(host="cp", ca_pem=b"nope")


def test_token_checks_never_quote_the_token() -> None:
    for bad in ("", "two words", "line\nbreak", "nul\0"):
        with pytest.raises(ValueError) as caught:
            check_token(bad)
        assert bad == "" or bad not in str(caught.value)
    assert check_token(TOKEN) == TOKEN


async def test_client_repr_and_logs_hide_the_token(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server.service.aborts["SignCertificate"] = (grpc.StatusCode.UNAUTHENTICATED, "expired")
    with caplog.at_level(logging.DEBUG):
        async with CaClient(server.target(), TOKEN) as client:
            with pytest.raises(Unauthenticated) as caught:
                await client.sign_certificate(b"CSR")
            assert TOKEN not in repr(client)
    assert TOKEN not in str(caught.value)
    assert TOKEN not in caplog.text
