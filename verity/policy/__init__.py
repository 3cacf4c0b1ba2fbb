"""The meaning of policies, as pure functions of resources.

Imports only `verity.resources` (a layering contract checks it): `translate()`, `verity check`
and the analyzer share these semantics.
"""

from verity.policy.mtls import (
    EffectiveMtls,
    Level,
    ModeSource,
    MtlsMode,
    PolicyKey,
    PortMtls,
    effective_mtls,
)

__all__ = [
    "EffectiveMtls",
    "Level",
    "ModeSource",
    "MtlsMode",
    "PolicyKey",
    "PortMtls",
    "effective_mtls",
]
