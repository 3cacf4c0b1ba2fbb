"""Kuma's `Mesh` and `TrafficPermission` (`kuma.io/v1alpha1`), in both of Kuma's forms.

Kubernetes form::

    apiVersion: kuma.io/v1alpha1
    kind: TrafficPermission
    mesh: default              # beside metadata and spec; the kind is cluster-scoped
    metadata: {name: invoices-to-items}
    spec: {sources: [...], destinations: [...]}

Universal form (kumactl): `type`, `name`, `mesh` and the spec fields at the top level.
Documents are stored as written; the models give them Verity's meaning: a Kuma Mesh is a
Verity Mesh (`as_verity_mesh()`), a TrafficPermission lets the source services call the
destination services (`allowed_services()`).

Kuma features Verity does not implement (Kuma secrets, tracing, logging, metrics, routing,
constraints, tags other than kuma.io/service) are refused with a reason rather than
silently ignored, so that a policy never means less than it says.
"""

from __future__ import annotations

import base64
import binascii
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from verity.resources.common import Duration, Model, NonEmptyStr, snake_case
from verity.resources.errors import Problems, describe, format_path, translate_problems
from verity.resources.metadata import dns_label_reason
from verity.resources.resource import Resource
from verity.resources.verity_kinds import MAX_CERT_VALIDITY, MIN_CERT_VALIDITY, MeshSpec

KUMA_API_VERSION = "kuma.io/v1alpha1"
SERVICE_TAG = "kuma.io/service"

KumaForm = Literal["kubernetes", "universal"]


# --- Mesh ----------------------------------------------------------------------------------


class KumaRotation(Model):
    expiration: Duration | None = None


class KumaDpCert(Model):
    """Data plane proxy certificates: `rotation.expiration` is their lifetime ("1d")."""

    rotation: KumaRotation | None = None
    request_timeout: Duration | None = None

    @model_validator(mode="after")
    def _verity_bounds(self) -> KumaDpCert:
        problems = Problems()
        expiration = self.rotation.expiration if self.rotation else None
        if expiration is not None and not MIN_CERT_VALIDITY <= expiration <= MAX_CERT_VALIDITY:
            problems.add(
                ("rotation", "expiration"),
                f"must be between 10m and {MAX_CERT_VALIDITY.days}d for Verity's certificates",
            )
        problems.raise_if_any()
        return self

    @property
    def expiration(self) -> timedelta | None:
        return self.rotation.expiration if self.rotation else None


class KumaRootChain(Model):
    request_timeout: Duration | None = None


class KumaDataSource(Model):
    """Where a provided CA's certificate or key comes from: exactly one source."""

    secret: NonEmptyStr | None = None
    file: NonEmptyStr | None = None
    inline: NonEmptyStr | None = None
    inline_string: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> KumaDataSource:
        problems = Problems()
        given = [
            n for n in ("secret", "file", "inline", "inlineString") if self._value(n) is not None
        ]
        if not given:
            problems.add((), "one of file, inline or inlineString is required")
        for name in given[1:]:
            problems.add((name,), "only one of secret, file, inline and inlineString may be set")
        if self.secret is not None:
            problems.add(
                ("secret",),
                "Kuma secrets are not supported by Verity: use file, inline or inlineString",
            )
        if self.inline is not None and self._decoded() is None:
            problems.add(("inline",), "must be base64-encoded PEM")
        problems.raise_if_any()
        return self

    def _value(self, name: str) -> str | None:
        return {
            "secret": self.secret,
            "file": self.file,
            "inline": self.inline,
            "inlineString": self.inline_string,
        }[name]

    def _decoded(self) -> str | None:
        try:
            return base64.b64decode(self.inline or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None

    def pem(self) -> str | None:
        """The PEM text when given inline (base64 or plain), else None."""
        return self._decoded() if self.inline is not None else self.inline_string


class KumaCaCert(Model):
    """The builtin CA's root: RSA key size and lifetime."""

    rsa_bits: int | None = Field(default=None, alias="RSAbits")
    expiration: Duration | None = None

    @model_validator(mode="after")
    def _supported_size(self) -> KumaCaCert:
        problems = Problems()
        if self.rsa_bits is not None and self.rsa_bits not in (2048, 3072):
            problems.add(
                ("RSAbits",), f"Verity's builtin CA supports 2048 or 3072 (got {self.rsa_bits})"
            )
        problems.raise_if_any()
        return self


class KumaBuiltinConf(Model):
    ca_cert: KumaCaCert | None = None


class KumaProvidedConf(Model):
    cert: KumaDataSource
    key: KumaDataSource

    @model_validator(mode="after")
    def _pem_contents(self) -> KumaProvidedConf:
        problems = Problems()
        for part, source, marker in (
            ("cert", self.cert, "-----BEGIN CERTIFICATE-----"),
            ("key", self.key, "PRIVATE KEY-----"),
        ):
            pem = source.pem()
            if pem is not None and marker not in pem:
                field = "inline" if source.inline is not None else "inlineString"
                problems.add(
                    (part, field),
                    f"must hold a PEM {'certificate' if part == 'cert' else 'private key'}",
                )
        problems.raise_if_any()
        return self


class KumaCABackend(Model):
    """A certificate authority the mesh may use; `conf` depends on `type`."""

    name: NonEmptyStr
    type: Literal["builtin", "provided"]
    dp_cert: KumaDpCert | None = None
    conf: dict[str, Any] | None = None
    mode: Literal["STRICT", "PERMISSIVE"] = "STRICT"
    root_chain: KumaRootChain | None = None

    @model_validator(mode="after")
    def _conf_matches_type(self) -> KumaCABackend:
        problems = Problems()
        if self.conf is None:
            if self.type == "provided":
                problems.add(("conf",), "required for a provided backend (cert and key)")
        else:
            try:
                self._typed_conf()
            except ValidationError as exc:
                problems.extend((), translate_problems(exc, ("conf",)))
        problems.raise_if_any()
        return self

    def _typed_conf(self) -> KumaBuiltinConf | KumaProvidedConf:
        model = KumaBuiltinConf if self.type == "builtin" else KumaProvidedConf
        return model.model_validate(self.conf or {})

    def builtin_conf(self) -> KumaBuiltinConf:
        return KumaBuiltinConf.model_validate(self.conf or {})

    def provided_conf(self) -> KumaProvidedConf:
        return KumaProvidedConf.model_validate(self.conf or {})


class KumaMtls(Model):
    """mTLS is on when `enabledBackend` names one of `backends`."""

    enabled_backend: str | None = None
    backends: list[KumaCABackend] = []
    skip_validation: bool = False

    @model_validator(mode="after")
    def _enabled_exists(self) -> KumaMtls:
        problems = Problems()
        names = [b.name for b in self.backends]
        for index, name in enumerate(names):
            if name in names[:index]:
                problems.add(
                    ("backends", index, "name"), f"duplicate backend name {describe(name)}"
                )
        if self.enabled_backend and self.enabled_backend not in names:
            problems.add(
                ("enabledBackend",),
                f"must name one of the backends ({', '.join(names) or 'none defined'}) "
                f"(got {describe(self.enabled_backend)})",
            )
        problems.raise_if_any()
        return self

    @property
    def enabled(self) -> KumaCABackend | None:
        return next(
            (b for b in self.backends if self.enabled_backend and b.name == self.enabled_backend),
            None,
        )


class KumaOutbound(Model):
    passthrough: bool = True


class KumaNetworking(Model):
    outbound: KumaOutbound | None = None


# Kuma Mesh fields Verity does not implement: refused, not ignored.
_UNSUPPORTED_MESH_FIELDS = (
    "tracing",
    "logging",
    "metrics",
    "routing",
    "constraints",
    "skipCreatingInitialPolicies",
    "meshServices",
)


class KumaMeshSpec(Model):
    """A Kuma Mesh's settings (its `spec`, or the top level of the universal form)."""

    mtls: KumaMtls | None = None
    networking: KumaNetworking | None = None
    tracing: Any = None
    logging: Any = None
    metrics: Any = None
    routing: Any = None
    constraints: Any = None
    skip_creating_initial_policies: Any = None
    mesh_services: Any = None

    @model_validator(mode="after")
    def _supported(self) -> KumaMeshSpec:
        problems = Problems()
        for field in _UNSUPPORTED_MESH_FIELDS:
            if getattr(self, snake_case(field)) is not None:
                problems.add((field,), "this Kuma Mesh field is not supported by Verity")
        problems.raise_if_any()
        # Every accepted Kuma mesh must have a Verity meaning; checked here, not at use.
        try:
            self.as_verity_mesh()
        except ValidationError as exc:
            for loc, reason in translate_problems(exc):
                problems.add((), f"has no Verity equivalent ({format_path(loc)}: {reason})")
        problems.raise_if_any()
        return self

    def as_verity_mesh(self) -> MeshSpec:
        """The equivalent Verity mesh settings.

        mTLS on (enabledBackend set) -> the backend's mode (STRICT by default) and default
        DENY, since Kuma then requires a TrafficPermission for every call; mTLS off ->
        DISABLE and ALLOW. The CA maps builtin -> builtin RSA (Kuma's default 2048 bits),
        provided -> provided; dpCert.rotation.expiration -> certificates.validity (else
        Verity's default 24h). Egress follows networking.outbound.passthrough (Kuma's
        default: allowed).
        """
        backend = self.mtls.enabled if self.mtls else None
        spec: dict[str, Any] = {
            "egress": {"defaultAction": "ALLOW" if self._passthrough() else "DENY"}
        }
        if backend is None:
            spec.update({"mtls": {"mode": "DISABLE"}, "authorization": {"defaultAction": "ALLOW"}})
            return MeshSpec.model_validate(spec)
        spec.update({"mtls": {"mode": backend.mode}, "authorization": {"defaultAction": "DENY"}})
        spec["ca"] = _verity_ca(backend)
        if backend.dp_cert is not None and backend.dp_cert.expiration is not None:
            spec["certificates"] = {"validity": backend.dp_cert.expiration}
        return MeshSpec.model_validate(spec)

    def _passthrough(self) -> bool:
        outbound = self.networking.outbound if self.networking else None
        return outbound.passthrough if outbound else True


def _verity_ca(backend: KumaCABackend) -> dict[str, Any]:
    if backend.type == "builtin":
        ca_cert = backend.builtin_conf().ca_cert
        bits = ca_cert.rsa_bits if ca_cert and ca_cert.rsa_bits else 2048
        return {"backend": "builtin", "builtin": {"keyType": f"RSA_{bits}"}}
    conf = backend.provided_conf()
    provided: dict[str, str] = {}
    for part, source in (("cert", conf.cert), ("key", conf.key)):
        if source.file is not None:
            provided[f"{part}File"] = source.file
        else:
            provided[f"{part}Pem"] = source.pem() or ""
    return {"backend": "provided", "provided": provided}


class KumaMesh(Resource):
    """A Kuma Mesh: stored as written, means the Verity Mesh of the same name."""

    STORE_KIND = "Mesh"
    NAMESPACED = False

    form: KumaForm
    spec: KumaMeshSpec

    def as_verity_mesh(self) -> MeshSpec:
        return self.spec.as_verity_mesh()


# --- TrafficPermission ---------------------------------------------------------------------


def check_match(match: dict[str, str]) -> dict[str, str]:
    problems = Problems()
    if SERVICE_TAG not in match:
        problems.add((), f"must have the {SERVICE_TAG} tag")
    for key, value in match.items():
        if key != SERVICE_TAG:
            problems.add((key,), f"only the {SERVICE_TAG} tag is supported by Verity")
        elif value != "*" and dns_label_reason(value):
            problems.add((key,), f"must be '*' or a Verity service name: {dns_label_reason(value)}")
    problems.raise_if_any()
    return match


class KumaSelector(Model):
    """`match: {kuma.io/service: NAME}`; '*' matches every service."""

    match: Annotated[dict[str, str], AfterValidator(check_match)]

    @property
    def service(self) -> str:
        return self.match[SERVICE_TAG]


class TrafficPermissionSpec(Model):
    """Source services allowed to call destination services."""

    sources: list[KumaSelector]
    destinations: list[KumaSelector]

    @model_validator(mode="after")
    def _not_empty(self) -> TrafficPermissionSpec:
        problems = Problems()
        for field, selectors in (("sources", self.sources), ("destinations", self.destinations)):
            if not selectors:
                problems.add((field,), "must have at least one selector")
        problems.raise_if_any()
        return self

    def allowed_services(self) -> tuple[list[str], list[str]]:
        """(source services, destination services); '*' stands for any service."""
        return ([s.service for s in self.sources], [d.service for d in self.destinations])


class TrafficPermission(Resource):
    """A Kuma TrafficPermission (cluster-scoped; belongs to `mesh`)."""

    STORE_KIND = "TrafficPermission"
    NAMESPACED = False

    form: KumaForm
    mesh: str = "default"
    spec: TrafficPermissionSpec

    def allowed_services(self) -> tuple[list[str], list[str]]:
        return self.spec.allowed_services()
