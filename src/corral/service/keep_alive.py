"""Ollama's `keep_alive`: how long a model stays loaded after a request, as seconds or a Go duration."""

from __future__ import annotations

import math

from ..config import parse_duration
from .errors import InvalidRequest


def parse_keep_alive(value: float | str | None) -> float | None:
    """Seconds (negative: keep loaded until the server stops), or None when not given.

    Numbers are seconds; strings are Go durations (`"5m"`, `"1h30m"`, `"300ms"`, `"-1s"`, `"0"`) or numbers.
    """
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_duration(value)
        if math.isnan(value):
            raise ValueError("not a number")
        return float(value)
    except ValueError:
        raise InvalidRequest(
            f"keep_alive {value!r} is not a duration: give seconds (300, -1) or a duration such as '5m' or '1h30m'",
            param="keep_alive",
        ) from None
