"""Exceptions of the PKI core; each message says precisely what was refused and why."""

from __future__ import annotations


class PkiError(Exception):
    """Base of every error raised by verity.pki."""


class InvalidSpiffeId(PkiError, ValueError):
    """A string or parts that do not form a Verity SPIFFE ID."""


class InvalidCA(PkiError):
    """A provided (or unsealed) CA certificate/key that cannot be used."""


class InvalidCSR(PkiError):
    """A certificate signing request refused before anything was signed."""


class IssuanceRefused(PkiError):
    """The CA will not issue: expired CA, foreign trust domain, bad validity."""


class IdentityRevoked(IssuanceRefused):
    """The identity asked for is on the revocation list."""


class KEKError(PkiError):
    """The key-encryption key could not be loaded or created safely."""


class SealError(PkiError):
    """A sealed CA blob could not be opened (wrong KEK, wrong mesh, corrupted)."""


class BundleError(PkiError):
    """A trust bundle would be empty, hold a non-root, or a duplicate."""


class RotationError(PkiError):
    """A root-rotation step was asked for out of order or before it is safe."""
