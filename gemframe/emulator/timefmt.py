"""Timestamps and durations as the API writes them in JSON (proto3 Timestamp and Duration)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from .validation import _bad_value

TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})")
DURATION = re.compile(r"(\d{1,12})(?:\.(\d{1,9}))?s")


def rfc3339(seconds: float) -> str:
    """Epoch seconds as ``2025-03-31T12:51:07.280031Z``."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_timestamp(value: object, where: str) -> float:
    """An RFC 3339 timestamp (any fraction, ``Z`` or an offset) as epoch seconds, or the API's
    400. (Not datetime.fromisoformat alone: before Python 3.11 it refuses ``Z`` and 9 digits.)"""
    match = TIMESTAMP.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise _bad_value(where, value, "type.googleapis.com/google.protobuf.Timestamp")
    day, clock, fraction, zone = match.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}{zone}")
    except ValueError:
        raise _bad_value(where, value, "type.googleapis.com/google.protobuf.Timestamp") from None
    return moment.timestamp() + float(f"0.{fraction or 0}")


def parse_duration(value: object, where: str) -> float:
    """A Duration such as ``"3600s"`` or ``"1.5s"`` as seconds, or the API's 400."""
    match = DURATION.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise _bad_value(where, value, "type.googleapis.com/google.protobuf.Duration")
    return int(match.group(1)) + float(f"0.{match.group(2) or 0}")
