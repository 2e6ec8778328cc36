"""The README's service path under a real systemd 252 (Debian 12), in a container.

`make systemd-test` runs this (marker ``systemd``; not part of `make test`): it builds the cached
root file system if needed, boots it with systemd-nspawn and, in order, as an operator would:
installs with `make install-systemd`, sets up Debian's Mosquitto with the shipped drop-in, starts
the service, reads `routemqd status` as a member of group routemqd, reloads a good and a bad
manifest through `systemctl reload`, kills the master with SIGKILL, and stops the service. The
tests share one container and run in file order; each step depends on the ones before.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tls import issue_server_cert, make_ca
from tests.systemd.container import Container

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ROUTEMQD_SYSTEMD_TEST_CACHE", "/var/cache/routemqd/systemd-test"))
ROOTFS = CACHE / "bookworm"
WHEELS = CACHE / "wheels"
MAX_EXPOSURE = 2.5
MESSAGES = 300

MANIFEST = """\
broker:
  host: 127.0.0.1
  port: 8883
  protocol: 5
  tls:
    ca_file: /etc/routemqd/ca.crt
python_path: [/opt/app]
supervisor:
  graceful_timeout: 10s
control:
  socket: /run/routemqd/control.sock
routes:
  - name: probe
    topic: probe/+
    handler: probe:handle
    shared: true
    workers: {workers}
"""

MOSQUITTO_TEST_CONF = """\
# the test's listeners: plain for the command-line clients, TLS for routemqd
listener 1883 127.0.0.1
listener 8883 127.0.0.1
cafile /etc/mosquitto/certs/ca.crt
certfile /etc/mosquitto/certs/server.crt
keyfile /etc/mosquitto/certs/server.key
allow_anonymous true
"""


def _requirements() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    return [*reqs, "numpy", "setuptools>=64", "wheel", "pip"]


def _wheelhouse() -> Path:
    """Everything pip needs inside the container, which has no network: cached on the host."""
    reqs = _requirements()
    stamp = WHEELS / ".requirements"
    if stamp.exists() and stamp.read_text() == "\n".join(reqs):
        return WHEELS
    WHEELS.mkdir(parents=True, exist_ok=True)
    pip = REPO / ".venv" / "bin" / "pip"
    subprocess.run(
        [str(pip), "download", "--quiet", "--only-binary=:all:", "-d", str(WHEELS), *reqs],
        check=True,
        timeout=600,
    )
    stamp.write_text("\n".join(reqs))
    return WHEELS


def _copy_source(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files), without venvs or caches."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    if not (ROOTFS / ".routemqd-rootfs").exists():
        subprocess.run([str(REPO / "scripts" / "systemd-test-rootfs"), str(ROOTFS)], check=True)
    stage = tmp_path_factory.mktemp("stage")
    _copy_source(stage / "src")
    shutil.copytree(_wheelhouse(), stage / "wheels")
    certs = stage / "certs"
    ca = make_ca(certs)
    shutil.copy2(ca.cert_file, certs / "ca.crt")
    issue_server_cert(ca, certs, hosts=("localhost", "127.0.0.1"))
    (stage / "app").mkdir()
    shutil.copy2(Path(__file__).with_name("probe.py"), stage / "app" / "probe.py")
    container = Container(ROOTFS, {stage: "/stage"}, stage / "nspawn.log")
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()


def status(box: Container, user: str = "alice") -> dict:
    r = box.run("routemqd status --json", user=user)
    return json.loads(r.stdout)


def ready_pids(box: Container, count: int, timeout: float = 60.0) -> list[int]:
    """Wait until `status` shows ``count`` ready and connected workers; their PIDs."""
    deadline = time.monotonic() + timeout
    while True:
        r = box.run("routemqd status --json", check=False, user="alice")
        if r.returncode == 0:
            s = json.loads(r.stdout)
            slots = [x for x in s["slots"] if x["state"] == "ready" and x["connected"]]
            if len(slots) == count == s["daemon"]["startable"]:
                return sorted(x["pid"] for x in slots)
        assert time.monotonic() < deadline, f"not {count} ready: {r.stdout}{r.stderr}"
        time.sleep(0.2)


def main_pid(box: Container) -> int:
    return int(box.run("systemctl show -p MainPID --value routemqd").stdout)


def publish(box: Container, first: int, count: int) -> None:
    # mosquitto_pub -l drops what it has not sent when stdin ends: keep it open a moment
    box.run(
        f"(seq {first} {first + count - 1}; sleep 2) | "
        "mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t probe/x -l",
        timeout=60,
    )


def seen(box: Container) -> set[int]:
    r = box.run("cat /var/lib/app/seen.txt 2>/dev/null || true")
    return {int(x) for x in r.stdout.split()}


def wait_seen(box: Container, wanted: set[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not wanted <= (got := seen(box)):
        assert time.monotonic() < deadline, f"missing {sorted(wanted - got)[:20]}"
        time.sleep(0.3)


# ----------------------------------------------------------------------------------- the path


def test_systemd_is_252(box: Container) -> None:
    assert box.run("systemctl --version").stdout.startswith("systemd 252")


def test_install(box: Container) -> None:
    r = box.run(
        "cp -a /stage/src /root/routemqd && cd /root/routemqd && "
        "PIP_NO_INDEX=1 PIP_FIND_LINKS=/stage/wheels make install-systemd",
        timeout=600,
    )
    assert "routemqd is installed" in r.stdout, r.stdout
    assert "systemctl restart mosquitto" in r.stdout  # the broker drop-in was installed
    box.run("PIP_NO_INDEX=1 PIP_FIND_LINKS=/stage/wheels /opt/routemqd/bin/pip install -q numpy")
    assert box.run("stat -c '%a %U:%G' /etc/routemq.yaml").stdout.split() == [
        "640",
        "root:routemqd",
    ]
    box.run("test -L /usr/local/bin/routemqd && routemqd --version")


def test_unit_verifies_and_is_hardened(box: Container) -> None:
    r = box.run("systemd-analyze verify routemqd.service 2>&1", check=False)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout
    out = box.run("systemd-analyze security --no-pager routemqd.service").stdout
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))  # type: ignore[union-attr]
    print(f"systemd-analyze security routemqd (systemd 252): {score}")
    assert score <= MAX_EXPOSURE, out


def test_broker_with_the_shipped_dropin(box: Container) -> None:
    """Debian's Mosquitto with etc/mosquitto.d/routemqd.conf keeps more than 1000 queued QoS 1."""
    box.run(
        "install -d -m 0755 /etc/mosquitto/certs\n"
        "install -m 0644 /stage/certs/ca.crt /stage/certs/server.crt /etc/mosquitto/certs/\n"
        "install -m 0640 -g mosquitto /stage/certs/server.key /etc/mosquitto/certs/\n"
        f"cat > /etc/mosquitto/conf.d/test-listeners.conf <<'EOF'\n{MOSQUITTO_TEST_CONF}EOF\n"
        "systemctl enable mosquitto\n"
        "systemctl restart mosquitto\n"
    )
    box.wait_for("mosquitto_pub -h 127.0.0.1 -p 1883 -t ping -m x", what="the broker")
    # an offline persistent session gets 1500 messages queued: the default limit would keep 1000
    box.run("mosquitto_sub -h 127.0.0.1 -c -i queue-probe -q 1 -t q/probe -E")
    box.run("mosquitto_pub -h 127.0.0.1 -q 1 -t q/probe -m m --repeat 1500", timeout=120)
    r = box.run(
        "mosquitto_sub -h 127.0.0.1 -c -i queue-probe -q 1 -t q/probe -C 1500 -W 30 | wc -l",
        timeout=60,
    )
    assert int(r.stdout) == 1500


def test_start(box: Container) -> None:
    box.run(
        "install -d -m 0755 /etc/routemqd /opt/app\n"
        "install -m 0644 /stage/certs/ca.crt /etc/routemqd/ca.crt\n"
        "install -m 0644 /stage/app/probe.py /opt/app/probe.py\n"
        "install -d -o routemqd -g routemqd /var/lib/app\n"
        f"cat > /etc/routemq.yaml <<'EOF'\n{MANIFEST.format(workers=2)}EOF\n"
        "routemqd check -c /etc/routemq.yaml\n"
        # the documented way to let handlers write outside the state directory
        "mkdir -p /etc/systemd/system/routemqd.service.d\n"
        "printf '[Service]\\nReadWritePaths=/var/lib/app\\n' "
        "> /etc/systemd/system/routemqd.service.d/app.conf\n"
        "systemctl daemon-reload\n"
        "useradd -m -G routemqd alice\n"
        "useradd -m bob\n"
    )
    box.run("systemctl enable --now routemqd", timeout=90)
    assert box.run("systemctl is-active routemqd").stdout.strip() == "active"
    ready_pids(box, 2)


def test_status_as_a_group_member(box: Container) -> None:
    r = box.run("routemqd status", user="alice")
    assert "workers 2/2 ready, 0 failed" in r.stdout, r.stdout
    assert r.stderr == ""
    # systemd makes the RuntimeDirectory routemqd:routemqd 0750: closed to everyone else
    assert box.run("stat -c '%a %G' /run/routemqd").stdout.split() == ["750", "routemqd"]
    assert box.run("stat -c '%a' /run/routemqd/control.sock").stdout.strip() == "660"
    outsider = box.run("routemqd status", user="bob", check=False)
    assert outsider.returncode == 77, outsider.stdout + outsider.stderr
    assert "permission denied" in outsider.stderr


def test_handlers_work_inside_the_sandbox(box: Container) -> None:
    publish(box, 1, 20)
    wait_seen(box, set(range(1, 21)))
    out = box.run('for f in /var/lib/routemqd/probe-*.json; do cat "$f"; echo; done').stdout
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert results
    for probe in results:
        assert probe["ctypes"] == [1, 2, 3, 4, 5], probe
        assert isinstance(probe["numpy"], float), probe
        assert probe["tls"].startswith("OpenSSL"), probe
        assert probe["elsewhere"] == "Read-only file system", probe
    # the master reads its workers' /proc through psutil: RSS and CPU are there
    for slot in status(box)["slots"]:
        assert slot["rss"] and slot["rss"] > 0, slot
        assert slot["cpu"] is not None, slot


def test_good_reload(box: Container) -> None:
    before = ready_pids(box, 2)
    box.run(f"cat > /etc/routemq.yaml <<'EOF'\n{MANIFEST.format(workers=3)}EOF")
    r = box.run("systemctl reload routemqd", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    after = ready_pids(box, 3)
    assert set(before) <= set(after), "unchanged slots keep their PIDs"
    assert status(box)["daemon"]["last_reload"]["ok"] is True


def test_bad_reload_fails_and_keeps_the_pools(box: Container) -> None:
    before = ready_pids(box, 3)
    box.run("printf 'routes: [\\n' > /etc/routemq.yaml")
    r = box.run("systemctl reload routemqd", check=False, timeout=90)
    assert r.returncode != 0, "a failed reload must fail `systemctl reload`"
    assert box.run("systemctl is-active routemqd").stdout.strip() == "active"
    s = box.run("routemqd status", user="alice")
    assert "FAILED" in s.stdout and s.stderr == "", s.stdout + s.stderr
    assert ready_pids(box, 3) == before
    journal = box.run("journalctl -u routemqd -o cat --no-pager").stdout
    assert "reload_failed" in journal
    box.run(f"cat > /etc/routemq.yaml <<'EOF'\n{MANIFEST.format(workers=3)}EOF")
    assert box.run("systemctl reload routemqd", check=False, timeout=90).returncode == 0


def test_kill9_of_the_master_recovers_and_loses_nothing(box: Container) -> None:
    old_master = main_pid(box)
    old_workers = ready_pids(box, 3)
    box.run(
        f"(seq 1001 {1000 + MESSAGES}; sleep 4) | "
        "mosquitto_pub -h 127.0.0.1 -q 1 -t probe/x -l & "
        f"sleep 0.5; kill -9 {old_master}; wait",
        timeout=60,
    )
    deadline = time.monotonic() + 60
    while main_pid(box) in (0, old_master):
        assert time.monotonic() < deadline, "systemd did not restart the master"
        time.sleep(0.2)
    new_workers = ready_pids(box, 3)
    assert not set(old_workers) & set(new_workers)
    for pid in old_workers:
        assert box.run(f"test ! -e /proc/{pid}", check=False).returncode == 0, pid
    wait_seen(box, set(range(1001, 1001 + MESSAGES)))
    assert int(box.run("systemctl show -p NRestarts --value routemqd").stdout) >= 1


def test_stop_leaves_nothing(box: Container) -> None:
    workers = ready_pids(box, 3)
    cgroup = box.run("systemctl show -p ControlGroup --value routemqd").stdout.strip()
    box.run("systemctl stop routemqd", timeout=90)
    assert box.run("systemctl is-active routemqd", check=False).stdout.strip() == "inactive"
    assert box.run("pgrep -u routemqd", check=False).returncode == 1
    for pid in workers:
        assert box.run(f"test ! -e /proc/{pid}", check=False).returncode == 0, pid
    procs = box.run(f"cat /sys/fs/cgroup{cgroup}/cgroup.procs 2>/dev/null || true").stdout
    assert procs.strip() == ""
    assert box.run("test ! -e /run/routemqd", check=False).returncode == 0
    journal = box.run("journalctl -u routemqd -o cat --no-pager").stdout
    assert '"event": "master_stopped"' in journal or "master_stopped" in journal
