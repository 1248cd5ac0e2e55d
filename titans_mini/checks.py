"""The argument check written once: an int in a range, refused with a message naming it."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise TypeError unless `value` is an int (a bool is not), ValueError unless low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int in [{low}, {'inf' if high is None else high}], got {value}")
