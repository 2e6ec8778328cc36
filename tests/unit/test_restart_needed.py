"""restart_needed: which manifest changes a reload cannot apply."""

from __future__ import annotations

import pytest

from routemqd.manifest import Manifest, loads
from routemqd.restart_needed import RESTART_ONLY, restart_needed

ROUTE = "routes:\n  - {name: a, topic: a/b, handler: m:f}\n"


def manifest(extra: str = "") -> Manifest:
    return loads(extra + ROUTE, "/etc/routemq.yaml")


def test_nothing_when_only_routes_change() -> None:
    old = manifest()
    new = loads("routes:\n  - {name: a, topic: a/c, handler: m:g, workers: 3, shared: true}\n")
    assert restart_needed(old, new) == ()


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ("control:\n  mode: '0660'\n", "control.mode"),
        ("control:\n  socket: /run/other/control.sock\n", "control.socket"),
        ("metrics:\n  listen: 127.0.0.1:9108\n", "metrics.listen"),
        ("logging:\n  level: debug\n", "logging.level"),
        ("logging:\n  format: console\n", "logging.format"),
        ("logging:\n  file: /var/log/routemqd.log\n", "logging.file"),
    ],
)
def test_each_restart_only_setting_is_reported(extra: str, setting: str) -> None:
    assert restart_needed(manifest(), manifest(extra)) == (setting,)
    assert restart_needed(manifest(extra), manifest()) == (setting,)


def test_settings_a_reload_applies_are_not_reported() -> None:
    applied = (
        "supervisor:\n  graceful_timeout: 5s\n  failure_limit: 2\n"
        "broker:\n  host: broker.example\n  keepalive: 10\n"
        "python_path: [/srv/app]\nhost_id: edge-2\ngroup: other\n"
    )
    assert restart_needed(manifest(), manifest(applied)) == ()


def test_several_changes_in_manifest_order() -> None:
    new = manifest("logging:\n  level: debug\ncontrol:\n  mode: '0660'\n")
    assert restart_needed(manifest(), new) == ("control.mode", "logging.level")


def test_names_are_unique() -> None:
    names = [name for name, _ in RESTART_ONLY]
    assert len(names) == len(set(names))
