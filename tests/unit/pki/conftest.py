from __future__ import annotations

import pytest

from tests.unit.pki.helpers import NOW, TRUST_DOMAIN
from verity.pki import CertificateAuthority, KeyAlgorithm, generate_builtin_ca


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW)


@pytest.fixture(scope="session")
def rsa_ca() -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW, key_algorithm=KeyAlgorithm.RSA_2048)


@pytest.fixture(scope="session")
def p384_ca() -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW, key_algorithm=KeyAlgorithm.ECDSA_P384)
