"""Read the handling times written by tests/handlers/timed.py and find gaps in them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Handled:
    ident: str
    pid: int
    topic: str
    at: float  # unix time the handler finished the message


def read(path: Path) -> list[Handled]:
    """Every complete line, in file (handling) order."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if len(parts) != 4:
            continue
        out.append(Handled(parts[0], int(parts[1]), parts[2], float(parts[3])))
    return out


def longest_gap(
    entries: list[Handled], start: float, end: float, topic_prefix: str = ""
) -> tuple[float, float]:
    """The longest time between two consecutive handled messages within ``[start, end]`` (unix
    time), counting the edges of the window; returns ``(gap seconds, when the gap began)``."""
    times = sorted(
        e.at for e in entries if start <= e.at <= end and e.topic.startswith(topic_prefix)
    )
    points = [start, *times, end]
    best, began = 0.0, start
    for a, b in itertools.pairwise(points):
        if b - a > best:
            best, began = b - a, a
    return best, began
