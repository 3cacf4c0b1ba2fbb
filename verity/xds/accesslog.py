"""The receiving sidecar's access log of refusals: one JSON line per 4xx/5xx answer.

Envoy writes it to stdout; the agent turns each line into a structured `verity.access`
record. A deny line names the policy and rule that refused (Envoy's response code details
carry the RBAC policy name, e.g. `rbac_access_denied_matched_policy[ns[shop]-policy[x]-rule[0]]`),
the caller's SPIFFE ID, the method, path and port. The caller itself only sees a plain 403.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message

_FIELDS = {
    "access": "inbound",
    "event": "error_response",  # every 4xx/5xx: refusals and failures
    "start": "%START_TIME%",
    "caller": "%DOWNSTREAM_PEER_URI_SAN%",
    "source": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "port": "%DOWNSTREAM_LOCAL_PORT%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "policy": "%DYNAMIC_METADATA(envoy.filters.http.rbac:deny.enforced_effective_policy_id)%",
    "allow_policy": (
        "%DYNAMIC_METADATA(envoy.filters.http.rbac:allow.enforced_effective_policy_id)%"
    ),
}


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def refusal_access_log() -> accesslog_pb2.AccessLog:
    """Log answers with status 400 and above as JSON lines on Envoy's stdout."""
    json_format = struct_pb2.Struct()
    json_format.update(_FIELDS)
    logger = stream_pb2.StdoutAccessLog(
        log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=json_format)
    )
    status_filter = accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.GE,
                value=base_pb2.RuntimeUInt32(default_value=400, runtime_key="verity.log_from"),
            )
        )
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout", filter=status_filter, typed_config=_packed(logger)
    )
