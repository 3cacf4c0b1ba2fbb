from __future__ import annotations

import base64
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verity.dataplane.keys import (
    KeyAlgorithm,
    WorkloadKey,
    check_spiffe_id,
    csr_spiffe_id,
    scrub_key_material,
    write_private_file,
)

SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/web"


@pytest.fixture(scope="module")
def key() -> WorkloadKey:
    return WorkloadKey.generate()


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)  # the most permissive umask: files must still come out 0600
    try:
        yield
    finally:
        os.umask(previous)


def test_default_key_is_ecdsa_p256(key: WorkloadKey) -> None:
    assert key.algorithm is KeyAlgorithm.EC_P256
    assert isinstance(key.public_key, ec.EllipticCurvePublicKey)
    assert key.public_key.curve.name == "secp256r1"


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048])
def test_other_algorithms_round_trip(algorithm: KeyAlgorithm) -> None:
    key = WorkloadKey.generate(algorithm)
    again = WorkloadKey.from_pem(key.private_key_pem())
    assert again.algorithm is algorithm
    assert again.fingerprint() == key.fingerprint()


def test_csr_carries_exactly_the_spiffe_id_and_verifies(key: WorkloadKey) -> None:
    csr_pem = key.build_csr(SPIFFE_ID)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_ID]
    assert len(list(san)) == 1
    assert csr_spiffe_id(csr_pem) == SPIFFE_ID
    assert b"PRIVATE KEY" not in csr_pem


def test_csr_with_bad_signature_is_refused(key: WorkloadKey) -> None:
    csr = x509.load_pem_x509_csr(key.build_csr(SPIFFE_ID))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s value: still DER, no longer valid
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="does not verify"):
        csr_spiffe_id(forged)


def test_csr_with_extra_sans_is_refused(key: WorkloadKey) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SPIFFE_ID), x509.DNSName("web")]
            ),
            critical=False,
        )
        .sign(key._key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="exactly one SAN"):
        csr_spiffe_id(csr.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    "bad",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://",
        "spiffe://Cluster.Local/ns/a",
        "spiffe://cluster.local:443/ns/a",
        "spiffe://cluster.local/ns//sa/b",
        "spiffe://cluster.local/ns/../sa/b",
        "spiffe://cluster.local/ns/a?x=1",
        "spiffe://cluster.local/ns/a#frag",
        "spiffe://user@cluster.local/ns/a",
    ],
)
def test_malformed_spiffe_ids_are_refused(key: WorkloadKey, bad: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE ID"):
        check_spiffe_id(bad)
    with pytest.raises(ValueError):
        key.build_csr(bad)


def test_repr_and_str_hide_the_key(key: WorkloadKey) -> None:
    pem = key.private_key_pem().decode()
    body = "".join(pem.splitlines()[1:-1])
    private_value = key._key.private_numbers()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert "PRIVATE" not in text
        assert body[:20] not in text
        assert str(private_value.private_value) not in text  # type: ignore[union-attr]
        assert key.fingerprint() in text


def test_key_cannot_be_pickled(key: WorkloadKey) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)


def test_key_file_is_0600(tmp_path: Path, key: WorkloadKey, open_umask: None) -> None:
    path = tmp_path / "svid.key"
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WorkloadKey.load(path).fingerprint() == key.fingerprint()


def test_key_file_replaces_a_readable_file_with_a_private_one(
    tmp_path: Path, key: WorkloadKey, open_umask: None
) -> None:
    path = tmp_path / "svid.key"
    path.write_text("old")
    path.chmod(0o644)
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["svid.key"]  # no temporary left behind


def test_write_private_file_is_created_0600_before_any_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    seen: list[int] = []
    real_fdopen = os.fdopen

    def spy(fd: int, *args: object, **kwargs: object) -> object:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "fdopen", spy)
    write_private_file(tmp_path / "x", b"secret")
    assert seen == [0o600]


def test_unsupported_key_types_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    pem = weak.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="unsupported"):
        WorkloadKey.from_pem(pem)


def test_fingerprints_differ_between_keys(key: WorkloadKey) -> None:
    assert key.fingerprint().startswith("sha256:")
    assert key.fingerprint() != WorkloadKey.generate().fingerprint()


class TestScrub:
    key_pem = WorkloadKey.generate().private_key_pem().decode()
    body_line = key_pem.splitlines()[1]

    def test_pem_block(self) -> None:
        text = f"error: bad secret {self.key_pem} end"
        scrubbed = scrub_key_material(text)
        assert "PRIVATE KEY" not in scrubbed and self.body_line not in scrubbed
        assert scrubbed.startswith("error: bad secret") and scrubbed.endswith("end")

    def test_escaped_newlines_as_in_a_text_proto(self) -> None:
        escaped = self.key_pem.replace("\n", "\\n")
        text = f'private_key {{ inline_bytes: "{escaped}" }}'
        scrubbed = scrub_key_material(text)
        assert "PRIVATE KEY" not in scrubbed and self.body_line[:30] not in scrubbed

    def test_truncated_pem(self) -> None:
        cut = self.key_pem[: len(self.key_pem) // 2]
        assert self.body_line[:30] not in scrub_key_material(f"msg: {cut}")

    def test_json_bytes_field_is_base64(self) -> None:
        encoded = base64.b64encode(self.key_pem.encode()).decode()
        for text in (f'{{"inline_bytes": "{encoded}"}}', f'{{"inlineBytes":"{encoded}"}}'):
            assert encoded[:40] not in scrub_key_material(text)
        assert encoded[:40] not in scrub_key_material(f"raw {encoded}")

    def test_tokens(self) -> None:
        text = "authorization: Bearer abc.def-ghi and vrtd_0123456789abcdefXYZ"
        scrubbed = scrub_key_material(text)
        assert "abc.def-ghi" not in scrubbed and "vrtd_0123456789abcdefXYZ" not in scrubbed

    def test_ordinary_text_is_kept(self) -> None:
        text = "Failed to load certificate chain from <inline>: only P-256 is supported"
        assert scrub_key_material(text) == text

    def test_certificates_can_be_kept(self) -> None:
        cert_like = "MIIB" + "A" * 60
        assert cert_like in scrub_key_material(cert_like, base64_runs=False)
        assert cert_like not in scrub_key_material(cert_like)
