"""The meaning of policies, as pure functions of resources.

Imports only `verity.resources` (a layering contract checks it): `translate()`, `verity check`
and the analyzer share these semantics.
"""

from verity.policy.authz import (
    REVOKED_POLICY,
    Decision,
    PolicyResult,
    ProviderAnswer,
    RuleResult,
    Verdict,
    compiled_policies,
    evaluate,
    jwt_rules,
    tcp_warnings,
    token_refusal,
)
from verity.policy.authz_rules import (
    Check,
    CompiledPolicy,
    CompiledRule,
    PolicyId,
    is_dry_run,
    parse_envoy_policy_name,
)
from verity.policy.mtls import (
    EffectiveMtls,
    Level,
    ModeSource,
    MtlsMode,
    PolicyKey,
    PortMtls,
    effective_mtls,
)
from verity.policy.request import Request, RequestProtocol, Token
from verity.policy.selection import WorkloadPolicies, policies_for, selects

__all__ = [
    "REVOKED_POLICY",
    "Check",
    "CompiledPolicy",
    "CompiledRule",
    "Decision",
    "EffectiveMtls",
    "Level",
    "ModeSource",
    "MtlsMode",
    "PolicyId",
    "PolicyKey",
    "PolicyResult",
    "PortMtls",
    "ProviderAnswer",
    "Request",
    "RequestProtocol",
    "RuleResult",
    "Token",
    "Verdict",
    "WorkloadPolicies",
    "compiled_policies",
    "effective_mtls",
    "evaluate",
    "is_dry_run",
    "jwt_rules",
    "parse_envoy_policy_name",
    "policies_for",
    "selects",
    "tcp_warnings",
    "token_refusal",
]
