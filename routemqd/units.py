"""Parse the human units people write in a manifest: sizes (``512MB``) and durations (``30s``).

Kept apart from the loader so the rules are small, exact and testable on their own. Sizes follow
IEC/SI strictly (``MB`` is 10**6, ``MiB`` is 2**20) because memory limits that silently differ by
5 % from what was written lead to surprising recycles.
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


class UnitError(ValueError):
    """A value that is not a size or a duration; the message says what would be accepted."""


def parse_size(value: object) -> int:
    """Return a size in bytes from an int or a string such as ``512MB`` or ``1.5GiB``."""
    if isinstance(value, bool):
        raise UnitError(f"expected a size such as 512MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, float):
        raise UnitError(f"expected a size such as 512MB (bytes need a whole number), got {value!r}")
    if not isinstance(value, str):
        raise UnitError(f"expected a size such as 512MB, got {type(value).__name__}")
    m = _NUMBER_UNIT.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise UnitError(
            f"expected a size such as 512MB, 64MiB or 1GB, got {value!r} "
            "(units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
        )
    size = float(m.group(1)) * _SIZE_UNITS[unit]
    if math.isinf(size):
        raise UnitError(f"size {value!r} is too large")
    return int(size)


def parse_duration(value: object) -> float:
    """Return seconds from a number (seconds) or a string such as ``30s``, ``500ms``, ``2m``."""
    if isinstance(value, bool):
        raise UnitError(f"expected a duration such as 30s, got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise UnitError(f"duration {value!r} is too large") from None
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _DURATION_UNITS:
            raise UnitError(
                f"expected a duration such as 30s, 500ms, 2m or 1h, got {value!r} "
                "(units: ms, s, m, h; a bare number is seconds)"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise UnitError(f"expected a duration such as 30s, got {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise UnitError(f"a duration must be a finite, non-negative time, got {value!r}")
    return seconds


def format_size(n: int) -> str:
    """Render bytes the way people read them in status output."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"
