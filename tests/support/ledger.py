"""Read a ledger written by tests/handlers/ledger.py and compare it with what was published."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    ident: str
    pid: int
    dup: bool
    topic: str
    tag: str


def read(path: Path) -> list[Entry]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if len(parts) != 5:
            continue
        out.append(Entry(parts[0], int(parts[1]), parts[2] == "1", parts[3], parts[4]))
    return out


def handled_ids(path: Path) -> set[str]:
    return {e.ident for e in read(path)}


def duplicates(path: Path) -> dict[str, int]:
    counts = Counter(e.ident for e in read(path))
    return {k: v for k, v in counts.items() if v > 1}
