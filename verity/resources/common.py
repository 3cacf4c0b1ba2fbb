"""Shared building blocks: the strict model base and validated primitive types.

Models are strict (no silent coercion of `"8080"` into 8080 or `"yes"` into True), refuse
unknown fields, and read the camelCase names users write. Values keep the type users
wrote except durations, which become `timedelta`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from verity.resources.errors import describe


class Model(BaseModel):
    """Base of every spec model: strict, closed, immutable, camelCase on the wire."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # As in Kubernetes, `field: null` (or a bare `field:`) means the field is not set.
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not (v is None and k in _input_names(cls))}


@functools.cache
def _input_names(model: type[BaseModel]) -> frozenset[str]:
    """The keys a model reads: aliases (and alias choices) of its fields."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        choices = getattr(field.validation_alias, "choices", None)
        if choices is not None:
            names.update(c for c in choices if isinstance(c, str))
        elif isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
        else:
            names.add(field.alias or name)
    return frozenset(names)


def snake_case(camel: str) -> str:
    """The Python field name of a camelCase document field: notPrincipals -> not_principals."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


# --- ports ---------------------------------------------------------------------------------


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number between 1 and 65535 (got {value})")
    return value


Port = Annotated[int, AfterValidator(check_port)]


def port_string_reason(value: Any) -> str | None:
    """Why `value` is not a port written as a string ("8080"), or None if it is one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f'must be a string such as "{value}" (got integer {value})'
    if not isinstance(value, str):
        return None  # the type check reports it
    if not value.isascii() or not value.isdigit():
        return f"must be a port number between 1 and 65535 (got {describe(value)})"
    if not 1 <= int(value) <= 65535:
        return f"must be a port number between 1 and 65535 (got {describe(value)})"
    return None


def _port_string(value: Any) -> Any:
    reason = port_string_reason(value)
    if reason:
        raise ValueError(reason)
    return value


PortString = Annotated[str, BeforeValidator(_port_string)]


# --- durations -----------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|y)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "y": 365 * 86400.0,
}


def parse_duration(text: str) -> timedelta:
    """Go-style durations ("1h30m", "500ms") plus Kuma's days and years ("1d", "10y")."""
    if not text or _DURATION_PART.sub("", text) != "":
        raise ValueError(
            "must be a duration such as '24h', '30m', '1h30m', '500ms' or '1d' "
            f"(got {describe(text)})"
        )
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    return timedelta(seconds=seconds)


def _duration_input(value: Any) -> Any:
    # timedelta is accepted for models built in code (e.g. Kuma -> Verity translation);
    # YAML never produces one.
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a duration string such as '24h' (got {describe(value)})")
    return parse_duration(value)


Duration = Annotated[timedelta, BeforeValidator(_duration_input)]


def format_duration(value: timedelta) -> str:
    """The shortest Go-style spelling of a whole-millisecond duration: 90m -> '1h30m'."""
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --- strings -------------------------------------------------------------------------------


def check_non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


NonEmptyStr = Annotated[str, AfterValidator(check_non_empty)]


def wildcard_reason(value: str) -> str | None:
    """Istio's string matching: exact, prefix `abc*`, suffix `*abc` or presence `*`."""
    if not value:
        return "must not be empty"
    if "*" not in value or value == "*":
        return None
    inner = value.strip("*")
    if value.count("*") > 1 or "*" in inner or inner == "":
        return f"'*' is only allowed alone, as a prefix or as a suffix (got {describe(value)})"
    return None


def check_wildcard(value: str) -> str:
    reason = wildcard_reason(value)
    if reason:
        raise ValueError(reason)
    return value


WildcardStr = Annotated[str, AfterValidator(check_wildcard)]

# RFC 7230 token characters: what an HTTP header name (or method) may contain.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"must be a valid HTTP header name (got {describe(value)})")
    return value


HeaderName = Annotated[str, AfterValidator(check_header_name)]


# --- hosts and addresses -------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def is_hostname(value: str) -> bool:
    """RFC 1123 host name (letters, digits, '-' in dot-separated labels, at most 253).

    An all-numeric last label is refused (RFC 3696): "10.0.0.256" is a bad IP, not a name.
    """
    if not value or len(value) > 253:
        return False
    labels = value.split(".")
    return all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_address(value: str) -> str:
    if not (is_ip(value) or is_hostname(value)):
        raise ValueError(f"must be an IPv4 or IPv6 address or a host name (got {describe(value)})")
    return value


Address = Annotated[str, AfterValidator(check_address)]


def ip_block_reason(value: str) -> str | None:
    """Why `value` is not an IP address or CIDR block (Istio's ipBlocks), or None."""
    if "/" in value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return (
                f"must be an IP address or a CIDR block such as 10.0.0.0/16 (got {describe(value)})"
            )
        return None
    if not is_ip(value):
        return f"must be an IP address or a CIDR block such as 10.0.0.0/16 (got {describe(value)})"
    return None


def check_ip_block(value: str) -> str:
    reason = ip_block_reason(value)
    if reason:
        raise ValueError(reason)
    return value


IpBlock = Annotated[str, AfterValidator(check_ip_block)]


def duplicates(values: list[Any]) -> list[int]:
    """Indices of values already seen earlier in the list."""
    seen: set[Any] = set()
    found = []
    for index, value in enumerate(values):
        if value in seen:
            found.append(index)
        seen.add(value)
    return found
