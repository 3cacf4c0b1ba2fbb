"""Verity's own kinds (`verity.dev/v1alpha1`): `Mesh` and `Dataplane`.

A Mesh (cluster-scoped) holds the mesh-wide security settings::

    spec:
      trustDomain: cluster.local          # SPIFFE trust domain of the mesh's identities
      trustDomainAliases: []              # other trust domains treated as this one
      rootNamespace: verity-system        # mesh-wide policies live in this namespace
      mtls: {mode: STRICT}                # STRICT | PERMISSIVE | DISABLE (mesh default)
      ca:
        backend: builtin                  # builtin | provided
        builtin: {keyType: ECDSA_P256}    # ECDSA_P256 | RSA_2048 | RSA_3072
        provided: {certFile | certPem, keyFile | keyPem}
      certificates: {validity: 24h, renewBefore: 8h}   # renewBefore defaults to validity/3
      authorization:
        defaultAction: DENY               # when no ALLOW policy selects a workload
        providers: [...]                  # ext-authz providers for CUSTOM policies
      egress: {defaultAction: DENY}       # traffic to destinations outside the mesh
      tls: {minVersion: TLSv1_2, maxVersion: TLSv1_3, cipherSuites: [...]}

A Dataplane (namespaced: its namespace is the workload's namespace) registers one workload
instance: see DataplaneSpec.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, model_validator

from verity.resources.common import (
    Address,
    Duration,
    HeaderName,
    Model,
    NonEmptyStr,
    Port,
    WildcardStr,
    duplicates,
    format_duration,
    is_hostname,
)
from verity.resources.errors import Problems, describe
from verity.resources.metadata import DnsLabel, Labels, Name, dns_label_reason
from verity.resources.resource import Resource

VERITY_API_VERSION = "verity.dev/v1alpha1"

MIN_CERT_VALIDITY = timedelta(minutes=10)
MAX_CERT_VALIDITY = timedelta(days=90)

# TLS 1.2 suites Envoy (BoringSSL) accepts that are forward secret and AEAD. TLS 1.3 suites
# are not configurable in Envoy: they are always on.
MODERN_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
_TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
_TLS_ORDER = {"TLSv1_2": 2, "TLSv1_3": 3}

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PROVIDER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_HTTP_STATUS = re.compile(r"^[1-5][0-9][0-9]$")

MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
Action = Literal["DENY", "ALLOW"]
TlsVersion = Literal["TLSv1_2", "TLSv1_3"]
Protocol = Literal["http", "http2", "grpc", "tcp"]


def check_trust_domain(value: str) -> str:
    if not value or len(value) > 255 or not _TRUST_DOMAIN.fullmatch(value):
        raise ValueError(
            "must be a SPIFFE trust domain: 1 to 255 lowercase letters, digits, '.', '-' "
            f"and '_' (got {describe(value)})"
        )
    return value


TrustDomain = Annotated[str, AfterValidator(check_trust_domain)]


# --- Mesh ----------------------------------------------------------------------------------


class MeshMtls(Model):
    """Mesh-wide default mTLS mode; PeerAuthentication overrides it per namespace/workload."""

    mode: MtlsMode = "STRICT"


class BuiltinCA(Model):
    """The control plane generates and keeps the root: its key type."""

    key_type: Literal["ECDSA_P256", "RSA_2048", "RSA_3072"] = "ECDSA_P256"


class ProvidedCA(Model):
    """A root supplied by the user: certificate and key, each as a file path or inline PEM."""

    cert_file: NonEmptyStr | None = None
    key_file: NonEmptyStr | None = None
    cert_pem: NonEmptyStr | None = None
    key_pem: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _one_source_each(self) -> ProvidedCA:
        problems = Problems()
        _exactly_one(problems, "certFile", self.cert_file, "certPem", self.cert_pem)
        _exactly_one(problems, "keyFile", self.key_file, "keyPem", self.key_pem)
        if self.cert_pem and "-----BEGIN CERTIFICATE-----" not in self.cert_pem:
            problems.add(("certPem",), "must be a PEM certificate (-----BEGIN CERTIFICATE-----)")
        if self.key_pem and "PRIVATE KEY-----" not in self.key_pem:
            problems.add(("keyPem",), "must be a PEM private key (-----BEGIN ... PRIVATE KEY-----)")
        problems.raise_if_any()
        return self


def _exactly_one(problems: Problems, a: str, a_value: object, b: str, b_value: object) -> None:
    if a_value is None and b_value is None:
        problems.add((), f"one of {a} or {b} is required")
    elif a_value is not None and b_value is not None:
        problems.add((b,), f"only one of {a} or {b} may be set")


class MeshCA(Model):
    """Which certificate authority signs the mesh's workload certificates."""

    backend: Literal["builtin", "provided"] = "builtin"
    builtin: BuiltinCA | None = None
    provided: ProvidedCA | None = None

    @model_validator(mode="after")
    def _backend_settings(self) -> MeshCA:
        problems = Problems()
        if self.backend == "provided" and self.provided is None:
            problems.add(("provided",), "required when backend is provided")
        if self.backend == "builtin" and self.provided is not None:
            problems.add(("provided",), "only allowed when backend is provided")
        if self.backend == "provided" and self.builtin is not None:
            problems.add(("builtin",), "only allowed when backend is builtin")
        problems.raise_if_any()
        return self

    @property
    def builtin_settings(self) -> BuiltinCA:
        return self.builtin or BuiltinCA()


class MeshCertificates(Model):
    """Workload (leaf) certificate lifetime; renewal starts `renewBefore` ahead of expiry."""

    validity: Duration = timedelta(hours=24)
    renew_before: Duration | None = None

    @model_validator(mode="after")
    def _sane_lifetimes(self) -> MeshCertificates:
        problems = Problems()
        if not MIN_CERT_VALIDITY <= self.validity <= MAX_CERT_VALIDITY:
            problems.add(
                ("validity",),
                f"must be between {format_duration(MIN_CERT_VALIDITY)} and "
                f"{MAX_CERT_VALIDITY.days}d (got {format_duration(self.validity)})",
            )
        if self.renew_before is not None and not (timedelta(0) < self.renew_before < self.validity):
            problems.add(
                ("renewBefore",),
                "must be more than 0s and shorter than validity "
                f"({format_duration(self.validity)})",
            )
        problems.raise_if_any()
        return self

    @property
    def effective_renew_before(self) -> timedelta:
        """renewBefore as written, else a third of the validity (8h of the default 24h)."""
        return self.renew_before if self.renew_before is not None else self.validity / 3


def check_authz_service(value: str) -> str:
    # Istio's form: a host name, optionally prefixed by "<namespace>/".
    namespace, _, host = value.rpartition("/")
    if (namespace and dns_label_reason(namespace)) or not is_hostname(host):
        raise ValueError(
            "must be a host name such as authz.verity-system.svc.cluster.local, "
            f"optionally prefixed by '<namespace>/' (got {describe(value)})"
        )
    return value


AuthzService = Annotated[str, AfterValidator(check_authz_service)]


def check_http_status(value: str) -> str:
    if not _HTTP_STATUS.fullmatch(value):
        raise ValueError(f'must be an HTTP status code such as "403" (got {describe(value)})')
    return value


HttpStatus = Annotated[str, AfterValidator(check_http_status)]


class ExtAuthzGrpc(Model):
    """An Envoy ext_authz gRPC service (Istio's envoyExtAuthzGrpc)."""

    service: AuthzService
    port: Port
    timeout: Duration | None = None
    fail_open: bool = False
    status_on_error: HttpStatus | None = None


def check_path_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/' (got {describe(value)})")
    return value


class ExtAuthzHttp(Model):
    """An Envoy ext_authz HTTP service (Istio's envoyExtAuthzHttp)."""

    service: AuthzService
    port: Port
    timeout: Duration | None = None
    fail_open: bool = False
    status_on_error: HttpStatus | None = None
    path_prefix: Annotated[str, AfterValidator(check_path_prefix)] | None = None
    include_request_headers_in_check: list[WildcardStr] = []
    include_additional_headers_in_check: dict[HeaderName, str] = {}
    headers_to_upstream_on_allow: list[WildcardStr] = []
    headers_to_downstream_on_allow: list[WildcardStr] = []
    headers_to_downstream_on_deny: list[WildcardStr] = []


def check_provider_name(value: str) -> str:
    if not _PROVIDER_NAME.fullmatch(value):
        raise ValueError(
            "must be letters, digits, '.', '-' and '_', starting and ending with a letter "
            f"or digit (got {describe(value)})"
        )
    return value


class ExtAuthzProvider(Model):
    """A named external authorizer that CUSTOM AuthorizationPolicies refer to."""

    name: Annotated[str, AfterValidator(check_provider_name)]
    envoy_ext_authz_grpc: ExtAuthzGrpc | None = None
    envoy_ext_authz_http: ExtAuthzHttp | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ExtAuthzProvider:
        problems = Problems()
        _exactly_one(
            problems,
            "envoyExtAuthzGrpc",
            self.envoy_ext_authz_grpc,
            "envoyExtAuthzHttp",
            self.envoy_ext_authz_http,
        )
        problems.raise_if_any()
        return self


class MeshAuthorization(Model):
    """What happens to a request no ALLOW policy covers, and the ext-authz providers."""

    default_action: Action = "DENY"
    providers: list[ExtAuthzProvider] = []

    @model_validator(mode="after")
    def _unique_providers(self) -> MeshAuthorization:
        problems = Problems()
        for index in duplicates([p.name for p in self.providers]):
            problems.add(
                ("providers", index, "name"),
                f"duplicate provider name {describe(self.providers[index].name)}",
            )
        problems.raise_if_any()
        return self

    def provider(self, name: str) -> ExtAuthzProvider | None:
        return next((p for p in self.providers if p.name == name), None)


class MeshEgress(Model):
    """Whether workloads may reach destinations outside the mesh by default."""

    default_action: Action = "DENY"


class MeshTls(Model):
    """TLS parameters of every mesh connection (Envoy names: TLSv1_2, TLSv1_3)."""

    min_version: TlsVersion = "TLSv1_2"
    max_version: TlsVersion = "TLSv1_3"
    cipher_suites: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> MeshTls:
        problems = Problems()
        if _TLS_ORDER[self.min_version] > _TLS_ORDER[self.max_version]:
            problems.add(("minVersion",), f"must not be above maxVersion ({self.max_version})")
        for index, suite in enumerate(self.cipher_suites):
            reason = _cipher_reason(suite)
            if reason:
                problems.add(("cipherSuites", index), reason)
        for index in duplicates(self.cipher_suites):
            problems.add(
                ("cipherSuites", index),
                f"duplicate cipher suite {describe(self.cipher_suites[index])}",
            )
        if self.cipher_suites and self.min_version == "TLSv1_3":
            problems.add(("cipherSuites",), "only apply to TLS 1.2, and minVersion is TLSv1_3")
        problems.raise_if_any()
        return self


def _cipher_reason(suite: str) -> str | None:
    if suite in MODERN_CIPHER_SUITES:
        return None
    if suite in _TLS13_SUITES:
        return f"{suite} is a TLS 1.3 suite: those are always enabled and not configurable"
    return f"must be one of {', '.join(MODERN_CIPHER_SUITES)} (got {describe(suite)})"


class MeshSpec(Model):
    """The `spec` of a Verity Mesh (see the module docstring for the layout)."""

    trust_domain: TrustDomain = "cluster.local"
    trust_domain_aliases: list[TrustDomain] = []
    root_namespace: DnsLabel = "verity-system"
    mtls: MeshMtls = MeshMtls()
    ca: MeshCA = MeshCA()
    certificates: MeshCertificates = MeshCertificates()
    authorization: MeshAuthorization = MeshAuthorization()
    egress: MeshEgress = MeshEgress()
    tls: MeshTls = MeshTls()

    @model_validator(mode="after")
    def _aliases(self) -> MeshSpec:
        problems = Problems()
        for index, alias in enumerate(self.trust_domain_aliases):
            if alias == self.trust_domain:
                problems.add(("trustDomainAliases", index), "must differ from trustDomain")
        for index in duplicates(self.trust_domain_aliases):
            problems.add(("trustDomainAliases", index), "duplicate trust domain alias")
        problems.raise_if_any()
        return self


class Mesh(Resource):
    """A Verity Mesh (cluster-scoped)."""

    STORE_KIND = "Mesh"
    NAMESPACED = False

    spec: MeshSpec

    def as_verity_mesh(self) -> MeshSpec:
        """The mesh settings; the same call works on a Kuma Mesh."""
        return self.spec


# --- Dataplane -----------------------------------------------------------------------------


class DataplaneInbound(Model):
    """A port the workload serves.

    `port` is where the sidecar listens for mesh traffic (what callers' `outbound.port`
    names); `appPort` is where the application itself listens on loopback (default: the
    same number as `port`).
    """

    port: Port
    app_port: Port | None = None
    protocol: Protocol = "tcp"
    name: DnsLabel | None = None

    @property
    def target_port(self) -> int:
        return self.app_port if self.app_port is not None else self.port


class DataplaneOutbound(Model):
    """A service the workload calls.

    `port` is the destination service's port (its inbound `port`); `localPort` is the
    loopback port the application connects to (not needed with a transparent proxy).
    `namespace` defaults to the Dataplane's own namespace.
    """

    service: DnsLabel
    namespace: DnsLabel | None = None
    port: Port
    local_port: Port | None = None


class TransparentProxy(Model):
    """iptables redirection of the workload's traffic into the sidecar."""

    enabled: bool = False
    redirect_port_inbound: Port = 15006
    redirect_port_outbound: Port = 15001


class DataplaneSpec(Model):
    """One workload instance: identity, labels, address, ports and dependencies.

    The identity is `spiffe://<trustDomain>/ns/<metadata.namespace>/sa/<serviceAccount>`;
    `labels` are the workload labels that policy selectors (matchLabels) match.
    """

    mesh: Name = "default"
    service: DnsLabel
    service_account: Name = "default"
    labels: Labels = {}
    address: Address
    inbound: list[DataplaneInbound] = []
    outbound: list[DataplaneOutbound] = []
    transparent_proxy: TransparentProxy = TransparentProxy()

    @model_validator(mode="after")
    def _consistent_ports(self) -> DataplaneSpec:
        problems = Problems()
        self._check_inbound(problems)
        self._check_outbound(problems)
        self._check_redirects(problems)
        problems.raise_if_any()
        return self

    def _check_inbound(self, problems: Problems) -> None:
        ports = [i.port for i in self.inbound]
        for index in duplicates(ports):
            problems.add(("inbound", index, "port"), f"duplicate inbound port {ports[index]}")
        names = [i.name for i in self.inbound if i.name is not None]
        for index in duplicates(names):
            problems.add(
                ("inbound", index, "name"), f"duplicate inbound name {describe(names[index])}"
            )

    def _check_outbound(self, problems: Problems) -> None:
        inbound_ports = {i.port for i in self.inbound}
        for index, out in enumerate(self.outbound):
            if out.local_port is None and not self.transparent_proxy.enabled:
                problems.add(
                    ("outbound", index, "localPort"),
                    "required unless transparentProxy.enabled is true",
                )
            if out.local_port in inbound_ports:
                problems.add(
                    ("outbound", index, "localPort"),
                    f"{out.local_port} is also an inbound port",
                )
        local_ports = [o.local_port for o in self.outbound]
        for index in duplicates(local_ports):
            if local_ports[index] is not None:
                problems.add(
                    ("outbound", index, "localPort"), f"duplicate localPort {local_ports[index]}"
                )
        targets = [(o.service, o.namespace, o.port) for o in self.outbound]
        for index in duplicates(targets):
            problems.add(
                ("outbound", index), "duplicate outbound (same service, namespace and port)"
            )

    def _check_redirects(self, problems: Problems) -> None:
        proxy = self.transparent_proxy
        if not proxy.enabled:
            return
        if proxy.redirect_port_inbound == proxy.redirect_port_outbound:
            problems.add(
                ("transparentProxy", "redirectPortOutbound"), "must differ from redirectPortInbound"
            )
        taken = {i.port for i in self.inbound} | {o.local_port for o in self.outbound}
        for field, port in (
            ("redirectPortInbound", proxy.redirect_port_inbound),
            ("redirectPortOutbound", proxy.redirect_port_outbound),
        ):
            if port in taken:
                problems.add(
                    ("transparentProxy", field), f"{port} is also used by an inbound or outbound"
                )


class Dataplane(Resource):
    """A registered workload instance (namespaced)."""

    STORE_KIND = "Dataplane"
    NAMESPACED = True

    spec: DataplaneSpec

    def outbound_namespace(self, outbound: DataplaneOutbound) -> str:
        return outbound.namespace or self.namespace

    def spiffe_id(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.spec.service_account}"


# --- RevocationList ------------------------------------------------------------------------


def check_spiffe_uri(value: str) -> str:
    if not re.fullmatch(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+", value):
        raise ValueError(
            f"must be a SPIFFE ID like spiffe://cluster.local/ns/NS/sa/SA (got {value!r})"
        )
    return value


class RevokedIdentity(Model):
    """One identity whose certificates must no longer be issued nor accepted."""

    spiffe_id: Annotated[str, AfterValidator(check_spiffe_uri)]
    revoked_at: NonEmptyStr
    reason: str = ""


class RevocationListSpec(Model):
    identities: list[RevokedIdentity] = []

    @model_validator(mode="after")
    def _unique(self) -> RevocationListSpec:
        seen = [i.spiffe_id for i in self.identities]
        duplicates = sorted({s for s in seen if seen.count(s) > 1})
        if duplicates:
            raise ValueError(f"identities: {duplicates[0]} is listed twice")
        return self


class RevocationList(Resource):
    """The revoked identities of one mesh (cluster-scoped; named after the mesh).

    `verity identity revoke` maintains it; being a resource, every change is audited, watched
    and pushed to the proxies like any other configuration.
    """

    STORE_KIND = "RevocationList"
    NAMESPACED = False

    spec: RevocationListSpec

    def revoked(self) -> frozenset[str]:
        return frozenset(i.spiffe_id for i in self.spec.identities)
