"""A handler's own structlog events name their slot (pool, slot, pid), on every kind of runner:
inline on the socket thread, a thread pool, the event loop, and the setup hook on the main
thread. Operators filter the journal by ``pool``; an event without it is lost in the crowd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support import manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import Publisher, wait_handled

H = "tests.handlers.logging_handlers"


def test_handler_and_hook_events_carry_pool_slot_and_pid(
    broker: Broker,
    daemon_factory: Callable[..., Daemon],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.txt"
    routes = [
        manifests.route("inline", "logs/inline/+", handler=f"{H}:handle", setup=f"{H}:setup"),
        manifests.route(
            "pooled", "logs/pooled/+", handler=f"{H}:handle", shared=True, concurrency=2
        ),
        manifests.route("looped", "logs/looped/+", handler=f"{H}:handle_async"),
    ]
    d = daemon_factory(
        manifests.write(tmp_path / "routemq.yaml", broker.port, routes),
        env={"ROUTEMQD_TEST_LEDGER": str(ledger)},
    )
    pids = {s["route"]: s["pid"] for s in d.wait_ready()["slots"]}
    topics = {"inline": "logs/inline/1", "pooled": "logs/pooled/2", "looped": "logs/looped/3"}
    p = Publisher(*broker.address, topic_for=lambda i: list(topics.values())[i])
    publishers.append(p)
    p.publish_many(3)
    assert wait_handled(ledger, {"0", "1", "2"}, timeout=30) == set()

    handled = {e["topic"]: e for e in d.events("user_handled")}
    for pool, topic in topics.items():
        event = handled[topic]
        assert (event["pool"], event["slot"], event["pid"]) == (pool, 0, pids[pool]), event
    (setup,) = d.events("user_setup")
    assert (setup["pool"], setup["slot"], setup["pid"]) == ("inline", 0, pids["inline"])
