from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.pki.helpers import NOW, TRUST_DOMAIN, Issuer, ec_key, make_ca_cert
from verity.pki import BundleError, CertificateAuthority, TrustBundle, generate_builtin_ca


@pytest.fixture(scope="module")
def second(ca: CertificateAuthority) -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW, validity=timedelta(days=30))


def test_bundle_of_one_root(ca: CertificateAuthority) -> None:
    bundle = ca.trust_bundle
    assert bundle.trust_domain == TRUST_DOMAIN
    assert bundle.certificates == (ca.root,)
    assert bundle.pem == ca.certificate_pem
    assert bundle.fingerprints == (ca.root_fingerprint_sha256,)
    assert bundle.not_after == ca.root.not_valid_after_utc


def test_fingerprint_matches_openssl(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_bytes(ca.trust_bundle.pem)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(tmp_path / "root.pem")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().split("=", 1)[1].replace(":", "").lower() == ca.root_fingerprint_sha256


def test_two_roots_add_remove_and_pem_round_trip(
    ca: CertificateAuthority, second: CertificateAuthority
) -> None:
    both = ca.trust_bundle.with_root(second.root)
    assert both.fingerprints == (ca.root_fingerprint_sha256, second.root_fingerprint_sha256)
    assert both.not_after == second.root.not_valid_after_utc  # the earlier expiry
    assert TrustBundle.from_pem(TRUST_DOMAIN, both.pem) == both
    assert both.pems == (ca.certificate_pem, second.certificate_pem)
    only_second = both.without_root(ca.root_fingerprint_sha256)
    assert only_second.certificates == (second.root,)
    assert both.contains(ca.root_fingerprint_sha256)
    assert not only_second.contains(ca.root_fingerprint_sha256)


def test_bundle_invariants(ca: CertificateAuthority) -> None:
    with pytest.raises(BundleError, match="at least one root"):
        TrustBundle.of(TRUST_DOMAIN)
    with pytest.raises(BundleError, match="at least one root"):
        ca.trust_bundle.without_root(ca.root_fingerprint_sha256)
    with pytest.raises(BundleError, match="present twice"):
        ca.trust_bundle.with_root(ca.root)
    with pytest.raises(BundleError, match="holds no root"):
        ca.trust_bundle.without_root("00" * 32)


def test_non_roots_refused(ca: CertificateAuthority) -> None:
    leaf_key, intermediate_key = ec_key(), ec_key()
    with pytest.raises(BundleError, match="is not a CA"):
        TrustBundle.of(TRUST_DOMAIN, make_ca_cert("leaf", leaf_key, ca=False))
    root_key = ec_key()
    root = Issuer(make_ca_cert("Root", root_key), root_key)
    intermediate = make_ca_cert("Intermediate", intermediate_key, issuer=root)
    with pytest.raises(BundleError, match="is not self-issued"):
        TrustBundle.of(TRUST_DOMAIN, intermediate)
    with pytest.raises(BundleError, match="could not be parsed"):
        TrustBundle.from_pem(
            TRUST_DOMAIN, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
