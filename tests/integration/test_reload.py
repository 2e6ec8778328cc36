"""SIGHUP and rolling restarts against a real daemon, a real broker and live traffic.

Every test runs a publisher that numbers its messages (~1,000 msg/s, QoS 1) while the daemon
reloads; "lost" means the broker PUBACKed a publish but no handler ever recorded its id. Every wait
is bounded; every process is stopped by the PID that started it.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from routemqd import manifest as manifest_mod
from routemqd import plan
from tests.support import ledger, manifests, timing
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.manifests import REPO_ROOT
from tests.support.traffic import Publisher, session_present, wait_handled

pytestmark = pytest.mark.timeout(90)

RATE = 1000.0
V1 = "tests.handlers.timed:record"
V2 = "tests.handlers.timed:record_v2"
V3 = "tests.handlers.timed:record_v3"

Pids = dict[tuple[str, int], int | None]


class Rig:
    """One test's broker, manifest, ledger files, daemon and publishers."""

    def __init__(self, tmp: Path, broker: Broker, daemon_factory: Callable[..., Daemon]) -> None:
        self.tmp = tmp
        self.broker = broker
        self.daemon_factory = daemon_factory
        self.manifest = tmp / "routemq.yaml"
        self.ledger = tmp / "ledger"
        self.times = tmp / "times"
        self.publishers: list[Publisher] = []
        self.daemon: Daemon | None = None

    def write(self, routes: list[dict[str, Any]], **top: Any) -> Path:
        top.setdefault("python_path", [str(REPO_ROOT)])
        return manifests.write(self.manifest, self.broker.port, routes, **top)

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
        self.daemon = self.daemon_factory(
            self.manifest,
            env={
                "ROUTEMQD_TEST_LEDGER": str(self.ledger),
                "ROUTEMQD_TEST_TIMES": str(self.times),
                "PYTHONDONTWRITEBYTECODE": "1",
                **(env or {}),
            },
        )
        if wait:
            self.daemon.wait_ready(60)
        return self.daemon

    def publisher(
        self, topic_for: Callable[[int], str], start_id: int = 0, rate: float | None = RATE
    ) -> Publisher:
        p = Publisher(*self.broker.address, topic_for=topic_for, start_id=start_id)
        self.publishers.append(p)
        if rate:
            p.start(rate)
        return p

    def close(self) -> None:
        for p in self.publishers:
            p.close()


@pytest.fixture
def rig(tmp_path: Path, broker: Broker, daemon_factory: Callable[..., Daemon]) -> Iterator[Rig]:
    r = Rig(tmp_path, broker, daemon_factory)
    try:
        yield r
    finally:
        r.close()


# ----------------------------------------------------------------------------------- helpers


def route(name: str, handler: str = V1, **kw: Any) -> dict[str, Any]:
    kw.setdefault("topic", f"{name}/{{n}}")
    return manifests.route(name, kw.pop("topic"), handler, **kw)


def pool(name: str, workers: int, handler: str = V1, **kw: Any) -> dict[str, Any]:
    return route(name, handler, shared=True, workers=workers, **kw)


def by_route(*names: str) -> Callable[[int], str]:
    """Spread message ids round-robin over routes whose topics are ``<name>/{n}``."""
    return lambda i: f"{names[i % len(names)]}/{i % 7}"


def pids_of(status: dict[str, Any], route_name: str | None = None) -> Pids:
    return {
        (s["route"], s["index"]): s["pid"]
        for s in status["slots"]
        if route_name is None or s["route"] == route_name
    }


def only(pids: Pids, route_name: str) -> Pids:
    return {k: v for k, v in pids.items() if k[0] == route_name}


def settled(status: dict[str, Any]) -> bool:
    """Every slot runs a ready worker, nothing is being replaced, nothing is retiring."""
    d = status["daemon"]
    return (
        d["ready"] >= d["startable"] > 0
        and all(s["state"] == "ready" and not s["replacing"] for s in status["slots"])
        and len({(s["route"], s["index"]) for s in status["slots"]}) == len(status["slots"])
    )


def all_replaced(old: Pids, route_name: str, workers: int) -> Callable[[dict[str, Any]], bool]:
    """The route has ``workers`` ready slots, each with a PID it did not have before."""
    before = {pid for pid in old.values() if pid}

    def check(status: dict[str, Any]) -> bool:
        rows = [s for s in status["slots"] if s["route"] == route_name]
        return (
            settled(status)
            and len(rows) == workers
            and all(s["pid"] and s["pid"] not in before for s in rows)
        )

    return check


def layout_is(expected: dict[str, int]) -> Callable[[dict[str, Any]], bool]:
    """Settled with exactly these routes and pool sizes."""

    def check(status: dict[str, Any]) -> bool:
        counts: dict[str, int] = {}
        for s in status["slots"]:
            counts[s["route"]] = counts.get(s["route"], 0) + 1
        return settled(status) and counts == expected

    return check


def sighup(d: Daemon) -> float:
    """Send SIGHUP and return when it was sent (monotonic)."""
    at = time.monotonic()
    d.signal(signal.SIGHUP)
    return at


def reload_taken(d: Daemon, before: float | None, timeout: float = 20) -> dict[str, Any]:
    return d.wait_for(
        lambda s: (s["daemon"]["last_reload"] or {}).get("at") != before, timeout, "reload taken"
    )


def last_reload_at(d: Daemon) -> float | None:
    return (d.status()["daemon"]["last_reload"] or {}).get("at")


def client_ids(path: Path) -> dict[tuple[str, int], str]:
    return {key: spec.client_id for key, spec in plan.slots_for(manifest_mod.load(path)).items()}


def finish(
    rig: Rig,
    pubs: list[Publisher],
    timeout: float = 45,
    expect: Callable[[str], bool] | None = None,
) -> tuple[set[str], set[str], int]:
    """Stop publishing, then wait for every acknowledged id (those ``expect`` selects, if given):
    returns (acked, missing, dups)."""
    for p in pubs:
        p.stop()
    acked: set[str] = set()
    for p in pubs:
        p.wait_acked(30)
        acked |= p.acked
    if expect is not None:
        acked = {i for i in acked if expect(i)}
    missing = wait_handled(rig.ledger, acked, timeout)
    dups = sum(n - 1 for n in ledger.duplicates(rig.ledger).values())
    return acked, missing, dups


def report(name: str, acked: set[str], missing: set[str], dups: int, **extra: Any) -> None:
    more = "".join(f", {k}={v}" for k, v in extra.items())
    print(f"\n[{name}] published+acked={len(acked)} lost={len(missing)} dup={dups}{more}")


def assert_no_loss(acked: set[str], missing: set[str]) -> None:
    sample = sorted(missing, key=int)[:20]
    assert not missing, f"lost {len(missing)} of {len(acked)}: {sample}"


def spawned_pids(d: Daemon) -> set[int]:
    return {int(e["pid"]) for e in d.events("worker_spawned")}


def spawned_since_reload(d: Daemon, n: int, pool_name: str) -> set[int]:
    """PIDs the master forked for ``pool_name`` after its ``n``-th applied reload."""
    applied = 0
    out: set[int] = set()
    for e in d.events():
        if e.get("event") == "reload_applied":
            applied += 1
        elif e.get("event") == "worker_spawned" and applied >= n and e.get("pool") == pool_name:
            out.add(int(e["pid"]))
    return out


def overlapping_replaces(d: Daemon, pool_name: str) -> list[dict[str, Any]]:
    """Replaces in ``pool_name`` that began before the previous replacement worker was ready
    (a pool is replaced one slot at a time)."""
    waiting: int | None = None
    early = []
    for e in d.events():
        if e.get("pool") != pool_name:
            continue
        if e.get("event") == "worker_replace":
            if waiting is not None:
                early.append(e)
        elif e.get("event") == "worker_spawned" and e.get("hold"):
            waiting = int(e["pid"])
        elif e.get("event") == "worker_ready" and e.get("pid") == waiting:
            waiting = None
    return early


def log_time(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "routemqd", *args, "--socket", d.socket],
        capture_output=True,
        text=True,
        timeout=30,
    )


def cli_status(d: Daemon) -> str:
    result = cli(d, "status")
    assert result.returncode == 0, result.stderr
    return result.stdout


# ------------------------------------------------------------------------------------- tests


def test_unchanged_manifest_restarts_nothing(rig: Rig) -> None:
    rig.write([pool("alpha", 2), route("beta"), pool("gamma", 3)])
    d = rig.start()
    pub = rig.publisher(by_route("alpha", "beta", "gamma"))
    before = d.pids()
    spawned = spawned_pids(d)
    time.sleep(0.5)

    status = d.reload()
    lr = status["daemon"]["last_reload"]
    assert lr["ok"], lr
    assert lr["summary"]["kept"] == ["alpha", "beta", "gamma"]
    assert not any(lr["summary"][k] for k in ("started", "retired", "scaled", "replaced"))
    time.sleep(1.0)
    status = d.wait_for(settled, 10, "settled")
    assert pids_of(status) == before
    assert all(s["restarts"] == 0 for s in status["slots"])
    assert spawned_pids(d) == spawned, "a reload that changes nothing must not fork"
    assert len(d.events("reload_applied")) == 1

    acked, missing, dups = finish(rig, [pub])
    report("unchanged", acked, missing, dups)
    assert_no_loss(acked, missing)


def test_scale_down_then_up_keeps_slot_zero_and_ends_retired_sessions(rig: Rig) -> None:
    m = rig.write([pool("s", 3), route("other")])
    ids3 = client_ids(m)
    d = rig.start()
    pub = rig.publisher(by_route("s", "s", "other"))
    slot0 = d.slot("s", 0)["pid"]
    other = d.slot("other", 0)["pid"]
    time.sleep(0.7)

    rig.write([pool("s", 1), route("other")])
    status = d.reload()
    assert status["daemon"]["last_reload"]["summary"]["scaled"] == ["s"]
    status = d.wait_for(layout_is({"s": 1, "other": 1}), 30, "scaled down to 1")
    assert pids_of(status) == {("s", 0): slot0, ("other", 0): other}
    retired_events = [e for e in d.events("slot_retired") if e.get("pool") == "s"]
    assert sorted(e["slot"] for e in retired_events) == [1, 2]
    for index in (1, 2):
        cid = ids3[("s", index)]
        assert not session_present(*rig.broker.address, cid), f"{cid} left a session behind"
    time.sleep(0.7)

    rig.write([pool("s", 4), route("other")])
    d.reload()
    status = d.wait_for(layout_is({"s": 4, "other": 1}), 30, "scaled up to 4")
    pids = pids_of(status)
    assert pids[("s", 0)] == slot0
    assert pids[("other", 0)] == other
    assert len({pids[("s", i)] for i in range(4)}) == 4
    time.sleep(1.0)

    acked, missing, dups = finish(rig, [pub])
    report("scale 3->1->4", acked, missing, dups)
    assert_no_loss(acked, missing)
    handled_by = {e.pid for e in ledger.read(rig.ledger) if e.topic.startswith("s/")}
    assert {pids[("s", i)] for i in range(4)} <= handled_by, "every new slot takes its share"


def test_scale_up_while_the_retired_slots_are_still_draining(rig: Rig) -> None:
    """Scale 3 -> 1 and straight back to 3: the returning slots reuse the retiring slots' client
    ids, so they must wait until those have let go, and nothing may be left over."""
    m = rig.write([pool("s", 3)])
    ids3 = client_ids(m)
    d = rig.start()
    pub = rig.publisher(by_route("s"))
    slot0 = d.slot("s", 0)["pid"]
    time.sleep(0.7)

    rig.write([pool("s", 1)])
    d.reload()
    rig.write([pool("s", 3)])
    status = d.reload()
    retiring = [s for s in status["slots"] if s["state"] == "retiring"]
    status = d.wait_for(layout_is({"s": 3}), 40, "back at 3 slots")
    assert pids_of(status)[("s", 0)] == slot0
    assert [s["client_id"] for s in status["slots"]] == [ids3[("s", i)] for i in range(3)]
    time.sleep(1.0)

    acked, missing, dups = finish(rig, [pub])
    report("scale 3->1->3 overlapping", acked, missing, dups, retiring_at_second_hup=len(retiring))
    assert_no_loss(acked, missing)
    status = d.wait_for(layout_is({"s": 3}), 10, "still 3 slots")
    assert len(status["slots"]) == 3
    kicked = [e for e in d.events("disconnected") if e.get("pool") == "s"]
    assert not kicked, f"two clients shared a client id: {kicked[:3]}"


def test_handler_change_replaces_every_slot_without_loss(rig: Rig) -> None:
    rig.write([pool("s", 3), route("other")])
    d = rig.start()
    pub = rig.publisher(by_route("s", "s", "s", "other"))
    old = d.pids()
    time.sleep(1.0)

    rig.write([pool("s", 3, handler=V2), route("other")])
    before = last_reload_at(d)
    hup_wall = time.time()
    t0 = sighup(d)
    reload_taken(d, before)
    status = d.wait_for(all_replaced(old, "s", 3), 60, "every slot replaced")
    t1 = time.monotonic()
    ready_wall = time.time()
    boundary = pub.next_id
    assert pids_of(status, "other") == only(old, "other")
    assert status["daemon"]["last_reload"]["summary"]["replaced"] == ["s"]
    time.sleep(1.5)

    acked, missing, dups = finish(rig, [pub])
    entries = ledger.read(rig.ledger)
    late = [e for e in entries if e.topic.startswith("s/") and int(e.ident) >= boundary]
    assert late, "traffic after the reload reached the new workers"
    assert {e.tag for e in late} == {"v2"}, "messages published after the reload ran v2"
    new_pids = set(pids_of(status, "s").values())
    assert {e.pid for e in late} <= new_pids
    gap, gap_at = timing.longest_gap(
        timing.read(rig.times), hup_wall - 1.0, ready_wall + 1.0, topic_prefix="s/"
    )
    duration = t1 - t0
    requested = log_time(d.events("reload_requested")[-1])
    last_ready = max(
        log_time(e)
        for e in d.events("worker_ready")
        if e.get("pool") == "s" and e["pid"] in new_pids
    )
    report(
        "handler change",
        acked,
        missing,
        dups,
        reload_s=f"{duration:.3f}",
        reload_in_log_s=f"{last_ready - requested:.3f}",
        longest_gap_s=f"{gap:.3f}",
        gap_began_after_hup_s=f"{gap_at - hup_wall:+.3f}",
    )
    assert_no_loss(acked, missing)
    replaced = [e for e in d.events("worker_replace") if e.get("pool") == "s"]
    assert len(replaced) == 3
    assert {e["session"] for e in replaced} == {"kept"}
    assert not overlapping_replaces(d, "s")


def test_topic_change_moves_the_subscription(rig: Rig) -> None:
    m = rig.write([pool("mover", 2, topic="old/{n}"), pool("steady", 2)])
    old_ids = client_ids(m)
    d = rig.start()
    pub = rig.publisher(lambda i: f"old/{i % 5}" if i % 2 else f"steady/{i % 5}")
    old = d.pids()
    time.sleep(1.0)

    rig.write([pool("mover", 2, topic="new/{n}"), pool("steady", 2)])
    published_before = set(pub.published)
    status = d.reload()
    assert status["daemon"]["last_reload"]["summary"]["replaced"] == ["mover"]
    status = d.wait_for(all_replaced(old, "mover", 2), 60, "mover replaced")
    new_pub = rig.publisher(lambda i: f"new/{i % 5}", start_id=1_000_000, rate=300)
    assert pids_of(status, "steady") == only(old, "steady")
    new_ids = {(s["route"], s["index"]): s["client_id"] for s in status["slots"]}
    for i in range(2):
        assert new_ids[("mover", i)] != old_ids[("mover", i)]
        assert not session_present(*rig.broker.address, old_ids[("mover", i)])
    time.sleep(1.0)

    steady = {i for i in pub.published if int(i) % 2 == 0}
    mover_before = {i for i in published_before if int(i) % 2}
    new_topic = set(new_pub.published)
    counted = steady | mover_before | new_topic
    acked, missing, dups = finish(rig, [pub, new_pub], expect=counted.__contains__)
    report("topic change", acked, missing, dups)
    assert_no_loss(acked & steady, missing & steady)
    assert_no_loss(acked & mover_before, missing & mover_before)
    assert_no_loss(acked & new_topic, missing & new_topic)

    # The old topic has nobody left: what is published there now is never handled.
    late = rig.publisher(lambda i: f"old/{i % 5}", start_id=2_000_000, rate=None)
    late.publish_many(200)
    late.wait_acked(30)
    probe = rig.publisher(lambda i: f"new/{i % 5}", start_id=3_000_000, rate=None)
    probe.publish_many(50)
    probe.wait_acked(30)
    assert not wait_handled(rig.ledger, probe.acked, 30)
    time.sleep(0.5)
    assert not (set(late.published) & ledger.handled_ids(rig.ledger))
    new_workers = set(pids_of(d.status(), "mover").values())
    assert not [
        e for e in ledger.read(rig.ledger) if e.topic.startswith("old/") and e.pid in new_workers
    ]


def test_add_and_delete_routes_in_one_reload(rig: Rig) -> None:
    m = rig.write([pool("a", 2), route("b"), pool("c", 2)])
    old_ids = client_ids(m)
    d = rig.start()
    pub = rig.publisher(by_route("a", "b", "c"))
    old = d.pids()
    time.sleep(1.0)

    # Nothing subscribes to d/ until the reload: publish there only once d is ready.
    pub.stop()
    pub.wait_acked(30)
    pub2 = rig.publisher(by_route("a", "c"), start_id=1_000_000)
    rig.write([pool("a", 2), pool("c", 2), pool("d", 2)])
    status = d.reload()
    summary = status["daemon"]["last_reload"]["summary"]
    assert summary["kept"] == ["a", "c"]
    assert summary["started"] == ["d"]
    assert summary["retired"] == ["b"]
    status = d.wait_for(layout_is({"a": 2, "c": 2, "d": 2}), 30, "d started, b retired")
    pids = pids_of(status)
    for key in (("a", 0), ("a", 1), ("c", 0), ("c", 1)):
        assert pids[key] == old[key], key
    assert not session_present(*rig.broker.address, old_ids[("b", 0)])
    pub3 = rig.publisher(by_route("d"), start_id=2_000_000, rate=300)
    time.sleep(1.0)

    acked, missing, dups = finish(rig, [pub, pub2, pub3])
    report("add+delete routes", acked, missing, dups)
    assert_no_loss(acked, missing)
    d_pids = {pids[("d", 0)], pids[("d", 1)]}
    assert {e.pid for e in ledger.read(rig.ledger) if e.topic.startswith("d/")} == d_pids
    b_pid = old[("b", 0)]
    assert {e.pid for e in ledger.read(rig.ledger) if e.topic.startswith("b/")} == {b_pid}


BROKEN: list[tuple[str, Callable[[str, dict[str, Any]], str]]] = []


def _broken(name: str) -> Callable[[Callable[[dict[str, Any]], Any]], Any]:
    def register(edit: Callable[[dict[str, Any]], Any]) -> Any:
        def apply(text: str, doc: dict[str, Any]) -> str:
            result = edit(doc)
            return result if isinstance(result, str) else yaml.safe_dump(doc, sort_keys=False)

        BROKEN.append((name, apply))
        return edit

    return register


@_broken("yaml syntax error")
def _(doc: dict[str, Any]) -> str:
    text = yaml.safe_dump(doc, sort_keys=False)
    return text.replace("routes:\n", "routes:\n  - {name: [oops\n", 1)


@_broken("unknown key")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][0]["colour"] = "red"


@_broken("bad handler path syntax")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][0]["handler"] = "tests.handlers.timed.record"


@_broken("workers 0")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][0]["workers"] = 0


@_broken("duplicate route names")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][1]["name"] = doc["routes"][0]["name"]


@_broken("bad topic")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][1]["topic"] = "b/#/more"


@_broken("bad duration")
def _(doc: dict[str, Any]) -> None:
    doc["supervisor"]["graceful_timeout"] = "ten seconds"


@_broken("non-shared with 2 workers")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][1]["workers"] = 2


@_broken("wrong type")
def _(doc: dict[str, Any]) -> None:
    doc["routes"][0]["shared"] = "sometimes"


@_broken("missing routes")
def _(doc: dict[str, Any]) -> None:
    del doc["routes"]


def test_broken_manifests_change_nothing(rig: Rig) -> None:
    m = rig.write([pool("a", 2), route("b")])
    good_text = m.read_text()
    d = rig.start()
    pub = rig.publisher(by_route("a", "b"))
    old = d.pids()
    assert len(BROKEN) == 10
    location = re.compile(re.escape(str(m)) + r":\d+: ")
    for n, (name, make) in enumerate(BROKEN, start=1):
        m.write_text(make(good_text, yaml.safe_load(good_text)))
        with pytest.raises(manifest_mod.ManifestError):
            manifest_mod.load(m)
        before = last_reload_at(d)
        sighup(d)
        status = reload_taken(d, before)
        lr = status["daemon"]["last_reload"]
        assert lr["ok"] is False, name
        assert location.match(lr["error"] or ""), f"{name}: {lr['error']!r}"
        assert len(d.events("reload_failed")) == n, name
        assert pids_of(status) == old, name
    assert spawned_pids(d) == {pid for pid in old.values() if pid}
    shown = cli_status(d)
    assert re.search(r"last reload .*FAILED: " + re.escape(str(m)) + r":\d+: ", shown), shown

    rig.write([pool("a", 3), route("b")])
    status = d.reload()
    lr = status["daemon"]["last_reload"]
    assert lr["ok"] and lr["error"] is None, lr
    assert lr["summary"]["scaled"] == ["a"]
    status = d.wait_for(layout_is({"a": 3, "b": 1}), 30, "good edit applied")
    pids = pids_of(status)
    assert {k: pids[k] for k in old} == old

    acked, missing, dups = finish(rig, [pub])
    report("ten broken manifests", acked, missing, dups)
    assert_no_loss(acked, missing)


BROKEN_MODULE = """\
from tests.handlers.timed import record_v2 as handle

raise RuntimeError("hotmod is broken at import")
"""
FIXED_MODULE = """\
from tests.handlers.timed import record_v2 as handle  # fixed: imports cleanly now
"""


def test_handler_that_fails_to_import_keeps_the_running_workers(rig: Rig) -> None:
    code = rig.tmp / "code"
    code.mkdir()
    module = code / "hotmod.py"
    module.write_text(BROKEN_MODULE)
    path = [str(REPO_ROOT), str(code)]
    rig.write([pool("s", 2), route("other")], python_path=path)
    d = rig.start()
    pub = rig.publisher(by_route("s", "other"))
    old = d.pids()
    time.sleep(0.5)

    rig.write([pool("s", 2, handler="hotmod:handle"), route("other")], python_path=path)
    d.reload()
    status = d.wait_for(
        lambda s: not s["daemon"]["last_reload"]["ok"], 30, "the failed replace reported"
    )
    error = status["daemon"]["last_reload"]["error"]
    assert "route s" in error and "hotmod" in error and "RuntimeError" in error, error
    assert [e for e in d.events("replacement_failed") if e.get("pool") == "s"]
    assert "hotmod is broken at import" in cli_status(d)
    time.sleep(1.0)
    status = d.wait_for(settled, 10, "settled on the old workers")
    assert pids_of(status) == old
    assert not status["daemon"]["last_reload"]["ok"]
    mark = pub.next_id
    time.sleep(1.0)
    assert not wait_handled(rig.ledger, {i for i in pub.acked if int(i) >= mark}, 30), (
        "the old workers keep handling traffic"
    )

    module.write_text(FIXED_MODULE)
    d.reload()
    status = d.wait_for(all_replaced(old, "s", 2), 60, "the fix applied")
    assert status["daemon"]["last_reload"]["ok"], status["daemon"]["last_reload"]
    assert pids_of(status, "other") == {("other", 0): old[("other", 0)]}
    boundary = pub.next_id
    time.sleep(1.0)

    acked, missing, dups = finish(rig, [pub])
    report("import failure then fix", acked, missing, dups)
    assert_no_loss(acked, missing)
    late = [
        e for e in ledger.read(rig.ledger) if e.topic.startswith("s/") and int(e.ident) >= boundary
    ]
    assert late and {e.tag for e in late} == {"v2"}


def test_rolling_restart_from_the_cli(rig: Rig) -> None:
    rig.write([pool("s", 3), pool("other", 2)])
    d = rig.start()
    pub = rig.publisher(by_route("s", "other"))
    old = d.pids()
    time.sleep(1.0)

    result = cli(d, "restart", "s")
    assert result.returncode == 0, result.stderr
    assert "rolling restart of s started" in result.stdout
    status = d.wait_for(all_replaced(old, "s", 3), 60, "every slot of s restarted")
    assert pids_of(status, "other") == only(old, "other")
    assert status["daemon"]["last_reload"]["at"] is None, "a restart is not a reload"
    time.sleep(1.0)

    acked, missing, dups = finish(rig, [pub])
    report("rolling restart", acked, missing, dups)
    assert_no_loss(acked, missing)
    replaced = [e for e in d.events("worker_replace") if e.get("pool") == "s"]
    assert len(replaced) == 3 and {e["session"] for e in replaced} == {"kept"}
    assert not overlapping_replaces(d, "s")

    bad = cli(d, "restart", "nope")
    assert bad.returncode == 1 and "no such route" in bad.stderr


def test_second_sighup_during_a_reload_applies_the_newest_file(rig: Rig) -> None:
    rig.write([pool("s", 2), route("other")])
    d = rig.start()
    pub = rig.publisher(by_route("s", "other"))
    old = d.pids()
    time.sleep(0.7)

    rig.write([pool("s", 2, handler=V2), route("other")])
    before = last_reload_at(d)
    sighup(d)
    first = reload_taken(d, before)
    first_at = first["daemon"]["last_reload"]["at"]
    rig.write([pool("s", 3, handler=V3), route("other")])
    sighup(d)
    mid_replace = any(s["replacing"] for s in first["slots"]) or not settled(first)

    status = d.wait_for(
        lambda s: (
            s["daemon"]["last_reload"]["at"] != first_at and layout_is({"s": 3, "other": 1})(s)
        ),
        60,
        "the newest manifest applied",
    )
    assert status["daemon"]["last_reload"]["ok"]

    def on_newest(status: dict[str, Any]) -> bool:
        newest = spawned_since_reload(d, 2, "s")
        rows = [x for x in status["slots"] if x["route"] == "s"]
        return settled(status) and len(rows) == 3 and all(x["pid"] in newest for x in rows)

    status = d.wait_for(on_newest, 60, "all slots on the newest handler")
    assert pids_of(status, "other") == {("other", 0): old[("other", 0)]}
    boundary = pub.next_id
    time.sleep(1.5)

    acked, missing, dups = finish(rig, [pub])
    report("two SIGHUPs", acked, missing, dups, second_hup_mid_replace=mid_replace)
    assert_no_loss(acked, missing)
    late = [
        e for e in ledger.read(rig.ledger) if e.topic.startswith("s/") and int(e.ident) >= boundary
    ]
    assert late and {e.tag for e in late} == {"v3"}
    assert len(d.events("reload_applied")) == 2


def test_reload_that_fixes_a_failed_slot_starts_it_at_once(rig: Rig) -> None:
    code = rig.tmp / "code"
    code.mkdir()
    (code / "hotmod.py").write_text(BROKEN_MODULE)
    path = [str(REPO_ROOT), str(code)]
    supervisor = {"failed_cooldown": "5m"}
    rig.write(
        [route("s", handler="hotmod:handle"), route("other")],
        python_path=path,
        supervisor=supervisor,
    )
    d = rig.start(wait=False)
    d.wait_for(
        lambda s: {x["route"]: x["state"] for x in s["slots"]} == {"s": "failed", "other": "ready"},
        60,
        "s parked as failed",
    )
    other = d.slot("other", 0)["pid"]
    pub = rig.publisher(by_route("other"))

    rig.write([route("s", handler=V2), route("other")], python_path=path, supervisor=supervisor)
    status = d.reload()
    assert status["daemon"]["last_reload"]["summary"]["replaced"] == ["s"]
    status = d.wait_for(layout_is({"s": 1, "other": 1}), 30, "s started without the cool-down")
    assert pids_of(status, "other") == {("other", 0): other}
    probe = rig.publisher(by_route("s"), start_id=1_000_000, rate=None)
    probe.publish_many(100)

    acked, missing, dups = finish(rig, [pub, probe])
    report("failed slot fixed by reload", acked, missing, dups)
    assert_no_loss(acked, missing)
    assert {e.tag for e in ledger.read(rig.ledger) if e.topic.startswith("s/")} == {"v2"}


def test_a_retiring_worker_killed_mid_drain_is_drained_by_another(rig: Rig) -> None:
    """Scale 2 -> 1 with a backlog, then SIGKILL the retiring worker while it still holds
    messages: its session must not be stranded. A new worker resumes it and retires it again."""
    m = rig.write([pool("s", 2, handler="tests.handlers.ledger:record")])
    ids = client_ids(m)
    d = rig.start()
    pub = Publisher(
        *rig.broker.address,
        topic_for=lambda i: f"s/{i % 7}",
        payload_for=lambda i: f"{i}:sleep=0.02",
    )
    rig.publishers.append(pub)
    pub.publish_many(400)  # about 4 s of work for each worker
    pub.wait_acked(30)
    d.wait_for(
        lambda s: any(x["handled"] > 0 for x in s["slots"] if x["index"] == 1),
        30,
        "slot 1 is handling",
    )

    rig.write([pool("s", 1, handler="tests.handlers.ledger:record")])
    status = d.reload()
    retiring = [x for x in status["slots"] if x["index"] == 1 and x["state"] == "retiring"]
    assert retiring and retiring[0]["pid"], status["slots"]
    victim = retiring[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    status = d.wait_for(layout_is({"s": 1}), 60, "scaled down to 1")
    acked, missing, dups = finish(rig, [pub])
    report("retiring worker killed", acked, missing, dups)
    assert_no_loss(acked, missing)
    resumed = [e for e in d.events("retire_resumed") if e.get("slot") == 1]
    assert resumed and resumed[0]["client_id"] == ids[("s", 1)]
    assert not session_present(*rig.broker.address, ids[("s", 1)]), "slot 1 left a session"
