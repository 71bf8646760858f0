"""Argument checks shared by every layer, so that each rule and its message is written once.

A count (frames, tokens, layers, streams, ...) is an `int` of at least 1; `bool` is refused although
Python counts it as an int, and a float such as 2.0 is refused rather than silently truncated. The
caller chooses the error type: `ConfigError` for settings, `InputError` for per-call input. A ratio
(a share of tokens, of frames, of a grid) is a real number in (0, 1], `bool` again refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, InputError, StreamTCError


def is_positive_int(value: Any) -> bool:
    """True for an int >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(
    value: Any, name: str, *, optional: bool = False, error: type[StreamTCError] = ConfigError, hint: str = ""
) -> Any:
    """Return value if it is an int >= 1 (or None, when optional); raise `error` naming `name` otherwise.

    hint: appended to the message in parentheses, e.g. "1 refreshes every chunk".
    """
    if (optional and value is None) or is_positive_int(value):
        return value
    expected = "None or an int >= 1" if optional else "an int >= 1"
    raise error(f"{name} must be {expected}{f' ({hint})' if hint else ''}, got {value!r}")


def unit_ratio(value: Any, name: str, *, error: type[StreamTCError] = ConfigError) -> Any:
    """Return value if it is an int or float in (0, 1] (not a bool); raise `error` naming `name`
    otherwise, with one message form ("NAME must lie in (0, 1], got VALUE")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) <= 1.0:
        return value
    raise error(f"{name} must lie in (0, 1], got {value!r}")


def frame_timestamps(timestamps: Sequence[float] | None, count: int, *, after: float | None = None) -> list[float | None]:
    """Per-frame timestamps of `count` frames as floats (None each when none are given); InputError
    unless there is one per frame, each finite and later than the previous one (and than `after`)."""
    if timestamps is None:
        return [None] * count
    if len(timestamps) != count:
        raise InputError(f"got {count} frames but {len(timestamps)} timestamps")
    previous = after
    for stamp in timestamps:
        if not math.isfinite(stamp) or (previous is not None and stamp <= previous):
            raise InputError(f"timestamps must be finite and increasing; got {stamp}"
                             + ("" if previous is None else f" after {previous}"))
        previous = stamp
    return [float(t) for t in timestamps]


__all__ = ["frame_timestamps", "is_positive_int", "positive_int", "unit_ratio"]
