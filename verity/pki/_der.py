"""The little DER needed to assemble a leaf certificate from precomputed parts.

Why hand-written: cryptography's CertificateBuilder converts every Python extension object
to DER on each sign, which costs as much as the ECDSA signature itself. Issuance instead
concatenates DER pieces computed once per CA (see svid.py) and lets cryptography do only the
signing. A unit test checks that the result is byte-for-byte the TBSCertificate that
CertificateBuilder produces from the same inputs. Only definite-length encodings are used.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from functools import lru_cache

SEQUENCE = 0x30
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN_TRUE = b"\x01\x01\xff"
CONTEXT_0 = 0xA0
CONTEXT_3 = 0xA3
URI_NAME = 0x86  # GeneralName [6] IA5String, implicit

# Object identifiers, already DER-encoded (tag 06, length, value).
OID_BASIC_CONSTRAINTS = bytes.fromhex("0603551d13")
OID_KEY_USAGE = bytes.fromhex("0603551d0f")
OID_EXTENDED_KEY_USAGE = bytes.fromhex("0603551d25")
OID_SUBJECT_ALT_NAME = bytes.fromhex("0603551d11")
OID_SUBJECT_KEY_ID = bytes.fromhex("0603551d0e")
OID_AUTHORITY_KEY_ID = bytes.fromhex("0603551d23")

# AlgorithmIdentifier SEQUENCEs for the leaf signature.
ALG_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ALG_ECDSA_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
ALG_RSA_PKCS1_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")

VERSION_3 = bytes.fromhex("a003020102")
EMPTY_NAME = b"\x30\x00"


def tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def positive_integer(value: int) -> bytes:
    # One extra bit of room keeps the sign bit clear, which DER requires for positives.
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@lru_cache(maxsize=256)  # under load many issuances fall in the same second
def time(moment: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, seconds, Zulu."""
    moment = moment.astimezone(UTC)
    if moment.year < 2050:
        return tlv(UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def extension(oid: bytes, critical: bool, value: bytes) -> bytes:
    return tlv(SEQUENCE, oid + (BOOLEAN_TRUE if critical else b"") + tlv(OCTET_STRING, value))


def _read_header(data: bytes, pos: int) -> tuple[int, int, int]:
    """Return (tag, content start, content end) of the element at pos."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
    start = pos + 2 + count
    return tag, start, start + length


def tbs_subject(tbs_certificate: bytes) -> bytes:
    """The subject Name of a TBSCertificate, byte-exact (a leaf's issuer must match it)."""
    _, pos, _ = _read_header(tbs_certificate, 0)
    tag, _, end = _read_header(tbs_certificate, pos)
    if tag == CONTEXT_0:  # explicit version; absent in v1 certificates
        pos = end
    for _ in range(4):  # serialNumber, signature, issuer, validity
        _, _, pos = _read_header(tbs_certificate, pos)
    _, _, end = _read_header(tbs_certificate, pos)
    return tbs_certificate[pos:end]


def spki_key_bits(subject_public_key_info: bytes) -> bytes:
    """The subjectPublicKey BIT STRING's bits, which RFC 5280 4.2.1.2 (1) hashes into a key id."""
    _, pos, _ = _read_header(subject_public_key_info, 0)
    _, _, pos = _read_header(subject_public_key_info, pos)  # skip the AlgorithmIdentifier
    _, start, end = _read_header(subject_public_key_info, pos)
    return subject_public_key_info[start + 1 : end]  # first content byte: unused-bit count


def pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        f"-----BEGIN {label}-----\n".encode()
        + b"\n".join(lines)
        + f"\n-----END {label}-----\n".encode()
    )
