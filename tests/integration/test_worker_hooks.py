"""Setup, teardown and middleware in real workers under a real master and broker.

Every call of a hook or middleware leaves a line in a journal (tests/handlers/hooked.py) written
with O_APPEND by all workers, so line order is call order; messages are counted by id in the
ledger. A handler that finds no setup in its process fails its message, so "every acked id was
handled" also says "setup ran before the first message".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import Publisher, Subscriber, wait_handled

pytestmark = pytest.mark.timeout(180)

DaemonFactory = Callable[..., Daemon]
H = "tests.handlers.hooked"


@dataclass(frozen=True)
class Line:
    what: str
    pid: int
    detail: str


def journal(path: Path) -> list[Line]:
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().splitlines():
        what, pid, detail = raw.split(" ", 2)
        out.append(Line(what, int(pid), detail))
    return out


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {"ledger": tmp_path / "ledger.txt", "hooks": tmp_path / "hooks.txt"}


def start(daemon_factory: DaemonFactory, manifest: Path, files: dict[str, Path]) -> Daemon:
    env = {"ROUTEMQD_TEST_LEDGER": str(files["ledger"]), "ROUTEMQD_TEST_HOOKS": str(files["hooks"])}
    return daemon_factory(manifest, env=env)


def publish(
    publishers: list[Publisher], broker: Broker, topic_for: Callable[[int], str], n: int, **kw: Any
) -> set[str]:
    start_id = sum(len(p.published) for p in publishers) + 100_000 * len(publishers)
    p = Publisher(*broker.address, topic_for=topic_for, start_id=start_id, **kw)
    publishers.append(p)
    p.publish_many(n)
    p.wait_acked(30)
    return p.acked


def handled_all(files: dict[str, Path], acked: set[str]) -> None:
    missing = wait_handled(files["ledger"], acked, 60)
    assert not missing, f"{len(missing)} acked ids never handled: {sorted(missing)[:10]}"


# --------------------------------------------------------------------- setup and teardown


def _lifecycle_routes(kind: str, workers: int) -> list[dict[str, Any]]:
    suffix = "_async" if kind == "async" else ""
    hooks = {
        "setup": f"{H}:setup{suffix}",
        "teardown": f"{H}:teardown{suffix}",
        "handler": f"{H}:record{suffix}",
        "middleware": [f"{H}:outer{suffix}"],  # notes each message in the journal
    }
    return [
        manifests.route("ordered", "ordered/{n}", **hooks),
        manifests.route("shared", "shared/{n}", shared=True, workers=workers, **hooks),
    ]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_setup_before_first_message_teardown_after_last_on_every_graceful_path(
    kind: str,
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    files: dict[str, Path],
) -> None:
    manifest = tmp_path / "routemq.yaml"
    manifests.write(manifest, broker.port, _lifecycle_routes(kind, workers=2))
    d = start(daemon_factory, manifest, files)
    d.wait_ready(30)
    acked: set[str] = set()

    def traffic(n: int = 60) -> None:
        topic = lambda i: f"{('ordered', 'shared')[i % 2]}/{i}"  # noqa: E731
        acked.update(publish(publishers, broker, topic, n))
        handled_all(files, acked)

    traffic()
    # replace: a rolling restart keeps each slot's session (a recycle takes the same path)
    before = set(d.pids().values())
    d.control(cmd="restart", routes=["ordered", "shared"])
    d.wait_for(
        lambda s: (
            all(x["state"] == "ready" and not x["replacing"] for x in s["slots"])
            and not {x["pid"] for x in s["slots"]} & before
        ),
        60,
        "every slot replaced",
    )
    traffic()
    # retire: scaled down, slot 1 leaves the group and ends its session
    manifests.write(manifest, broker.port, _lifecycle_routes(kind, workers=1))
    d.reload()
    d.wait_for(
        lambda s: len(s["slots"]) == 2 and all(x["state"] == "ready" for x in s["slots"]),
        30,
        "slot 1 retired",
    )
    traffic()
    # SIGTERM: the workers left stop, keeping their sessions
    assert d.stop(60) == 0

    entries = ledger.read(files["ledger"])
    assert {e.ident for e in entries} >= acked
    by_pid: dict[int, list[Line]] = defaultdict(list)
    for x in journal(files["hooks"]):
        by_pid[x.pid].append(x)
    # 3 workers at first and 3 replacements; each ran setup once, first, and teardown once,
    # last, on its route's loop for async routes
    assert len(by_pid) == 6, dict(by_pid)
    for pid, lines in by_pid.items():
        whats = [x.what for x in lines]
        assert whats[0] == "setup" and whats[-1] == "teardown", (pid, whats)
        assert whats.count("setup") == 1 and whats.count("teardown") == 1, (pid, whats)
        assert set(whats[1:-1]) <= {"outer-in", "outer-out"}, (pid, whats)
        assert lines[-1].detail != "other-loop", "async teardown ran on another loop"
    assert {e.pid for e in entries} <= set(by_pid)
    assert sum(1 for ls in by_pid.values() for x in ls if x.what == "outer-out") >= len(acked)


# ------------------------------------------------------------------------- failing setup


def test_a_failing_setup_parks_only_its_pool_with_the_error_in_status(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    files: dict[str, Path],
) -> None:
    manifest = tmp_path / "routemq.yaml"
    manifests.write(
        manifest,
        broker.port,
        [
            manifests.route(
                "good",
                "good/{n}",
                shared=True,
                workers=2,
                setup=f"{H}:setup",
                handler=f"{H}:record",
            ),
            manifests.route("raises", "raises/{n}", setup=f"{H}:setup_raises"),
            manifests.route("hangs", "hangs/{n}", setup=f"{H}:setup_hangs", setup_timeout=1),
            # setup slower than heartbeat_timeout: heartbeats go on, so it is not "frozen"
            manifests.route(
                "slow",
                "slow/{n}",
                setup=f"{H}:setup_slow",
                # under the setup's 3 s, with room for five workers booting on two busy cores
                heartbeat_timeout=2,
                setup_timeout=20,
                handler=f"{H}:record",
            ),
        ],
        supervisor={"failed_cooldown": 120},
    )
    d = start(daemon_factory, manifest, files)

    def settled(s: dict[str, Any]) -> bool:
        states = {(x["route"], x["index"]): x["state"] for x in s["slots"]}
        return (
            states.pop(("raises", 0)) == "failed"
            and states.pop(("hangs", 0)) == "failed"
            and set(states.values()) == {"ready"}
        )

    status = d.wait_for(settled, 60, "the broken setups failed, the others ready")
    by_route = {x["route"]: x for x in status["slots"]}
    assert (
        "setup tests.handlers.hooked:setup_raises raised ConnectionRefusedError"
        in (by_route["raises"]["last_reason"])
    ), by_route["raises"]
    assert "did not finish within 1s" in by_route["hangs"]["last_reason"], by_route["hangs"]
    assert by_route["slow"]["restarts"] == 0, by_route["slow"]
    assert status["daemon"]["failed"] == 2
    logged = {e["pool"]: e for e in d.events("setup_failed")}
    assert set(logged) == {"raises", "hangs"}, logged
    assert "ConnectionRefusedError" in (logged["raises"].get("detail") or ""), logged["raises"]
    failed = {e["pool"] for e in d.events("slot_failed")}
    assert failed == {"raises", "hangs"}
    assert not [e for e in d.events("slot_backoff") if e["pool"] not in failed]

    healthy = {k: v for k, v in d.pids().items() if k[0] in ("good", "slow")}
    acked = publish(publishers, broker, lambda i: f"{('good', 'slow')[i % 2]}/{i}", 100)
    handled_all(files, acked)
    assert {k: v for k, v in d.pids().items() if k in healthy} == healthy
    assert d.stop(60) == 0


def test_a_replacement_whose_setup_fails_leaves_the_old_worker_serving(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    files: dict[str, Path],
) -> None:
    manifest = tmp_path / "routemq.yaml"

    def write(setup: str) -> None:
        manifests.write(
            manifest,
            broker.port,
            [manifests.route("r", "r/{n}", setup=setup, handler="tests.handlers.ledger:record")],
        )

    write(f"{H}:setup")
    d = start(daemon_factory, manifest, files)
    old = d.wait_ready(30)["slots"][0]["pid"]
    write(f"{H}:setup_raises")
    d.reload()
    d.wait_for(
        lambda s: any(e["pool"] == "r" for e in d.events("replacement_failed")),
        30,
        "the replacement failed",
    )
    status = d.wait_for(lambda s: not s["slots"][0]["replacing"], 30, "replace abandoned")
    assert status["slots"][0]["pid"] == old and status["slots"][0]["state"] == "ready"
    acked = publish(publishers, broker, lambda i: f"r/{i}", 50)
    handled_all(files, acked)
    assert {e.pid for e in ledger.read(files["ledger"])} == {old}


# ------------------------------------------------------------------------------ middleware


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_middleware_runs_outermost_first_and_its_exception_is_a_handler_failure(
    kind: str,
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    files: dict[str, Path],
) -> None:
    suffix = "_async" if kind == "async" else ""
    manifest = tmp_path / "routemq.yaml"
    manifests.write(
        manifest,
        broker.port,
        [
            manifests.route(
                "mw",
                "mw/{n}",
                handler=f"tests.handlers.ledger:record{suffix}",
                middleware=[f"{H}:outer{suffix}", f"{H}:inner{suffix}"],
                dead_letter_topic="dlq/mw",
                shared=True,
                workers=1,
                concurrency=2 if kind == "async" else 1,  # sync: the inline runner
            ),
            manifests.route(
                "pool",
                "pool/{n}",
                handler="tests.handlers.ledger:record",
                middleware=[f"{H}:outer", f"{H}:inner"],
                shared=True,
                workers=1,
                concurrency=3,  # the pool runner
            ),
        ],
    )
    d = start(daemon_factory, manifest, files)
    d.wait_ready(30)
    dlq = Subscriber(*broker.address, "dlq/#")
    try:
        # 6 and 12 on the dead-lettering route, 9 on the pool route (logged and acked only)
        poison = {6: "raise-in-inner", 12: "raise-in-outer", 9: "raise-in-inner"}
        p = Publisher(
            *broker.address,
            topic_for=lambda i: f"{('mw', 'pool')[i % 2]}/{i}",
            payload_for=lambda i: f"{i}:{poison[i]}" if i in poison else str(i),
        )
        publishers.append(p)
        p.publish_many(40)
        p.wait_acked(30)
        good = p.acked - {str(i) for i in poison}
        handled_all(files, good)
        dead = dlq.collect(2, timeout=20)
        assert sorted(m.payload for m in dead) == [b"12:raise-in-outer", b"6:raise-in-inner"]
        # the failed message was acknowledged: a replaced worker resumes the session and gets
        # nothing back (the next message is handled, the poison one is not seen again)
        before = d.pids()[("mw", 0)]
        d.control(cmd="restart", routes=["mw"])
        d.wait_for(lambda s: d.pids()[("mw", 0)] not in (None, before), 30, "mw replaced")
        d.wait_ready(30)
        later = publish(publishers, broker, lambda i: "mw/later", 1)
        handled_all(files, later)
        assert dlq.collect(1, timeout=1) == []
    finally:
        dlq.close()
    assert d.stop(60) == 0

    lines = journal(files["hooks"])
    for ident in good | later:
        seq = [x.what for x in lines if x.detail == ident]
        assert seq == ["outer-in", "inner-in", "inner-out", "outer-out"], (ident, seq)
    for ident, seq in (("6", ["outer-in", "inner-in"]), ("9", ["outer-in", "inner-in"])):
        assert [x.what for x in lines if x.detail == ident] == seq, ident
    assert [x.what for x in lines if x.detail == "12"] == ["outer-in"]
    failed = [e for e in d.events("handler_failed") if "middleware" in str(e)]
    assert len(failed) == 3, failed
    assert not {"6", "9", "12"} & ledger.handled_ids(files["ledger"])
