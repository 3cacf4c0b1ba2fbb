"""Verity's PKI: mesh CAs (builtin or provided), SPIFFE X.509-SVID issuance from CSRs,
trust bundles, root rotation, revocation, and sealing the CA under a key-encryption key.

Pure library code: no storage, no network, no clock (every function takes `now`). The
control plane wires it to the store and the CA service.
"""

from verity.pki.bundle import TrustBundle, TrustedRoot, fingerprint_sha256
from verity.pki.ca import (
    BACKDATE,
    DEFAULT_ROOT_VALIDITY,
    CAKind,
    CertificateAuthority,
    KeyAlgorithm,
    generate_builtin_ca,
)
from verity.pki.errors import (
    BundleError,
    IdentityRevoked,
    InvalidCA,
    InvalidCSR,
    InvalidSpiffeId,
    IssuanceRefused,
    KEKError,
    PkiError,
    RotationError,
    SealError,
)
from verity.pki.kek import (
    KEK_ENV_VAR,
    Kek,
    generate_kek_file,
    kek_from_env,
    load_kek,
    load_kek_file,
    seal_ca,
    unseal_ca,
)
from verity.pki.provided import load_provided_ca
from verity.pki.revocation import (
    RevocationList,
    ensure_not_revoked,
    identity_revoked_at,
    is_identity_revoked,
    is_serial_revoked,
    reinstate_identity,
    revoke_identity,
    revoke_serial,
)
from verity.pki.rotation import (
    RotationStage,
    RotationState,
    abort_rotation,
    add_new_root,
    advance,
    finish_rotation,
    remove_old_root,
    stable,
    start_reissuing,
)
from verity.pki.spiffe_id import SpiffeId, validate_trust_domain
from verity.pki.svid import DEFAULT_SVID_VALIDITY, IssuedSvid, issue_svid

__all__ = [
    "BACKDATE",
    "DEFAULT_ROOT_VALIDITY",
    "DEFAULT_SVID_VALIDITY",
    "KEK_ENV_VAR",
    "BundleError",
    "CAKind",
    "CertificateAuthority",
    "IdentityRevoked",
    "InvalidCA",
    "InvalidCSR",
    "InvalidSpiffeId",
    "IssuanceRefused",
    "IssuedSvid",
    "KEKError",
    "Kek",
    "KeyAlgorithm",
    "PkiError",
    "RevocationList",
    "RotationError",
    "RotationStage",
    "RotationState",
    "SealError",
    "SpiffeId",
    "TrustBundle",
    "TrustedRoot",
    "abort_rotation",
    "add_new_root",
    "advance",
    "ensure_not_revoked",
    "fingerprint_sha256",
    "finish_rotation",
    "generate_builtin_ca",
    "generate_kek_file",
    "identity_revoked_at",
    "is_identity_revoked",
    "is_serial_revoked",
    "issue_svid",
    "kek_from_env",
    "load_kek",
    "load_kek_file",
    "load_provided_ca",
    "reinstate_identity",
    "remove_old_root",
    "revoke_identity",
    "revoke_serial",
    "seal_ca",
    "stable",
    "start_reissuing",
    "unseal_ca",
    "validate_trust_domain",
]
