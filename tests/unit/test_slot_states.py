"""The slot state table: every legal move is taken, every other one refused, each logged once."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from routemqd.slots import SHOWN, TRANSITIONS, IllegalTransition, Slot, State
from tests.unit.fakes import manifest, specs

LEGAL = [(a, b) for a in State for b in sorted(TRANSITIONS[a])]
ILLEGAL = [(a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a]]
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "DESIGN.md"


def slot_in(state: State) -> Slot:
    slot = Slot(spec=specs(manifest())[0])
    slot.state = state
    return slot


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_every_legal_transition_is_taken(old: State, new: State) -> None:
    slot = slot_in(old)
    with capture_logs() as logs:
        slot.change_state(new, 5.0, reason="x", why="y", retry_in_s=1, delay_s=1, failures=1)
    assert slot.state is new
    assert slot.since == 5.0
    assert len(logs) == 1


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_every_other_transition_is_refused(old: State, new: State) -> None:
    slot = slot_in(old)
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        slot.change_state(new, 5.0)
    assert slot.state is old


def test_operator_events_keep_their_names_and_fields() -> None:
    with capture_logs() as logs:
        slot_in(State.READY).change_state(State.BACKOFF, 1.0, delay_s=0.2, failures=2)
        slot_in(State.READY).change_state(
            State.FAILED, 1.0, reason="exit 9", why="5 failures", retry_in_s=60.0
        )
        slot_in(State.RETIRING).change_state(State.GONE, 1.0)
        slot_in(State.STARTING).change_state(State.READY, 1.0)
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("slot_backoff", "warning"),
        ("slot_failed", "error"),
        ("slot_retired", "info"),
        ("slot_state", "debug"),
    ]
    assert logs[0] == {
        "event": "slot_backoff",
        "log_level": "warning",
        "pool": "r",
        "slot": 0,
        "delay_s": 0.2,
        "failures": 2,
    }
    assert logs[1]["why"] == "5 failures" and logs[1]["retry_in_s"] == 60.0
    assert logs[3]["old"] == State.STARTING and logs[3]["new"] == State.READY


def test_gone_is_final_and_everything_else_can_retire() -> None:
    assert TRANSITIONS[State.GONE] == frozenset()
    for state in State:
        if state not in (State.GONE, State.RETIRING):
            assert State.RETIRING in TRANSITIONS[state], state


def test_status_shows_only_the_documented_names() -> None:
    assert set(SHOWN) == set(State)
    assert set(SHOWN.values()) == {"starting", "ready", "stopping", "backoff", "failed", "retiring"}


def test_the_replace_sequences_are_walks_through_the_table() -> None:
    keep = [State.READY, State.WARMING, State.DRAINING, State.CONNECTING, State.READY]
    new = [State.READY, State.SUBSCRIBING, State.DRAINING, State.READY]
    for walk in (keep, new):
        for a, b in itertools.pairwise(walk):
            assert b in TRANSITIONS[a], (a, b)


def test_design_text_has_the_same_table() -> None:
    """docs/DESIGN.md repeats the table for readers; it must say what the code does."""
    rows = {}
    for line in DESIGN.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| (.+) \|", line)
        if m and m.group(1).upper() in State.__members__:
            targets = set(re.findall(r"`(\w+)`", m.group(2)))
            rows[State[m.group(1).upper()]] = {State[t.upper()] for t in targets}
    assert rows == {state: set(targets) for state, targets in TRANSITIONS.items()}
