"""Write test manifests pointing at a test broker and the handlers in tests/handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(
    path: Path,
    port: int,
    routes: list[dict[str, Any]],
    *,
    protocol: int | str = 5,
    supervisor: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    doc: dict[str, Any] = {
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "protocol": protocol,
            "keepalive": 10,
            "reconnect_min": 0.1,
            "reconnect_max": 1,
            **(broker or {}),
        },
        "host_id": top.pop("host_id", "testhost"),
        "python_path": [str(REPO_ROOT)],
        "supervisor": {
            "graceful_timeout": 10,
            "health_interval": 0.2,
            "healthy_after": 2,
            "failed_cooldown": 2,
            **(supervisor or {}),
        },
        "control": {"socket": str(path.parent / "control.sock")},
        "routes": routes,
        **top,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def route(
    name: str, topic: str, handler: str = "tests.handlers.ledger:record", **kw: Any
) -> dict[str, Any]:
    return {"name": name, "topic": topic, "handler": handler, **kw}
