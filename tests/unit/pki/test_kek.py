"""Sealing the CA under a KEK, and loading the KEK from the environment or a 0600 file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from tests.unit.pki.helpers import (
    NOW,
    TRUST_DOMAIN,
    Issuer,
    cert_pem,
    crypto_verify,
    ec_key,
    key_pem,
    make_ca_cert,
    make_csr,
)
from verity.pki import (
    CertificateAuthority,
    Kek,
    KEKError,
    SealError,
    SpiffeId,
    generate_kek_file,
    issue_svid,
    kek_from_env,
    load_kek,
    load_kek_file,
    load_provided_ca,
    seal_ca,
    unseal_ca,
)

KEK = Kek(bytes(range(32)))
KEY_MARKERS = (b"PRIVATE KEY", b"BEGIN EC", b"BEGIN RSA")


def _assert_same_ca(left: CertificateAuthority, right: CertificateAuthority) -> None:
    assert (left.kind, left.mesh, left.trust_domain) == (right.kind, right.mesh, right.trust_domain)
    assert left.fingerprint_sha256 == right.fingerprint_sha256
    assert left.root == right.root and left.intermediates == right.intermediates


def test_seal_unseal_round_trip_and_the_unsealed_ca_still_signs(ca: CertificateAuthority) -> None:
    opened = unseal_ca(seal_ca(ca, KEK), KEK, "default")
    _assert_same_ca(opened, ca)
    identity = SpiffeId(TRUST_DOMAIN, "default", "web")
    issued = issue_svid(opened, make_csr(ec_key()), identity, NOW)
    crypto_verify(ca.trust_bundle.certificates, issued.cert_pem)  # same key as the original


def test_provided_intermediate_round_trips_with_its_chain() -> None:
    root_key, key = ec_key(), ec_key()
    root = Issuer(make_ca_cert("Root", root_key), root_key)
    intermediate = make_ca_cert("Intermediate", key, issuer=root)
    provided = load_provided_ca(
        "default", TRUST_DOMAIN, cert_pem(intermediate, root.certificate), key_pem(key), NOW
    )
    _assert_same_ca(unseal_ca(seal_ca(provided, KEK), KEK, "default"), provided)


def test_sealing_is_randomized(ca: CertificateAuthority) -> None:
    assert seal_ca(ca, KEK) != seal_ca(ca, KEK)


def test_wrong_kek_fails(ca: CertificateAuthority) -> None:
    with pytest.raises(SealError, match="wrong KEK, wrong mesh, or altered data"):
        unseal_ca(seal_ca(ca, KEK), Kek(bytes(32)), "default")


def test_wrong_mesh_fails(ca: CertificateAuthority) -> None:
    with pytest.raises(SealError, match="does not open for mesh 'other'"):
        unseal_ca(seal_ca(ca, KEK), KEK, "other")


def test_altered_blob_fails(ca: CertificateAuthority) -> None:
    blob = bytearray(seal_ca(ca, KEK))
    blob[40] ^= 0x01
    with pytest.raises(SealError):
        unseal_ca(bytes(blob), KEK, "default")
    with pytest.raises(SealError, match="not a sealed CA"):
        unseal_ca(b"junk", KEK, "default")


def test_no_key_material_in_repr_str_or_blob(ca: CertificateAuthority) -> None:
    blob = seal_ca(ca, KEK)
    for text in (repr(ca), str(ca), repr(blob), str(blob), repr(KEK), str(KEK)):
        assert "PRIVATE KEY" not in text
    assert all(marker not in blob for marker in KEY_MARKERS)
    assert ca.fingerprint_sha256 in repr(ca)
    assert base64.b64encode(bytes(range(32))).decode() not in repr(KEK)
    assert bytes(range(32)).hex() not in repr(KEK)


def test_ca_cannot_be_pickled(ca: CertificateAuthority) -> None:
    import pickle

    with pytest.raises(TypeError, match="seal it"):
        pickle.dumps(ca)


# --- KEK loading ---------------------------------------------------------------------------

ENCODED = base64.b64encode(bytes(range(32))).decode()


def test_kek_from_env() -> None:
    assert kek_from_env({}) is None
    kek = kek_from_env({"VERITY_KEK": ENCODED})
    assert kek is not None and kek.key_id == KEK.key_id


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "set but empty"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(16)).decode(), "must decode to 32 bytes, it decodes to 16"),
    ],
)
def test_bad_env_kek_refused_without_echoing_it(value: str, reason: str) -> None:
    with pytest.raises(KEKError, match=reason) as caught:
        kek_from_env({"VERITY_KEK": value})
    assert not value or value not in str(caught.value)


def _write(path: Path, content: str, mode: int) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_kek_file_0600_or_stricter_loads(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "kek", ENCODED + "\n", mode)
    assert load_kek_file(path).key_id == KEK.key_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700])
def test_kek_file_with_wider_mode_refused_with_the_reason(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "kek", ENCODED, mode)
    with pytest.raises(KEKError) as caught:
        load_kek_file(path)
    assert f"has mode {mode:04o}; it must be 0600 or stricter" in str(caught.value)


def test_kek_file_with_bad_content_refused(tmp_path: Path) -> None:
    with pytest.raises(KEKError, match="must decode to 32 bytes"):
        load_kek_file(_write(tmp_path / "kek", base64.b64encode(b"short").decode(), 0o600))
    with pytest.raises(KEKError, match="cannot be opened"):
        load_kek_file(tmp_path / "missing")


def test_generated_kek_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        kek = generate_kek_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_kek_file(path).key_id == kek.key_id
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(KEKError, match="already exists"):
        generate_kek_file(path)


def test_load_kek_precedence_and_generation(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    with pytest.raises(KEKError, match="no KEK"):
        load_kek({})
    with pytest.raises(KEKError, match="cannot be opened"):
        load_kek({}, path)
    generated = load_kek({}, path, generate_if_missing=True)
    assert load_kek({}, path, generate_if_missing=True).key_id == generated.key_id
    assert load_kek({"VERITY_KEK": ENCODED}, path).key_id == KEK.key_id  # env wins


def test_kek_must_be_32_bytes() -> None:
    with pytest.raises(KEKError, match="must be 32 bytes"):
        Kek(bytes(31))
