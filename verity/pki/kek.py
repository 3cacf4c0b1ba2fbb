"""The key-encryption key (KEK) and sealing a CA under it.

Several control-plane replicas share one CA through the store, where the CA sits sealed:
AES-256-GCM under a 32-byte KEK, with associated data binding the blob to its mesh name (a
blob copied to another mesh's row does not open). The KEK itself never enters the store: it
comes from the VERITY_KEK environment variable (base64 of 32 bytes) or a file readable by
its owner only (0600 or stricter), which can be generated on first start.

Sealed blob layout: MAGIC (4 bytes, format version) | nonce (12 bytes) | ciphertext+tag.
The plaintext is JSON with the CA kind, mesh, trust domain, certificate chain (signing
certificate first, root last) and the PKCS#8 key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from verity.pki.ca import CAKind, CertificateAuthority
from verity.pki.errors import InvalidCA, KEKError, SealError
from verity.pki.keys import accepted_private_key

KEK_ENV_VAR = "VERITY_KEK"
KEK_BYTES = 32
MAGIC = b"VSC1"
NONCE_BYTES = 12
_ASSOCIATED_DATA_PREFIX = MAGIC + b" verity sealed CA; mesh="


class Kek:
    """A 256-bit key-encryption key. repr shows only a short id derived from it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_BYTES:
            raise KEKError(f"a KEK must be {KEK_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    @property
    def key_id(self) -> str:
        """Stable, non-secret id (a domain-separated hash) to tell KEKs apart in logs."""
        return hashlib.sha256(b"verity kek id\x00" + self._key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Kek(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a KEK cannot be pickled")

    def _aead(self) -> AESGCM:
        return AESGCM(self._key)


def _decode_kek(text: str, source: str) -> Kek:
    # Error messages name the source only: never echo the (possibly almost right) secret.
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KEKError(f"{source} is not valid base64") from None
    if len(raw) != KEK_BYTES:
        raise KEKError(f"{source} must decode to {KEK_BYTES} bytes, it decodes to {len(raw)}")
    return Kek(raw)


def kek_from_env(environ: Mapping[str, str]) -> Kek | None:
    """The KEK from VERITY_KEK, None when unset. Set-but-empty is an error, not 'unset'."""
    value = environ.get(KEK_ENV_VAR)
    if value is None:
        return None
    if not value.strip():
        raise KEKError(f"{KEK_ENV_VAR} is set but empty")
    return _decode_kek(value, KEK_ENV_VAR)


def load_kek_file(path: Path) -> Kek:
    """Read a KEK file; refuse it if group or others have any access, or the owner exec bit."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KEKError(f"KEK file {path} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        # fstat on the opened file, so a swapped path cannot pass the check for another file.
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o177:
            raise KEKError(
                f"KEK file {path} has mode {mode:04o}; it must be 0600 or stricter "
                f"(run: chmod 600 {path})"
            )
        content = handle.read(4096)
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        raise KEKError(f"KEK file {path} is not base64 text") from None
    return _decode_kek(text, f"KEK file {path}")


def generate_kek_file(path: Path) -> Kek:
    """Create `path` (mode 0600) holding a new random KEK; refuse if it already exists.

    Written to a temporary file first and hard-linked into place, so a replica racing on
    the same path either sees no file or a complete one.
    """
    key = secrets.token_bytes(KEK_BYTES)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise KEKError(f"KEK file {path} already exists; not overwriting it") from None
    finally:
        temporary.unlink(missing_ok=True)
    return Kek(key)


def load_kek(
    environ: Mapping[str, str], path: Path | None = None, *, generate_if_missing: bool = False
) -> Kek:
    """VERITY_KEK if set, else the file at `path`, else (if allowed) a new file at `path`."""
    from_env = kek_from_env(environ)
    if from_env is not None:
        return from_env
    if path is None:
        raise KEKError(f"no KEK: set {KEK_ENV_VAR} or configure a KEK file")
    if path.exists() or not generate_if_missing:
        return load_kek_file(path)
    try:
        return generate_kek_file(path)
    except KEKError:
        return load_kek_file(path)  # another replica created it first


# --- sealing ---------------------------------------------------------------------------


def _associated_data(mesh: str) -> bytes:
    return _ASSOCIATED_DATA_PREFIX + mesh.encode("utf-8")


def seal_ca(ca: CertificateAuthority, kek: Kek) -> bytes:
    """Encrypt the CA (certificates and key) for the store, bound to the CA's mesh."""
    chain = [ca.certificate]
    if ca.certificate != ca.root:
        chain += [*ca.intermediates, ca.root]
    payload: dict[str, Any] = {
        "kind": ca.kind.value,
        "mesh": ca.mesh,
        "trust_domain": ca.trust_domain,
        "chain": [c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain],
        "key": base64.b64encode(ca._private_key_pkcs8_der()).decode("ascii"),
        "warnings": list(ca.warnings),
    }
    nonce = secrets.token_bytes(NONCE_BYTES)
    plaintext = json.dumps(payload).encode("utf-8")
    return MAGIC + nonce + kek._aead().encrypt(nonce, plaintext, _associated_data(ca.mesh))


def unseal_ca(blob: bytes, kek: Kek, mesh: str) -> CertificateAuthority:
    """Open a sealed CA for `mesh`; SealError if the KEK or mesh is wrong or the blob altered."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise SealError("not a sealed CA (unknown format or truncated)")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        plaintext = kek._aead().decrypt(
            nonce, blob[len(MAGIC) + NONCE_BYTES :], _associated_data(mesh)
        )
    except InvalidTag:
        raise SealError(
            f"sealed CA does not open for mesh {mesh!r}: wrong KEK, wrong mesh, or altered data"
        ) from None
    return _ca_from_payload(json.loads(plaintext), mesh)


def _ca_from_payload(payload: dict[str, Any], mesh: str) -> CertificateAuthority:
    if payload.get("mesh") != mesh:
        raise SealError(f"sealed CA belongs to mesh {payload.get('mesh')!r}, not {mesh!r}")
    chain = [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in payload["chain"]]
    key = serialization.load_der_private_key(base64.b64decode(payload["key"]), password=None)
    try:
        return CertificateAuthority(
            kind=CAKind(payload["kind"]),
            mesh=mesh,
            trust_domain=payload["trust_domain"],
            certificate=chain[0],
            intermediates=chain[1:-1],
            root=chain[-1],
            private_key=accepted_private_key(key),
            warnings=payload.get("warnings", []),
        )
    except (ValueError, InvalidCA) as exc:
        raise SealError(f"sealed CA is not usable: {exc}") from None
