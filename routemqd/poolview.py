"""Pool-level views for ``routemqd status`` and ``/metrics``: min, max, desired and actual size.

The slot table answers "which process runs where"; operators of an autoscaled pool first ask
"how big is it, how big does it want to be, and why". One ``PoolView`` per route carries that,
built by the master from the plan, its slots and the scaler's last decision, and rendered here
without any master state so both views are unit-tested on plain data.

``desired`` is what the pool should have now (a fixed pool's number, or the scaler's target);
``actual`` counts workers that are ready, subscribed and not on their way out. The two differ
while a step is in progress and when workers crash: that gap is what to alert on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from routemqd.plan import PoolPlan
from routemqd.scaler import Decision


@dataclass(frozen=True)
class PoolView:
    route: str
    autoscaled: bool
    min: int
    max: int
    desired: int
    actual: int
    reason: str | None = None  # the scaler's last reason (hold or step); None for a fixed pool
    load: float | None = None  # mean worker load behind that decision, 0..1
    retiring: int = 0  # slots on their way out: unsubscribing and draining, session still held

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def pool_views(
    plans: Mapping[str, PoolPlan],
    actual: Mapping[str, int],
    decisions: Mapping[str, Decision | None],
    retiring: Mapping[str, int] | None = None,
) -> list[PoolView]:
    """One view per pool, in manifest order. A pool without a decision yet wants its initial
    size (the master starts it there); a fixed pool always wants its number."""
    views = []
    for name, plan in plans.items():
        decision = decisions.get(name) if plan.autoscaled else None
        desired = plan.clamp(decision.desired) if decision is not None else plan.initial
        views.append(
            PoolView(
                route=name,
                autoscaled=plan.autoscaled,
                min=plan.min,
                max=plan.max,
                desired=desired,
                actual=actual.get(name, 0),
                reason=decision.reason.value if decision is not None else None,
                load=decision.measures.load if decision is not None else None,
                retiring=(retiring or {}).get(name, 0),
            )
        )
    return views


def render_pools(pools: Iterable[Mapping[str, Any]]) -> list[str]:
    """The pool table of ``routemqd status``: lines, columns aligned, empty without pools."""
    header = ("POOL", "SIZE", "MIN", "MAX", "DESIRED", "ACTUAL", "RETIRING", "LOAD", "SCALER")
    rows = [header]
    for p in pools:
        load = p.get("load")
        rows.append(
            (
                str(p["route"]),
                "auto" if p.get("autoscaled") else "fixed",
                str(p["min"]),
                str(p["max"]),
                str(p["desired"]),
                str(p["actual"]),
                str(p.get("retiring", 0)),
                f"{load:.0%}" if isinstance(load, int | float) else "-",
                str(p.get("reason") or "-"),
            )
        )
    if len(rows) == 1:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


POOL_GAUGES = (
    ("routemqd_workers_desired", "desired", "Workers the pool should have now (scaler target)."),
    ("routemqd_workers_min", "min", "Smallest size of the pool (its number when fixed)."),
    ("routemqd_workers_max", "max", "Largest size of the pool (its number when fixed)."),
)


def pool_metric_lines(views: Iterable[PoolView]) -> list[str]:
    """Prometheus families for pool sizes, one series per route."""
    views = list(views)
    out: list[str] = []
    for metric, attr, help_text in POOL_GAUGES:
        out.append(f"# HELP {metric} {help_text}")
        out.append(f"# TYPE {metric} gauge")
        for v in views:
            out.append(f'{metric}{{route="{_esc(v.route)}"}} {getattr(v, attr)}')
    return out
