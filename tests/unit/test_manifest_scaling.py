"""Tests for autoscaled pools in routemqd.manifest: ``workers: {min, max}``, the ``scaling:``
knobs under ``defaults:`` and routes, and every error naming file:line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from routemqd.manifest import Manifest, ManifestError, Scaling, ScalingKnobs, load

SHARED = "routes:\n  - topic: a/b\n    handler: m:f\n    shared: true\n"


def load_text(tmp_path: Path, text: str) -> Manifest:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(0o600)
    return load(path)


def error(tmp_path: Path, text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_text(tmp_path, text)
    return info.value


def test_a_range_starts_at_min_with_default_knobs(tmp_path: Path) -> None:
    (r,) = load_text(tmp_path, SHARED + "    workers: {min: 2, max: 8}\n").routes
    assert r.autoscaled
    assert r.scaling == Scaling(min=2, max=8, knobs=ScalingKnobs())
    assert r.workers == 2 and r.min_workers == 2 and r.max_workers == 8


def test_default_knobs_are_the_documented_ones() -> None:
    k = ScalingKnobs()
    assert (k.up_after, k.down_after) == (5.0, 60.0)
    assert (k.busy_high, k.busy_low, k.host_cpu_max) == (0.8, 0.5, 0.85)


def test_a_number_stays_a_fixed_pool(tmp_path: Path) -> None:
    (r,) = load_text(tmp_path, SHARED + "    workers: 3\n").routes
    assert not r.autoscaled and r.scaling is None
    assert (r.workers, r.min_workers, r.max_workers) == (3, 3, 3)


def test_worker_count_may_be_a_range_too(tmp_path: Path) -> None:
    (r,) = load_text(tmp_path, SHARED + "    worker_count:\n      min: 1\n      max: 4\n").routes
    assert r.scaling is not None and (r.scaling.min, r.scaling.max) == (1, 4)


def test_min_equal_to_max_is_allowed(tmp_path: Path) -> None:
    (r,) = load_text(tmp_path, SHARED + "    workers: {min: 3, max: 3}\n").routes
    assert r.autoscaled and r.min_workers == r.max_workers == 3


def test_knobs_in_defaults_apply_and_a_route_overrides_them_one_by_one(tmp_path: Path) -> None:
    m = load_text(
        tmp_path,
        """\
        defaults:
          scaling:
            up_after: 2s
            down_after: 5m
            busy_high: 90%
        routes:
          - name: inherits
            topic: a/+
            handler: m:f
            shared: true
            workers: {min: 1, max: 4}
          - name: overrides
            topic: b/+
            handler: m:f
            shared: true
            workers: {min: 1, max: 4}
            scaling:
              busy_high: 70
              busy_low: 30%
              host_cpu_max: 95%
          - name: fixed
            topic: c/+
            handler: m:f
            shared: true
            workers: 2
        """,
    )
    inherits, overrides, fixed = m.routes
    assert inherits.scaling is not None and overrides.scaling is not None
    assert inherits.scaling.knobs == ScalingKnobs(up_after=2.0, down_after=300.0, busy_high=0.9)
    assert overrides.scaling.knobs == ScalingKnobs(
        up_after=2.0, down_after=300.0, busy_high=0.7, busy_low=0.3, host_cpu_max=0.95
    )
    assert fixed.scaling is None  # defaults' knobs do not turn a fixed pool into a range


def test_defaults_scaling_does_not_bother_an_ordered_route(tmp_path: Path) -> None:
    m = load_text(
        tmp_path,
        "defaults:\n  scaling: {up_after: 1s}\nroutes:\n  - topic: a/b\n    handler: m:f\n",
    )
    assert m.routes[0].scaling is None


BAD = [
    # (id, route lines after "shared: true", line, field, problem)
    (
        "max-below-min",
        "    workers: {min: 3, max: 2}\n",
        5,
        "routes[0].workers.max",
        "at least min (3)",
    ),
    (
        "min-zero",
        "    workers: {min: 0, max: 2}\n",
        5,
        "routes[0].workers.min",
        "between 1 and 1024",
    ),
    (
        "max-huge",
        "    workers:\n      min: 1\n      max: 5000\n",
        7,
        "routes[0].workers.max",
        "between 1 and 1024",
    ),
    (
        "max-missing",
        "    workers:\n      min: 2\n",
        6,
        "routes[0].workers.max",
        "needs both min and max",
    ),
    (
        "min-missing",
        "    workers: {max: 2}\n",
        5,
        "routes[0].workers.min",
        "needs both min and max",
    ),
    (
        "typo",
        "    workers: {min: 1, maxx: 2}\n",
        5,
        "routes[0].workers.maxx",
        "did you mean 'max'?",
    ),
    (
        "not-a-number",
        "    workers: {min: one, max: 2}\n",
        5,
        "routes[0].workers.min",
        "whole number",
    ),
    ("list", "    workers: [1, 4]\n", 5, "routes[0].workers", "expected a single value"),
    (
        "knobs-on-fixed-pool",
        "    workers: 2\n    scaling: {up_after: 1s}\n",
        6,
        "routes[0].scaling",
        "applies only to an autoscaled pool",
    ),
    (
        "low-not-below-high",
        "    workers: {min: 1, max: 2}\n    scaling:\n      busy_high: 60%\n      busy_low: 60%\n",
        8,
        "routes[0].scaling.busy_low",
        "must be below busy_high",
    ),
    (
        "fraction-refused",
        "    workers: {min: 1, max: 2}\n    scaling:\n      busy_high: 0.8\n",
        7,
        "routes[0].scaling.busy_high",
        "percentage between 1 and 100",
    ),
    (
        "percent-over-100",
        "    workers: {min: 1, max: 2}\n    scaling: {host_cpu_max: 120%}\n",
        6,
        "routes[0].scaling.host_cpu_max",
        "percentage between 1 and 100",
    ),
    (
        "bad-duration",
        "    workers: {min: 1, max: 2}\n    scaling: {up_after: soon}\n",
        6,
        "routes[0].scaling.up_after",
        "expected a duration",
    ),
    (
        "unknown-knob",
        "    workers: {min: 1, max: 2}\n    scaling: {down_afetr: 1m}\n",
        6,
        "routes[0].scaling.down_afetr",
        "did you mean 'down_after'?",
    ),
]


@pytest.mark.parametrize(
    ("body", "line", "fname", "problem"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_ranges_and_knobs_name_line_and_field(
    tmp_path: Path, body: str, line: int, fname: str, problem: str
) -> None:
    e = error(tmp_path, SHARED + body)
    assert (e.line, e.field) == (line, fname), str(e)
    assert problem in e.problem
    assert str(e).startswith(f"{tmp_path / 'm.yaml'}:{line}: {fname}: ")


def test_an_ordered_route_cannot_have_a_range(tmp_path: Path) -> None:
    e = error(
        tmp_path, "routes:\n  - topic: a/b\n    handler: m:f\n    workers: {min: 1, max: 4}\n"
    )
    assert (e.line, e.field) == (4, "routes[0].workers")
    assert "needs 'shared: true'" in e.problem and "cannot scale" in e.problem


def test_bad_knob_in_defaults_names_the_defaults_field(tmp_path: Path) -> None:
    e = error(tmp_path, "defaults:\n  scaling:\n    busy_low: 95%\n" + SHARED)
    assert (e.line, e.field) == (3, "defaults.scaling.busy_low")


def test_a_route_low_water_mark_checked_against_the_inherited_high_one(tmp_path: Path) -> None:
    e = error(
        tmp_path,
        "defaults:\n  scaling: {busy_high: 60%}\n"
        + SHARED
        + "    workers: {min: 1, max: 2}\n    scaling: {busy_low: 70%}\n",
    )
    assert e.field == "routes[0].scaling.busy_low" and "below busy_high (60%)" in e.problem
