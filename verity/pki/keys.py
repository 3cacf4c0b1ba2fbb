"""Which public-key and hash algorithms Verity accepts, for CA keys and workload keys alike.

Accepted: ECDSA on P-256 or P-384, RSA from 2048 to 8192 bits with exponent >= 65537.
Envoy (BoringSSL) verifies all of these on both sides of a TLS handshake. The RSA upper bound
keeps one CSR from costing the control plane a very long signature check.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MIN_RSA_EXPONENT = 65537
ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

AcceptedPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
AcceptedPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def key_problem(key: object) -> str | None:
    """Why this public key is not accepted, or None when it is."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ACCEPTED_CURVES):
            return None
        return f"EC curve {key.curve.name} is not accepted (use P-256 or P-384)"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
        if key.key_size > MAX_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too large (maximum {MAX_RSA_BITS})"
        if key.public_numbers().e < MIN_RSA_EXPONENT:
            return f"RSA public exponent below {MIN_RSA_EXPONENT} is not accepted"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return (
            "Ed25519 keys are not accepted: Envoy (BoringSSL) supports Ed25519 client "
            "certificates poorly; use ECDSA P-256"
        )
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448 keys are not accepted: Envoy (BoringSSL) does not support them"
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA keys are not accepted"
    return f"{type(key).__name__} keys are not accepted"


def hash_problem(algorithm: hashes.HashAlgorithm | None) -> str | None:
    """Why a signature made with this hash is not accepted, or None when it is."""
    if isinstance(algorithm, ACCEPTED_HASHES):
        return None
    name = "no hash" if algorithm is None else algorithm.name.upper()
    return f"signature uses {name}, which is not accepted (use SHA-256 or stronger)"


def accepted_private_key(key: PrivateKeyTypes) -> AcceptedPrivateKey:
    """Narrow a loaded private key to the accepted types, or raise ValueError with the reason."""
    problem = key_problem(key.public_key())
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{type(key).__name__} keys are not accepted")
    return key
