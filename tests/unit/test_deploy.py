"""deploy/: the Prometheus alerting rules and the Grafana dashboard match the shipped metrics.

promtool (from Debian's prometheus package; scripts/system-deps extracts it) checks the rules'
syntax and runs their unit tests (deploy/prometheus/routemqd-alerts.test.yml), so every alert is
shown to fire on the series it is about.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from routemqd.metrics import render
from tests.unit.test_metrics import FakeMaster, make_proc, make_slot

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "routemqd-dashboard.json"
PROMTOOL = shutil.which("promtool") or next(
    (
        p
        for p in (os.environ.get("PROMTOOL", ""), "/var/cache/routemqd/bin/promtool")
        if p and os.access(p, os.X_OK)
    ),
    None,
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (make system-deps)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_alert_rules_are_valid() -> None:
    r = _promtool("check", "rules", "routemqd-alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alert_rules_fire_on_what_they_watch() -> None:
    r = _promtool("test", "rules", "routemqd-alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def _shipped_metric_names() -> set[str]:
    master = FakeMaster([make_slot("r", make_proc())])
    return set(re.findall(r"^# TYPE (\S+) ", render(master), re.M))


def _names_in(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(routemqd_[a-z_]+)", expr)}


def _base(name: str, shipped: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in shipped:
            return name[: -len(suffix)]
    return name


def test_rules_and_dashboard_use_only_shipped_metrics() -> None:
    shipped = _shipped_metric_names()
    text = (PROM / "routemqd-alerts.yml").read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = _names_in(text) | {n for e in exprs for n in _names_in(e)}
    assert used, "no routemqd series referenced"
    unknown = {n for n in used if _base(n, shipped) not in shipped}
    assert not unknown, f"not exported by routemqd: {sorted(unknown)}"
    # every shipped series is on the dashboard
    on_dashboard = {_base(n, shipped) for e in exprs for n in _names_in(e)}
    assert shipped - on_dashboard == set()


def test_alerts_cover_what_operators_page_on() -> None:
    text = (PROM / "routemqd-alerts.yml").read_text()
    names = set(re.findall(r"- alert: (\S+)", text))
    assert {
        "RouteMQSlotFailed",
        "RouteMQRestartsHigh",
        "RouteMQReloadFailed",
        "RouteMQWorkersBelowDesired",
        "RouteMQNotKeepingUp",
    } <= names
