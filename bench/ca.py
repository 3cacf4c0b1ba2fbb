"""Benchmark of the mesh CA. A script, not a test: prints figures.

    .venv/bin/python bench/ca.py [--seconds S] [--pin CPU]

Measures, in one single-threaded process (optionally pinned to one CPU with --pin), per
CPU-second so that other load on a shared machine does not distort the figures:
- CSR -> signed X.509-SVID per second with an ECDSA P-256 CA: the real issue_svid path
  (load the CSR, verify its signature, check the key, build, sign, PEM), with a fresh
  `now` per call. P-256 CSRs are generated beforehand, so key generation is not counted;
- cryptography's raw ECDSA P-256 sign-only rate in the same run, and the ratio;
- the naive path (CertificateBuilder with extension objects, is_signature_valid), for scale;
- CSR -> signed SVID per second with an RSA-2048 CA.
Each figure is the best of three interleaved rounds. Takes about 15 s on an idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from verity.pki import (
    CertificateAuthority,
    KeyAlgorithm,
    SpiffeId,
    generate_builtin_ca,
    issue_svid,
)

IDENTITY = SpiffeId("cluster.local", "default", "web")
CSR_POOL = 2000


def pin(cpu: int | None) -> str:
    if cpu is None:
        return "one thread, not pinned"
    os.sched_setaffinity(0, {cpu})
    return f"one thread, pinned to CPU {cpu}"


def make_csrs(count: int) -> list[bytes]:
    csrs = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        csrs.append(request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return csrs


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per CPU-second over one round of about `seconds` of CPU time.

    Process CPU time, not wall time: on a shared machine the time other processes hold the
    core is not ours, and the loop is single-threaded, so this is the one-core rate.
    """
    count, start = 0, time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(50):  # check the clock every 50 operations only
            operation()
        count += 50
        now = time.process_time()
        if now >= deadline:
            return count / (now - start)


def best_rates(
    operations: dict[str, Callable[[], object]], seconds: float, rounds: int = 3
) -> dict[str, float]:
    """Best of `rounds` for each operation. Rounds are interleaved, so that a neighbour
    stealing the CPU for a while hurts every figure alike rather than one of them."""
    best = dict.fromkeys(operations, 0.0)
    for _ in range(rounds):
        for name, operation in operations.items():
            best[name] = max(best[name], rate(operation, seconds))
    return best


def naive_issue(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, csr_pem: bytes) -> bytes:
    """The straightforward path, for comparison: what issue_svid replaced."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("bad CSR")
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=24))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(IDENTITY))]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def sanity_check(ca: CertificateAuthority, csr_pem: bytes) -> None:
    """A benchmark of a broken issuer is worthless: the output must verify."""
    issued = issue_svid(ca, csr_pem, IDENTITY, datetime.now(UTC))
    verifier = PolicyBuilder().store(Store([ca.root])).build_client_verifier()
    verified = verifier.verify(issued.certificate, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(IDENTITY))]


def issuance(ca: CertificateAuthority, csrs: list[bytes]) -> Callable[[], object]:
    # 500 identities (20 namespaces), not one, so per-identity caching is not flattered.
    identities = [SpiffeId("cluster.local", f"ns{i % 20}", f"sa{i}") for i in range(500)]
    pool = itertools.cycle(zip(csrs, itertools.cycle(identities), strict=False))

    def issue_one() -> object:
        csr, identity = next(pool)
        return issue_svid(ca, csr, identity, datetime.now(UTC))

    return issue_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per round")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pin the process to this CPU")
    args = parser.parse_args()
    seconds: float = args.seconds

    pinning = pin(args.pin)
    started = time.perf_counter()
    csrs = make_csrs(CSR_POOL)
    now = datetime.now(UTC)
    ec_ca = generate_builtin_ca("bench", "cluster.local", now)
    rsa_ca = generate_builtin_ca("bench", "cluster.local", now, key_algorithm=KeyAlgorithm.RSA_2048)
    sanity_check(ec_ca, csrs[0])
    sanity_check(rsa_ca, csrs[0])

    raw_key = ec.generate_private_key(ec.SECP256R1())
    message, ecdsa = os.urandom(400), ec.ECDSA(hashes.SHA256())  # about a leaf TBS in size
    naive_pool = itertools.cycle(csrs)
    naive_key = ec.generate_private_key(ec.SECP256R1())
    rates = best_rates(
        {
            "raw": lambda: raw_key.sign(message, ecdsa),
            "ec": issuance(ec_ca, csrs),
            "naive": lambda: naive_issue(naive_key, ec_ca.certificate.subject, next(naive_pool)),
            "rsa": issuance(rsa_ca, csrs),
        },
        seconds,
    )
    raw_sign, ec_issue, naive, rsa_issue = rates["raw"], rates["ec"], rates["naive"], rates["rsa"]

    print("Verity CA benchmark")
    print(f"  command:  {shlex.join(['.venv/bin/python', 'bench/ca.py', *sys.argv[1:]])}")
    print(
        f"  platform: Python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"{backend.openssl_version_text()}, {pinning}"
    )
    print("  rates per CPU-second of one core:")
    print(f"  ECDSA P-256 CA, CSR -> signed SVID (issue_svid):  {ec_issue:>9,.0f} /s")
    print(f"  raw ECDSA P-256 sign only (cryptography):         {raw_sign:>9,.0f} /s")
    print(f"  ratio issuance / raw sign:                        {ec_issue / raw_sign:>9.2f}")
    print(f"  naive path (CertificateBuilder), for scale:       {naive:>9,.0f} /s")
    print(f"  RSA-2048 CA, CSR -> signed SVID (issue_svid):     {rsa_issue:>9,.0f} /s")
    total = time.perf_counter() - started
    print(
        f"  (best of 3 interleaved rounds of {seconds:g} CPU-s each; "
        f"{total:.0f} s wall clock in all)"
    )


if __name__ == "__main__":
    main()
