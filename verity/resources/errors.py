"""Validation errors that name the field (as the user wrote it) and the reason.

Pydantic reports errors with its own wording and locations; users write Kubernetes-style
camelCase documents, so every error is translated into a path such as
`spec.rules[0].to[0].operation.methods[1]` and a short reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

# The custom pydantic error type that carries several (sub-path, reason) pairs, so that one
# cross-field check can report every problem it finds, each at its own path.
PROBLEMS_ERROR_TYPE = "verity_problems"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED = re.compile(r"'([^']*)'")


@dataclass(frozen=True)
class FieldError:
    """One problem in a document: where (`spec.mtls.mode`) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class InvalidResource(Exception):
    """A document that cannot be applied; `str()` gives one line per error."""

    def __init__(self, subject: str, errors: Sequence[FieldError]) -> None:
        self.subject = subject
        self.errors = list(errors)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(f"{self.subject}: {error}" for error in self.errors)


def format_path(loc: Iterable[str | int]) -> str:
    """`("spec", "rules", 0, "from")` -> `spec.rules[0].from`; odd map keys go in brackets."""
    path = ""
    for part in loc:
        if isinstance(part, int) or not _IDENTIFIER.fullmatch(part):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def problems_error(problems: Sequence[Problem]) -> PydanticCustomError:
    """A pydantic error carrying several problems, raised from cross-field validators."""
    summary = "; ".join(reason for _, reason in problems)
    return PydanticCustomError(
        PROBLEMS_ERROR_TYPE, "{summary}", {"summary": summary, "problems": list(problems)}
    )


class Problems:
    """Collects (sub-path, reason) pairs found by a validator, then raises them together."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, loc: Loc, reason: str) -> None:
        self.items.append((loc, reason))

    def extend(self, prefix: Loc, problems: Iterable[Problem]) -> None:
        self.items.extend((prefix + loc, reason) for loc, reason in problems)

    def raise_if_any(self) -> None:
        if self.items:
            raise problems_error(self.items)


def describe(value: Any) -> str:
    """A value as a YAML user would call it, for `(got ...)` hints."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        # Long values (a pasted certificate, say) are cut: the hint is for recognising it.
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _literal_reason(error: ErrorDetails) -> str:
    allowed = _QUOTED.findall(str(error.get("ctx", {}).get("expected", "")))
    return f"must be one of {', '.join(allowed)} (got {describe(error['input'])})"


_TYPE_REASONS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def reason_for(error: ErrorDetails) -> str:
    """Pydantic's error in the words of a YAML author."""
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        return _literal_reason(error)
    if kind in _TYPE_REASONS:
        return f"{_TYPE_REASONS[kind]} (got {describe(error['input'])})"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    return error["msg"]


def translate(exc: ValidationError, prefix: Loc = ()) -> list[FieldError]:
    """Every pydantic error as a FieldError, located under `prefix`."""
    return [FieldError(format_path(loc), reason) for loc, reason in translate_problems(exc, prefix)]


def translate_problems(exc: ValidationError, prefix: Loc = ()) -> list[Problem]:
    """Like translate(), but as (loc, reason) pairs for re-raising inside another model."""
    found: list[Problem] = []
    for error in exc.errors():
        # "[key]" marks an error in a mapping key; the key itself is already in the loc.
        loc = prefix + tuple(part for part in error["loc"] if part != "[key]")
        if error["type"] == PROBLEMS_ERROR_TYPE:
            found.extend((loc + tuple(sub), reason) for sub, reason in error["ctx"]["problems"])
        else:
            found.append((loc, reason_for(error)))
    return found
