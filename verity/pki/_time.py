"""Time values handed to the PKI core: always timezone-aware, compared in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(moment: datetime, what: str = "now") -> datetime:
    """Refuse naive datetimes: a local-time `now` would shift every validity window."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return moment.astimezone(UTC)


def whole_seconds(moment: datetime) -> datetime:
    """X.509 times carry whole seconds; round down so reported times equal encoded ones."""
    return moment.replace(microsecond=0)
