"""End to end: the CA service of a real control-plane process over TLS, dataplane tokens,
revocation, provided CAs and root rotation gated on connected agents."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from tests.support import ControlPlane, running_control_plane
from verity.protocol import ca_pb2, ca_pb2_grpc

DATAPLANE = """\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata:
  name: invoices-1
  namespace: shop
spec:
  service: invoices
  serviceAccount: {sa}
  address: 127.0.0.1
  inbound:
  - {{port: 18080, appPort: 8080, protocol: http}}
"""


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_control_plane(tmp_path_factory.mktemp("identity")) as plane:
        yield plane


def dataplane_token(cp: ControlPlane, sa: str, *extra: str) -> str:
    result = cp.cli(
        [
            "token",
            "create",
            "dataplane",
            "--mesh",
            "default",
            "--namespace",
            "shop",
            "--service-account",
            sa,
            *extra,
        ]
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("vrtd_")
    return token


def csr_for(uri: str, *, ca: bool = False) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A CSR that asks for whatever the test wants: the CA must ignore all of it."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri), x509.DNSName("evil.example")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key


def channel(cp: ControlPlane) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    return grpc.aio.secure_channel(cp.grpc_target, creds)


async def sign(cp: ControlPlane, token: str | None, csr: bytes) -> ca_pb2.SignCertificateResponse:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    async with channel(cp) as ch:
        stub = ca_pb2_grpc.CertificateServiceStub(ch)
        reply: ca_pb2.SignCertificateResponse = await stub.SignCertificate(
            ca_pb2.SignCertificateRequest(csr_pem=csr), metadata=metadata, timeout=10
        )
    return reply


async def status_of(call: asyncio.Future[object] | object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_token_identity_wins_over_the_csr(cp: ControlPlane, tmp_path: Path) -> None:
    token = dataplane_token(cp, "invoices")
    csr, _ = csr_for("spiffe://cluster.local/ns/kube-system/sa/admin", ca=True)
    reply = await sign(cp, token, csr)
    assert reply.spiffe_id == "spiffe://cluster.local/ns/shop/sa/invoices"
    leaf = x509.load_pem_x509_certificate(reply.certificate_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [
        reply.spiffe_id
    ]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # Two independent verifiers of the chain against the trust bundle.
    roots = x509.load_pem_x509_certificates(reply.trust_bundle_pem)
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert [str(u.value) for u in verified.subjects or []] == [reply.spiffe_id]
    (tmp_path / "bundle.pem").write_bytes(reply.trust_bundle_pem)
    (tmp_path / "leaf.pem").write_bytes(reply.certificate_pem)
    check = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "bundle.pem"),
            "-purpose",
            "sslclient",
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    lifetime = reply.not_after_unix - reply.not_before_unix
    assert 24 * 3600 <= lifetime <= 24 * 3600 + 600  # mesh default 24 h plus clock-skew backdating


async def test_bad_tokens_are_unauthenticated(cp: ControlPlane) -> None:
    csr, _ = csr_for("spiffe://cluster.local/ns/shop/sa/items")
    assert await status_of(sign(cp, None, csr)) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(sign(cp, "vrtd_" + "x" * 40, csr)) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(sign(cp, cp.admin_token, csr)) == grpc.StatusCode.UNAUTHENTICATED
    short = dataplane_token(cp, "items", "--valid-for", "1s")
    await asyncio.sleep(1.2)
    assert await status_of(sign(cp, short, csr)) == grpc.StatusCode.UNAUTHENTICATED
    revoked = dataplane_token(cp, "items", "--name", "items-revoked")
    assert cp.cli(["token", "revoke", "items-revoked"]).returncode == 0
    assert await status_of(sign(cp, revoked, csr)) == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_csr_is_invalid_argument(cp: ControlPlane) -> None:
    token = dataplane_token(cp, "users")
    assert await status_of(sign(cp, token, b"not a csr")) == grpc.StatusCode.INVALID_ARGUMENT


async def test_register_only_own_identity(cp: ControlPlane) -> None:
    token = dataplane_token(cp, "invoices")
    async with channel(cp) as ch:
        stub = ca_pb2_grpc.CertificateServiceStub(ch)
        meta = [("authorization", f"Bearer {token}")]
        ok = await stub.RegisterDataplane(
            ca_pb2.RegisterDataplaneRequest(dataplane_yaml=DATAPLANE.format(sa="invoices")),
            metadata=meta,
        )
        assert (ok.namespace, ok.name) == ("shop", "invoices-1")
        other = stub.RegisterDataplane(
            ca_pb2.RegisterDataplaneRequest(dataplane_yaml=DATAPLANE.format(sa="items")),
            metadata=meta,
        )
        assert await status_of(other) == grpc.StatusCode.PERMISSION_DENIED
    listed = json.loads(cp.cli(["get", "dp", "invoices-1", "-n", "shop", "-o", "json"]).stdout)
    assert listed["spec"]["serviceAccount"] == "invoices"


async def test_revoked_identity_gets_no_certificate(cp: ControlPlane) -> None:
    token = dataplane_token(cp, "revokee")
    csr, _ = csr_for("spiffe://cluster.local/ns/shop/sa/revokee")
    await sign(cp, token, csr)
    result = cp.cli(
        [
            "identity",
            "revoke",
            "spiffe://cluster.local/ns/shop/sa/revokee",
            "--reason",
            "key leaked",
        ]
    )
    assert result.returncode == 0, result.stderr
    # Its tokens are revoked too, so even a token made before cannot authenticate any more...
    assert await status_of(sign(cp, token, csr)) == grpc.StatusCode.UNAUTHENTICATED
    # ...and a token made after the revocation is refused at issuance.
    fresh = dataplane_token(cp, "revokee")
    assert await status_of(sign(cp, fresh, csr)) == grpc.StatusCode.PERMISSION_DENIED
    shown = json.loads(cp.cli(["get", "revocationlist", "default", "-o", "json"]).stdout)
    assert shown["spec"]["identities"][0]["spiffeId"].endswith("/sa/revokee")


def test_ca_show_has_roots_and_no_key(cp: ControlPlane) -> None:
    shown = cp.cli(["ca", "show", "--mesh", "default"])
    assert shown.returncode == 0, shown.stderr
    assert "rotation stage: STABLE" in shown.stdout and "signing" in shown.stdout
    as_json = cp.cli(["ca", "show", "-o", "json"]).stdout
    assert "BEGIN CERTIFICATE" in as_json and "PRIVATE KEY" not in as_json
    database = (cp.data_dir / "verity.db").read_bytes()
    assert b"PRIVATE KEY" not in database


def test_ca_survives_restart(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as plane:
        before = json.loads(plane.cli(["ca", "show", "-o", "json"]).stdout)
        plane.stop()
        plane.start()
        after = json.loads(plane.cli(["ca", "show", "-o", "json"]).stdout)
    assert after["signingRootFingerprint"] == before["signingRootFingerprint"]


def _provided_ca(tmp_path: Path, *, is_ca: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Mesh Root")])
    start = datetime.now(UTC) - timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, is_ca, is_ca, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


PROVIDED_MESH = """\
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata: {{name: {name}}}
spec:
  trustDomain: {name}.corp
  ca:
    backend: provided
    provided: {{certFile: {cert}, keyFile: {key}}}
"""


async def test_provided_ca_issues_and_bad_one_is_refused(cp: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    bad_cert, bad_key = _provided_ca(tmp_path / "bad", is_ca=False)
    refused = cp.cli(
        ["apply", "-f", "-"], stdin=PROVIDED_MESH.format(name="bad", cert=bad_cert, key=bad_key)
    )
    assert refused.returncode == 1
    assert "not a CA" in refused.stderr, refused.stderr
    cert, key = _provided_ca(tmp_path, is_ca=True)
    applied = cp.cli(
        ["apply", "-f", "-"], stdin=PROVIDED_MESH.format(name="corp", cert=cert, key=key)
    )
    assert applied.returncode == 0, applied.stderr
    token = cp.cli(
        [
            "token",
            "create",
            "dataplane",
            "--mesh",
            "corp",
            "--namespace",
            "shop",
            "--service-account",
            "users",
        ]
    ).stdout.strip()
    reply = await sign(cp, token, csr_for("spiffe://x/ns/a/sa/b")[0])
    assert reply.spiffe_id == "spiffe://corp.corp/ns/shop/sa/users"
    leaf = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert leaf.issuer == x509.load_pem_x509_certificate(cert.read_bytes()).subject
    # Meshes do not trust each other: the default mesh's bundle does not verify this leaf.
    default_bundle = json.loads(cp.cli(["ca", "show", "-o", "json"]).stdout)["roots"]
    roots = [x509.load_pem_x509_certificate(r["certificatePem"].encode()) for r in default_bundle]
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store(roots)).build_client_verifier().verify(leaf, [])


async def _report_stream(
    reports: asyncio.Queue[ca_pb2.AgentReport | None],
) -> AsyncIterator[ca_pb2.AgentReport]:
    while (report := await reports.get()) is not None:
        yield report


async def test_rotation_waits_for_connected_agents(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as plane:
        token = dataplane_token(plane, "invoices")
        reports: asyncio.Queue[ca_pb2.AgentReport | None] = asyncio.Queue()
        async with channel(plane) as ch:
            stub = ca_pb2_grpc.CertificateServiceStub(ch)
            call = stub.WatchTrustBundle(
                _report_stream(reports), metadata=[("authorization", f"Bearer {token}")]
            )
            first = await call.read()
            assert first.bundle.rotation_stage == "STABLE"
            old_root = first.bundle.signing_root_fingerprint

            step = await asyncio.to_thread(plane.cli, ["ca", "rotate", "--step"])
            assert "NEW_ROOT_ADDED" in step.stdout, step.stderr
            update = await call.read()
            assert update.bundle.rotation_stage == "NEW_ROOT_ADDED"
            bundle = x509.load_pem_x509_certificates(update.bundle.trust_bundle_pem)
            assert len(bundle) == 2

            blocked = await asyncio.to_thread(
                plane.cli, ["ca", "rotate", "--step", "--timeout", "1s"]
            )
            assert blocked.returncode == 1 and "did not reach every proxy" in blocked.stderr
            assert "0/1 proxies applied" in blocked.stdout

            fingerprints = [
                x509.load_pem_x509_certificate(c.public_bytes(serialization.Encoding.PEM))
                .fingerprint(hashes.SHA256())
                .hex()
                for c in bundle
            ]
            await reports.put(
                ca_pb2.AgentReport(
                    dataplane="shop/invoices-1",
                    applied_root_fingerprints=fingerprints,
                    leaf_root_fingerprint=old_root,
                )
            )
            await asyncio.sleep(0.3)
            reissue = await asyncio.to_thread(plane.cli, ["ca", "rotate", "--step"])
            assert "REISSUING" in reissue.stdout, reissue.stderr
            update = await call.read()
            new_root = update.bundle.signing_root_fingerprint
            assert new_root != old_root
            await reports.put(
                ca_pb2.AgentReport(
                    dataplane="shop/invoices-1",
                    applied_root_fingerprints=fingerprints,
                    leaf_root_fingerprint=new_root,
                )
            )
            await asyncio.sleep(0.3)
            removed = await asyncio.to_thread(plane.cli, ["ca", "rotate", "--step"])
            assert "OLD_ROOT_REMOVED" in removed.stdout, removed.stderr
            update = await call.read()
            assert len(x509.load_pem_x509_certificates(update.bundle.trust_bundle_pem)) == 1
            await reports.put(
                ca_pb2.AgentReport(
                    dataplane="shop/invoices-1",
                    applied_root_fingerprints=[new_root],
                    leaf_root_fingerprint=new_root,
                )
            )
            await asyncio.sleep(0.3)
            done = await asyncio.to_thread(plane.cli, ["ca", "rotate", "--step"])
            assert "STABLE" in done.stdout, done.stderr
            await reports.put(None)
            call.cancel()
        shown = json.loads(plane.cli(["ca", "show", "-o", "json"]).stdout)
        assert shown["signingRootFingerprint"] == new_root and len(shown["roots"]) == 1


def test_full_rotation_without_agents_runs_every_stage(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as plane:
        result = plane.cli(["ca", "rotate"])
        assert result.returncode == 0, result.stderr
        stages = [line.split()[1].rstrip(":") for line in result.stdout.splitlines()]
        assert stages == ["NEW_ROOT_ADDED", "REISSUING", "OLD_ROOT_REMOVED", "STABLE"]


def test_logs_hold_no_keys_or_tokens(cp: ControlPlane) -> None:
    token = dataplane_token(cp, "logcheck")
    asyncio.run(sign(cp, token, csr_for("spiffe://cluster.local/ns/shop/sa/logcheck")[0]))
    text = cp.log_path.read_text()
    assert "certificate issued" in text
    assert "PRIVATE KEY" not in text
    assert token not in text and cp.admin_token not in text
    assert "vrtd_" not in text and "vrtu_" not in text
