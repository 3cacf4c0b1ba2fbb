"""Istio's security kinds (`security.istio.io/v1` and `v1beta1`), with Istio's validation.

The models follow Istio's published API field for field, so existing Istio YAML applies
unchanged; the checks are those of Istio's CRD schema and of istiod's validation webhook
(e.g. CUSTOM needs a provider, `when` keys must be known attributes, path templates).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, AliasChoices, Field, model_validator

from verity.resources.common import (
    Duration,
    HeaderName,
    IpBlock,
    Model,
    NonEmptyStr,
    PortString,
    WildcardStr,
    ip_block_reason,
    port_string_reason,
    snake_case,
    wildcard_reason,
)
from verity.resources.errors import Loc, Problem, Problems, describe
from verity.resources.metadata import Labels
from verity.resources.resource import Resource

ISTIO_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

# --- selection: selector, targetRef, targetRefs ----------------------------------------------

# (group, kind) a policy may target; "" and "core" both mean the core group.
ALLOWED_TARGET_KINDS = (
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
)


class WorkloadSelector(Model):
    """Selects workloads by their labels, in the policy's namespace (or all, from the root)."""

    match_labels: Labels = {}


class PolicyTargetReference(Model):
    """A resource (Service, ServiceEntry, Gateway, GatewayClass) the policy attaches to."""

    group: str = ""
    kind: NonEmptyStr
    name: NonEmptyStr
    namespace: str = ""

    @model_validator(mode="after")
    def _supported_target(self) -> PolicyTargetReference:
        problems = Problems()
        if self.namespace:
            problems.add(
                ("namespace",), "must not be set: cross-namespace references are not supported"
            )
        if (self.group or "core", self.kind) not in ALLOWED_TARGET_KINDS:
            allowed = ", ".join(f"{g}/{k}" for g, k in ALLOWED_TARGET_KINDS)
            problems.add(
                ("kind",), f"must be one of {allowed} (got {self.group or 'core'}/{self.kind})"
            )
        problems.raise_if_any()
        return self


def selection_problems(
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: Sequence[PolicyTargetReference] | None,
) -> list[Problem]:
    """At most one of selector, targetRef and targetRefs (Istio's rule)."""
    present = [
        name
        for name, value in (
            ("selector", selector),
            ("targetRef", target_ref),
            ("targetRefs", target_refs),
        )
        if value is not None
    ]
    return [
        ((name,), "only one of selector, targetRef and targetRefs may be set")
        for name in present[1:]
    ]


# --- PeerAuthentication --------------------------------------------------------------------

PeerMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class PeerMtls(Model):
    """mTLS mode; UNSET inherits from the namespace, then the mesh."""

    mode: PeerMode = "UNSET"


def check_port_keys(ports: dict[Any, PeerMtls]) -> dict[Any, PeerMtls]:
    # YAML gives int keys (8080:), JSON string keys ("8080"): both are accepted.
    problems = Problems()
    for key in ports:
        reason = _port_key_reason(key)
        if reason:
            problems.add((key,), reason)
    problems.raise_if_any()
    return ports


class PeerAuthenticationSpec(Model):
    """Which mTLS mode the selected workloads accept, optionally per port."""

    selector: WorkloadSelector | None = None
    mtls: PeerMtls | None = None
    port_level_mtls: Annotated[dict[Any, PeerMtls], AfterValidator(check_port_keys)] | None = None

    @model_validator(mode="after")
    def _port_level(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls is None:
            return self
        problems = Problems()
        if not self.port_level_mtls:
            problems.add(("portLevelMtls",), "must list at least one port when set")
        if self.selector is None or not self.selector.match_labels:
            problems.add(
                ("portLevelMtls",),
                "needs a selector with matchLabels: mesh- and namespace-wide policies "
                "cannot set port-level mTLS",
            )
        problems.raise_if_any()
        return self

    @property
    def mode(self) -> PeerMode:
        return self.mtls.mode if self.mtls else "UNSET"

    def port_modes(self) -> dict[int, PeerMode]:
        """portLevelMtls with integer ports (YAML keys may be ints or strings)."""
        return {int(port): mtls.mode for port, mtls in (self.port_level_mtls or {}).items()}


def _port_key_reason(key: Any) -> str | None:
    if isinstance(key, bool) or not isinstance(key, int | str):
        return f"port must be a number between 1 and 65535 (got {describe(key)})"
    if isinstance(key, int):
        return None if 1 <= key <= 65535 else f"port must be between 1 and 65535 (got {key})"
    return (
        None
        if port_string_reason(key) is None
        else f"port must be a number between 1 and 65535 (got {describe(key)})"
    )


class PeerAuthentication(Resource):
    STORE_KIND = "PeerAuthentication"
    NAMESPACED = True

    spec: PeerAuthenticationSpec


# --- AuthorizationPolicy -------------------------------------------------------------------

# A path segment next to a {*} / {**} template: RFC 3986 pchar, as Istio requires.
_PATH_LITERAL = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+$")
_TEMPLATES = ("{*}", "{**}")


def path_reason(path: str) -> str | None:
    """Istio's path rules: `*` prefix/suffix wildcards, or `{*}` / `{**}` whole segments."""
    if not path:
        return "must not be empty"
    has_template = any(t in path for t in _TEMPLATES)
    after_match_any = False
    for segment in path.strip("/").split("/"):
        if segment in _TEMPLATES:
            if after_match_any:
                return (
                    f"{{**}} must be the last template operator in the path (got {describe(path)})"
                )
            after_match_any = segment == "{**}"
            continue
        if "{" in segment or "}" in segment:
            return (
                "only {*} and {**} are supported, each as a whole path segment "
                f"(got {describe(path)})"
            )
        if has_template and not _PATH_LITERAL.fullmatch(segment):
            return (
                f"segment {describe(segment)} is not allowed next to path templates: "
                f"no '*' and only RFC 3986 path characters (got {describe(path)})"
            )
    return None if has_template else wildcard_reason(path)


def check_path(value: str) -> str:
    reason = path_reason(value)
    if reason:
        raise ValueError(reason)
    return value


_METHOD = re.compile(r"^\*?[!#$%&'+\-.^_`|~0-9A-Za-z]+\*?$|^\*$")


def check_method(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if not _METHOD.fullmatch(value):
        raise ValueError(f"must be an HTTP method such as GET (got {describe(value)})")
    return value


def service_account_reason(value: str) -> str | None:
    """Istio's `serviceAccounts` entries: `name` or `namespace/name`, no wildcards."""
    if not value:
        return "must not be empty"
    if "*" in value:
        return f"wildcards are not allowed (got {describe(value)})"
    if len(value) > 320:
        return f"must be at most 320 characters (got {len(value)})"
    parts = value.split("/")
    if len(parts) > 2 or not all(parts):
        return f"must be 'serviceAccount' or 'namespace/serviceAccount' (got {describe(value)})"
    return None


def check_service_account(value: str) -> str:
    reason = service_account_reason(value)
    if reason:
        raise ValueError(reason)
    return value


PathMatch = Annotated[str, AfterValidator(check_path)]
Method = Annotated[str, AfterValidator(check_method)]
ServiceAccountMatch = Annotated[str, AfterValidator(check_service_account)]


class Source(Model):
    """Who sends the request; fields are ANDed, values within a field ORed."""

    principals: list[WildcardStr] = []
    not_principals: list[WildcardStr] = []
    request_principals: list[WildcardStr] = []
    not_request_principals: list[WildcardStr] = []
    namespaces: list[WildcardStr] = []
    not_namespaces: list[WildcardStr] = []
    service_accounts: list[ServiceAccountMatch] = []
    not_service_accounts: list[ServiceAccountMatch] = []
    ip_blocks: list[IpBlock] = []
    not_ip_blocks: list[IpBlock] = []
    remote_ip_blocks: list[IpBlock] = []
    not_remote_ip_blocks: list[IpBlock] = []

    @model_validator(mode="after")
    def _meaningful(self) -> Source:
        problems = Problems()
        if not any(getattr(self, name) for name in type(self).model_fields):
            problems.add((), "must set at least one field (omit `from` to match any source)")
        identity = self.principals or self.not_principals or self.namespaces or self.not_namespaces
        if identity and (self.service_accounts or self.not_service_accounts):
            problems.add(("serviceAccounts",), "cannot be combined with namespaces or principals")
        for name in ("serviceAccounts", "notServiceAccounts"):
            if len(getattr(self, snake_case(name))) > 16:
                problems.add((name,), "must have at most 16 entries")
        problems.raise_if_any()
        return self


class Operation(Model):
    """What the request does; fields are ANDed, values within a field ORed."""

    hosts: list[WildcardStr] = []
    not_hosts: list[WildcardStr] = []
    ports: list[PortString] = []
    not_ports: list[PortString] = []
    methods: list[Method] = []
    not_methods: list[Method] = []
    paths: list[PathMatch] = []
    not_paths: list[PathMatch] = []

    @model_validator(mode="after")
    def _meaningful(self) -> Operation:
        problems = Problems()
        if not any(getattr(self, name) for name in type(self).model_fields):
            problems.add((), "must set at least one field (omit `to` to match any operation)")
        problems.raise_if_any()
        return self


# Istio's condition attributes. Keys with a bracketed name: `request.headers[User-Agent]`.
_PLAIN_KEYS = (
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.serviceAccount",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
)
_MAP_KEYS = (
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
)
_RETIRED_KEYS = {
    "destination.namespace": "is replaced by metadata.namespace: put the policy in that namespace",
    "destination.name": "is deprecated (only supported in v1alpha1)",
    "destination.user": "is deprecated (only supported in v1alpha1)",
}
_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")


def condition_key_reason(key: str) -> str | None:
    if not key:
        return "must not be empty"
    if key in _PLAIN_KEYS:
        return None
    for prefix in _MAP_KEYS:
        if key.startswith(prefix):
            return _map_key_reason(key, prefix)
    if key in _RETIRED_KEYS:
        return f"{key} {_RETIRED_KEYS[key]}"
    if key.startswith("destination.labels"):
        return f"{key} is replaced by the workload selector"
    known = [
        *_PLAIN_KEYS,
        "request.headers[<name>]",
        "request.auth.claims[<name>]",
        "experimental.envoy.filters.*",
    ]
    return f"unknown key {describe(key)}; supported: {', '.join(known)}"


def _map_key_reason(key: str, prefix: str) -> str | None:
    open_at = key.find("[")
    if key.endswith("]") and 0 < open_at < len(key) - 2:
        return None
    shape = f"{prefix}a.b[c]" if prefix.endswith(".") else f"{prefix}[<name>]"
    return f"must have the form {shape} (got {describe(key)})"


def condition_value_reason(key: str, value: str) -> str | None:
    if not value:
        return "must not be empty"
    if key in _IP_KEYS:
        return ip_block_reason(value)
    if key == "destination.port":
        return port_string_reason(value)
    if key == "source.serviceAccount":
        return service_account_reason(value)
    return None


class Condition(Model):
    """An extra attribute test: `key` must (not) equal one of the values."""

    key: str
    values: list[str] = []
    not_values: list[str] = []

    @model_validator(mode="after")
    def _valid(self) -> Condition:
        problems = Problems()
        key_reason = condition_key_reason(self.key)
        if key_reason:
            problems.add(("key",), key_reason)
        if not self.values and not self.not_values:
            problems.add((), "needs at least one of values or notValues")
        if not key_reason:
            for field, values in (("values", self.values), ("notValues", self.not_values)):
                for index, value in enumerate(values):
                    reason = condition_value_reason(self.key, value)
                    if reason:
                        problems.add((field, index), reason)
        problems.raise_if_any()
        return self


class RuleFrom(Model):
    source: Source


class RuleTo(Model):
    operation: Operation


def check_from_not_empty(value: list[RuleFrom]) -> list[RuleFrom]:
    if not value:
        raise ValueError("must not be empty (omit it to match any source)")
    return value


def check_to_not_empty(value: list[RuleTo]) -> list[RuleTo]:
    if not value:
        raise ValueError("must not be empty (omit it to match any operation)")
    return value


class Rule(Model):
    """Matches when one `from`, one `to` and all `when` conditions match; `{}` matches all."""

    from_: Annotated[list[RuleFrom], AfterValidator(check_from_not_empty)] | None = Field(
        default=None, alias="from"
    )
    to: Annotated[list[RuleTo], AfterValidator(check_to_not_empty)] | None = None
    when: list[Condition] = []


class ExtensionProvider(Model):
    """The mesh's ext-authz provider (Mesh spec.authorization.providers) a CUSTOM policy uses."""

    name: str = ""


AuthorizationAction = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]

# Source fields and condition keys ext-authz (CUSTOM) cannot evaluate, as in istiod.
_CUSTOM_UNSUPPORTED_SOURCE = (
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
)


class AuthorizationPolicySpec(Model):
    """Istio's AuthorizationPolicy: an action applied to requests matching the rules."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] | None = None
    rules: list[Rule] | None = None
    action: AuthorizationAction = "ALLOW"
    provider: ExtensionProvider | None = None

    @model_validator(mode="after")
    def _istio_rules(self) -> AuthorizationPolicySpec:
        problems = Problems()
        problems.extend((), selection_problems(self.selector, self.target_ref, self.target_refs))
        if self.action == "CUSTOM":
            problems.extend((), self._custom_problems())
        elif self.provider is not None:
            problems.add(
                ("provider",), f"only allowed with action CUSTOM (action is {self.action})"
            )
        if self.action == "DENY" and not self.rules:
            problems.add(
                ("rules",),
                "required with action DENY: without rules the policy never applies "
                "(add an empty rule {} to match every request)",
            )
        problems.raise_if_any()
        return self

    def _custom_problems(self) -> list[Problem]:
        found: list[Problem] = []
        if not self.rules:
            found.append(
                (
                    ("rules",),
                    "required with action CUSTOM: without rules the policy never applies "
                    "(add an empty rule {} to match every request)",
                )
            )
        if self.provider is None or not self.provider.name:
            found.append((("provider", "name"), "required with action CUSTOM"))
        for index, rule in enumerate(self.rules or []):
            found.extend(_custom_rule_problems(("rules", index), rule))
        return found


def _custom_rule_problems(at: Loc, rule: Rule) -> list[Problem]:
    found: list[Problem] = []
    for index, source_from in enumerate(rule.from_ or []):
        for field in _CUSTOM_UNSUPPORTED_SOURCE:
            if getattr(source_from.source, snake_case(field)):
                found.append(
                    ((*at, "from", index, "source", field), "not supported with action CUSTOM")
                )
    for index, condition in enumerate(rule.when):
        key = condition.key
        if key in (
            "source.namespace",
            "source.serviceAccount",
            "source.principal",
        ) or key.startswith("request.auth."):
            found.append(
                ((*at, "when", index, "key"), f"{key} is not supported with action CUSTOM")
            )
    return found


class AuthorizationPolicy(Resource):
    STORE_KIND = "AuthorizationPolicy"
    NAMESPACED = True

    spec: AuthorizationPolicySpec


# --- RequestAuthentication -----------------------------------------------------------------

_CLAIM_HEADER = re.compile(r"^[-_A-Za-z0-9]+$")


def check_jwks_uri(value: str) -> str:
    parsed = urlparse(value)
    if len(value) > 2048 or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"must be an http:// or https:// URL (got {describe(value)})")
    return value


def check_jwks(value: str) -> str:
    try:
        document = json.loads(value)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not (
        isinstance(document.get("keys"), list) or "kty" in document
    ):
        raise ValueError('must be a JSON Web Key Set such as {"keys": [...]}')
    return value


def check_claim_header(value: str) -> str:
    if not _CLAIM_HEADER.fullmatch(value):
        raise ValueError(f"must be letters, digits, '-' and '_' (got {describe(value)})")
    return value


JwksUri = Annotated[str, AfterValidator(check_jwks_uri)]


class JwtHeader(Model):
    """A header carrying the token, and a prefix to strip (e.g. "Bearer ")."""

    name: HeaderName
    prefix: str = ""


class ClaimToHeader(Model):
    """Copy a verified claim into a request header."""

    header: Annotated[str, AfterValidator(check_claim_header)]
    claim: NonEmptyStr


class JwtRule(Model):
    """One accepted issuer, how to verify its tokens and where to find them."""

    issuer: NonEmptyStr
    audiences: list[NonEmptyStr] = []
    jwks_uri: JwksUri | None = None
    # Istio's CRD also accepts the proto name.
    jwks_uri_legacy: JwksUri | None = Field(default=None, validation_alias=AliasChoices("jwks_uri"))
    jwks: Annotated[str, AfterValidator(check_jwks)] | None = None
    from_headers: list[JwtHeader] = []
    from_params: list[NonEmptyStr] = []
    from_cookies: list[NonEmptyStr] = []
    output_payload_to_header: HeaderName | None = None
    output_claim_to_headers: list[ClaimToHeader] = []
    forward_original_token: bool = False
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtRule:
        problems = Problems()
        given = [
            name
            for name, value in (
                ("jwksUri", self.jwks_uri),
                ("jwks_uri", self.jwks_uri_legacy),
                ("jwks", self.jwks),
            )
            if value is not None
        ]
        for name in given[1:]:
            problems.add((name,), "only one of jwksUri and jwks may be set")
        if self.timeout is not None and self.timeout < timedelta(milliseconds=1):
            problems.add(("timeout",), "must be at least 1ms")
        problems.raise_if_any()
        return self

    @property
    def effective_jwks_uri(self) -> str | None:
        return self.jwks_uri or self.jwks_uri_legacy


class RequestAuthenticationSpec(Model):
    """Which JWTs the selected workloads accept (a request without a token is not rejected)."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] | None = None
    jwt_rules: list[JwtRule] = []

    @model_validator(mode="after")
    def _selection(self) -> RequestAuthenticationSpec:
        problems = Problems()
        problems.extend((), selection_problems(self.selector, self.target_ref, self.target_refs))
        if len(self.jwt_rules) > 4096:
            problems.add(("jwtRules",), "must have at most 4096 rules")
        problems.raise_if_any()
        return self


class RequestAuthentication(Resource):
    STORE_KIND = "RequestAuthentication"
    NAMESPACED = True

    spec: RequestAuthenticationSpec
