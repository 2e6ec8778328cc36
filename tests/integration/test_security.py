"""Credentials, TLS and the control socket, against a real mosquitto and real processes.

The broker password must never show up anywhere routemqd writes: its log, ``status`` (text and
JSON), ``check``, process titles, or a manifest error. Wrong credentials and a broker certificate
that does not verify are boot failures (exit codes 5 and 7) that park the slot in ``failed``
instead of restarting it in a loop. Only the daemon's own user (and root) may use the control
socket.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest

from routemqd.exitcodes import ExitCode, describe
from routemqd.manifest import ManifestError, loads
from tests.support import ledger, manifests, tls, traffic
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import wait_handled
from tests.support.workers import WorkerProc

pytestmark = pytest.mark.timeout(120)

SECRET = "S3cr3t-Pw-7f1c"
USER = "routemq"
PASSWORD_ENV = "ROUTEMQD_TEST_BROKER_PASSWORD"
CLI_TIMEOUT = 60
NOBODY = 65534

DaemonFactory = Callable[..., Daemon]


# ------------------------------------------------------------------------------------ helpers


def routemqd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROUTEMQD_")}
    return subprocess.run(
        [sys.executable, "-m", "routemqd", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**base, **(env or {})},
    )


def authed_client(port: int, password: str = SECRET) -> mqtt.Client:
    """A connected publisher with the test credentials; fails the test if refused."""
    c = traffic.client("127.0.0.1", port)
    c.username_pw_set(USER, password)
    connected = threading.Event()
    codes: list[Any] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        codes.append(rc)
        connected.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    if not connected.wait(10) or codes[0].is_failure:
        c.loop_stop()
        raise AssertionError(f"test publisher not accepted by the broker: {codes}")
    return c


def publish(port: int, messages: list[tuple[str, bytes | str]]) -> None:
    c = authed_client(port)
    try:
        infos = [c.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        comm = Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace") + " " + comm


def auth_broker_config(password_file: Path) -> str:
    return f"allow_anonymous false\npassword_file {password_file}"


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker that accepts only ``USER`` with ``SECRET`` (mosquitto's own password file)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed (Debian package mosquitto)")
    workdir = tmp_path_factory.mktemp("auth-broker")
    password_file = workdir / "passwd"
    subprocess.run(
        [tool, "-b", "-c", str(password_file), USER, SECRET],
        check=True,
        capture_output=True,
        timeout=30,
    )
    instance = Broker(workdir=workdir / "broker", extra_config=auth_broker_config(password_file))
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


# ----------------------------------------------------------------------- secrets never leak


def _secret_manifest(
    directory: Path, port: int, mode: str, **top: Any
) -> tuple[Path, dict[str, str]]:
    """A manifest that logs in with SECRET given ``mode``-wise; returns it and the env it needs."""
    directory.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    broker: dict[str, Any] = {"username": USER}
    if mode == "inline":
        broker["password"] = SECRET
    elif mode == "file":
        pw = directory / "broker.password"
        pw.write_text(SECRET + "\n", encoding="utf-8")
        pw.chmod(0o600)
        broker["password_file"] = str(pw)
    else:
        broker["password_env"] = PASSWORD_ENV
        env[PASSWORD_ENV] = SECRET
    top.setdefault("host_id", f"sec-{mode}")
    top.setdefault(
        "routes",
        [
            manifests.route(
                "sec", f"sec/{mode}/{{n}}", shared=True, workers=2, dead_letter_topic="dlq/sec"
            )
        ],
    )
    path = manifests.write(directory / "routemq.yaml", port, broker=broker, **top)
    path.chmod(0o600)
    return path, env


@pytest.mark.parametrize("mode", ["inline", "file", "env"])
def test_password_never_leaks(
    auth_broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory, mode: str
) -> None:
    m, env = _secret_manifest(tmp_path / mode, auth_broker.port, mode, logging={"level": "debug"})
    led = tmp_path / "ledger"
    daemon = daemon_factory(m, env={**env, "ROUTEMQD_TEST_LEDGER": str(led)})
    status = daemon.wait_ready()
    assert status["daemon"]["ready"] == 2

    # the workers logged in with the password and handle messages
    ids = [str(i) for i in range(6)]
    publish(auth_broker.port, [(f"sec/{mode}/{i}", i) for i in ids])
    assert not wait_handled(led, set(ids), timeout=30)

    # a handler error that quotes the secret, as a library error might quote a connection URL:
    # the dead letter's error (which goes to the broker) and status must not repeat it
    letters: list[mqtt.MQTTMessage] = []
    arrived = threading.Event()
    dlq = authed_client(auth_broker.port)
    dlq.on_message = lambda _c, _u, msg: (letters.append(msg), arrived.set())
    subscribed = threading.Event()
    dlq.on_subscribe = lambda *_a: subscribed.set()
    dlq.subscribe("dlq/sec", qos=1)
    try:
        assert subscribed.wait(10)
        publish(auth_broker.port, [(f"sec/{mode}/x", f"{SECRET}:raise")])
        assert arrived.wait(30), "no dead letter"
    finally:
        dlq.disconnect()
        dlq.loop_stop()
    error = dict(letters[0].properties.UserProperty)["error"]
    assert error == "ValueError: refusing message <hidden>"
    daemon.wait_for(
        lambda s: sum(slot["failed"] for slot in s["slots"]) >= 1,
        timeout=30,
        what="the failing message counted",
    )

    outputs: dict[str, str] = {}
    cli_env = {**env, "ROUTEMQD_CONFIG": str(m)}
    for args in (("status",), ("status", "--json"), ("check",)):
        proc = routemqd(*args, "-c", str(m), env=cli_env)
        assert proc.returncode == 0, proc.stderr
        outputs[" ".join(args)] = proc.stdout + proc.stderr
    assert "password from" in outputs["check"]
    assert json.loads(outputs["status --json"])["daemon"]["pid"] == daemon.pid
    outputs["status reply"] = json.dumps(daemon.status())
    pids = [daemon.pid, *daemon.children()]
    assert len(pids) == 3
    for pid in pids:
        outputs[f"title of {pid}"] = cmdline(pid)
    assert "routemqd: master" in outputs[f"title of {daemon.pid}"]

    assert daemon.stop() == 0
    outputs["daemon log"] = daemon.log_path.read_text(errors="replace")
    events = {e.get("event") for e in daemon.events()}
    assert {"worker_ready", "handler_failed", "master_stopped"} <= events

    leaks = [where for where, text in outputs.items() if SECRET in text]
    assert not leaks, f"the password appears in: {leaks}"
    assert "<hidden>" in outputs["daemon log"]  # the handler error was redacted, not dropped


@pytest.mark.parametrize("mode", ["inline", "file", "env"])
def test_manifest_error_after_the_password_does_not_show_it(tmp_path: Path, mode: str) -> None:
    m, env = _secret_manifest(tmp_path, 1883, mode)
    lines = m.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  password"))
    lines.insert(at + 1, "  sesion_expiry: 1h")
    text = "\n".join(lines) + "\n"
    with pytest.raises(ManifestError) as info:
        loads(text, str(m), environ=env)
    assert info.value.line == at + 2
    assert info.value.field == "broker.sesion_expiry"
    assert "did you mean 'session_expiry'?" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    m.write_text(text, encoding="utf-8")
    proc = routemqd("check", "-c", str(m), env=env)
    assert proc.returncode == int(ExitCode.CONFIG)
    assert f"{m}:{at + 2}: broker.sesion_expiry" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("written", "forbidden"),
    [
        ("7301955421", ("7301955421",)),  # YAML reads it as a number
        ("0x5EC12E7", ("5EC12E7", str(0x5EC12E7))),
        ("1.5e+3", ("1.5e+3", "1500")),
        ("!!int 7301955421", ("7301955421",)),
        ("!!float 7301955421", ("7301955421",)),
        ("!!int S3cr3t-Pw-7f1c", (SECRET,)),
    ],
)
def test_password_that_is_not_text_is_refused_without_showing_it(
    written: str, forbidden: tuple[str, ...]
) -> None:
    doc = textwrap.dedent(
        f"""\
        broker:
          username: {USER}
          password: {written}
        routes:
          - topic: a/b
            handler: tests.handlers.ledger:record
        """
    )
    with pytest.raises(ManifestError) as info:
        loads(doc, "pw.yaml", environ={})
    assert str(info.value).startswith("pw.yaml:3: broker.password: ")
    shown = [text for text in forbidden if text in str(info.value)]
    assert not shown, str(info.value)


# -------------------------------------------------------------------------- wrong password


@pytest.mark.parametrize("protocol", [5, "3.1.1"])
def test_wrong_password_is_a_boot_failure(
    auth_broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory, protocol: int | str
) -> None:
    wrong = "Wr0ng-Pw-99d2"
    m = manifests.write(
        tmp_path / "routemq.yaml",
        auth_broker.port,
        [manifests.route("auth", "auth/{n}")],
        protocol=protocol,
        broker={"username": USER, "password": wrong},
        supervisor={"failed_cooldown": 60},
        host_id=f"wrongpw-{str(protocol).replace('.', '')}",
    )
    m.chmod(0o600)
    daemon = daemon_factory(m)
    status = daemon.wait_for(
        lambda s: s["slots"][0]["state"] == "failed", timeout=30, what="slot failed"
    )
    slot = status["slots"][0]
    assert "refused" in slot["last_reason"]
    assert status["daemon"]["failed"] == 1

    code = describe(int(ExitCode.BROKER_AUTH_REFUSED))
    assert int(ExitCode.BROKER_AUTH_REFUSED) == 5
    (died,) = daemon.events("worker_died")
    assert died["exit"] == code
    assert "broker refused the connection" in died["reason"]
    assert "authori" in died["reason"].lower() or "password" in died["reason"].lower()
    (boot,) = daemon.events("worker_boot_failed")
    assert boot["code"] == code
    (parked,) = daemon.events("slot_failed")
    assert parked["why"] == "boot failure"
    assert len(daemon.events("worker_spawned")) == 1  # parked, not restarted in a loop

    text = routemqd("status", "-c", str(m)).stdout
    assert "failed" in text
    assert daemon.stop() == 0
    log = daemon.log_path.read_text(errors="replace")
    assert wrong not in log
    assert wrong not in text


def test_wrong_password_worker_exit_status_is_5(auth_broker: Broker, tmp_path: Path) -> None:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        auth_broker.port,
        [manifests.route("auth", "auth/{n}")],
        broker={"username": USER, "password": "Wr0ng-Pw-99d2"},
        host_id="wrongpw-direct",
    )
    w = WorkerProc(m, "auth", env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    try:
        event = w.wait_event("boot_error", timeout=30)
        assert w.wait(30) == ExitCode.BROKER_AUTH_REFUSED == 5
        assert event["code"] == 5
        assert "Wr0ng-Pw-99d2" not in event["reason"]
    finally:
        w.close()


# -------------------------------------------------------------- world-readable inline password


def test_world_readable_inline_password_warns(
    auth_broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    daemons: dict[int, Daemon] = {}
    paths: dict[int, Path] = {}
    for mode in (0o644, 0o600):
        m, _ = _secret_manifest(
            tmp_path / f"mode{mode:o}",
            auth_broker.port,
            "inline",
            host_id=f"warn-{mode:o}",
            routes=[manifests.route("w", f"warn/{mode:o}/{{n}}")],
        )
        m.chmod(mode)
        paths[mode] = m
        daemons[mode] = daemon_factory(m)
    for d in daemons.values():
        d.wait_ready()

    (warning,) = daemons[0o644].events("manifest_warning")
    assert "readable by every user" in warning["reason"]
    assert "password_file" in warning["reason"]
    assert str(paths[0o644]) in warning["reason"]
    assert daemons[0o600].events("manifest_warning") == []

    loud = routemqd("check", "-c", str(paths[0o644]))
    quiet = routemqd("check", "-c", str(paths[0o600]))
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "warnings:" in loud.stdout
    assert "readable by every user" in loud.stdout
    assert "readable by every user" not in quiet.stdout
    for out in (loud, quiet):
        assert SECRET not in out.stdout + out.stderr
    for d in daemons.values():
        assert d.stop() == 0


# ------------------------------------------------------------------------------------- TLS


class TLSSetup:
    def __init__(self, root: Path) -> None:
        self.ca = tls.make_ca(root / "ca")
        self.other_ca = tls.make_ca(root / "other-ca", "other-test-ca")
        good = tls.issue_server_cert(self.ca, root / "server")
        misnamed = tls.issue_server_cert(
            self.ca, root / "misnamed", hosts=("broker.invalid",), name="misnamed"
        )
        self.garbage_ca = root / "garbage-ca.pem"
        self.garbage_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        self.broker, self.ports = tls.start_broker(
            root / "broker", {"good": (good, self.ca), "misnamed": (misnamed, self.ca)}
        )


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSetup]:
    setup = TLSSetup(tmp_path_factory.mktemp("tls"))
    try:
        yield setup
    finally:
        setup.broker.stop()


def _tls_manifest(tmp_path: Path, name: str, port: int, tls_cfg: dict[str, Any], **kw: Any) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    return manifests.write(
        directory / "routemq.yaml",
        port,
        [manifests.route("tls", f"tls/{name}/{{n}}")],
        broker={"tls": tls_cfg},
        host_id=f"tls-{name}",
        **kw,
    )


def test_tls_connects_and_handles_messages(
    tls_setup: TLSSetup, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    cases = {
        "verified": (tls_setup.ports["good"], {"ca_file": str(tls_setup.ca.cert_file)}),
        # the certificate names another host: accepted only because insecure is set
        "insecure": (
            tls_setup.ports["misnamed"],
            {"ca_file": str(tls_setup.ca.cert_file), "insecure": True},
        ),
    }
    led = tmp_path / "ledger"
    daemons = {
        name: daemon_factory(
            _tls_manifest(tmp_path, name, port, cfg), env={"ROUTEMQD_TEST_LEDGER": str(led)}
        )
        for name, (port, cfg) in cases.items()
    }
    for d in daemons.values():
        d.wait_ready()
    pub = traffic.client(*tls_setup.broker.address)
    pub.connect(*tls_setup.broker.address, 30)
    pub.loop_start()
    try:
        infos = [
            pub.publish(f"tls/{name}/{i}", f"{name}-{i}", qos=1) for name in cases for i in range(5)
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()
    expected = {f"{name}-{i}" for name in cases for i in range(5)}
    assert not wait_handled(led, expected, timeout=30)
    by_name = {
        name: {e.ident for e in ledger.read(led) if e.topic.startswith(f"tls/{name}/")}
        for name in cases
    }
    assert by_name == {name: {f"{name}-{i}" for i in range(5)} for name in cases}
    broker_log = tls_setup.broker.log_path.read_text(errors="replace")
    for name, (port, _) in cases.items():
        assert f"on port {port}" in broker_log, f"{name}: no connection on the TLS listener"
        assert f"routemq-tls-{name}-tls-0" in broker_log
    for d in daemons.values():
        assert d.stop() == 0


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-hostname", "unreadable-ca"])
def test_tls_failure_is_a_boot_failure(
    tls_setup: TLSSetup, tmp_path: Path, daemon_factory: DaemonFactory, case: str
) -> None:
    port, ca_file, mention = {
        "unknown-ca": (tls_setup.ports["good"], tls_setup.other_ca.cert_file, "certificate"),
        "wrong-hostname": (tls_setup.ports["misnamed"], tls_setup.ca.cert_file, "certificate"),
        "unreadable-ca": (tls_setup.ports["good"], tls_setup.garbage_ca, "certificate files"),
    }[case]
    m = _tls_manifest(
        tmp_path, case, port, {"ca_file": str(ca_file)}, supervisor={"failed_cooldown": 60}
    )
    daemon = daemon_factory(m)
    status = daemon.wait_for(
        lambda s: s["slots"][0]["state"] == "failed", timeout=30, what="slot failed"
    )
    assert status["daemon"]["failed"] == 1
    code = describe(int(ExitCode.TLS_FAILED))
    (died,) = daemon.events("worker_died")
    assert died["exit"] == code, died
    (boot,) = daemon.events("worker_boot_failed")
    assert boot["code"] == code
    assert "TLS" in boot["reason"]
    assert mention.lower() in boot["reason"].lower()
    assert died["reason"] == boot["reason"]
    assert status["slots"][0]["last_reason"] == boot["reason"]
    (parked,) = daemon.events("slot_failed")
    assert parked["why"] == "boot failure"
    assert len(daemon.events("worker_spawned")) == 1
    assert daemon.stop() == 0


# -------------------------------------------------------------------------- control socket


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="routemqd-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_CLIENT = textwrap.dedent(
    """\
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except PermissionError as e:
        print(json.dumps({"refused": "connect", "error": str(e)}))
        raise SystemExit(0)
    try:
        s.sendall(json.dumps({"cmd": sys.argv[2]}).encode() + b"\\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before reading the request
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except ConnectionResetError:
        pass
    print(json.dumps({"reply": json.loads(buf or b"{}")}))
    """
)


def as_nobody(*args: str, groups: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run the venv's Python as user and group nobody, with only the given extra groups."""
    extra = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *extra, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"},
        cwd="/",
    )


def test_control_socket_refuses_other_users(
    auth_broker: Broker, tmp_path: Path, open_dir: Path, daemon_factory: DaemonFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user (nobody)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    sock = open_dir / "control.sock"
    m, _ = _secret_manifest(
        tmp_path,
        auth_broker.port,
        "inline",
        host_id="ctl",
        routes=[manifests.route("ctl", "ctl/{n}")],
        control={"socket": str(sock)},
    )
    daemon = daemon_factory(m)
    daemon.wait_ready()
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()

    # the socket's mode is the first guard: nobody cannot even connect
    probe = as_nobody("-I", "-c", _CLIENT, str(sock), "status")
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["refused"] == "connect"
    cli = as_nobody("-m", "routemqd", "status", "--socket", str(sock))
    assert cli.returncode == 77, cli.stdout + cli.stderr
    assert "permission denied" in cli.stderr

    # with a loose socket mode the peer-credential check still refuses, even a stop
    os.chmod(sock, 0o666)
    try:
        for cmd in ("status", "stop"):
            probe = as_nobody("-I", "-c", _CLIENT, str(sock), cmd)
            assert probe.returncode == 0, probe.stderr
            reply = json.loads(probe.stdout)["reply"]
            assert reply == {"ok": False, "error": "permission denied"}
        cli = as_nobody("-m", "routemqd", "status", "--socket", str(sock))
        assert cli.returncode == 77, cli.stdout + cli.stderr
        assert "permission denied" in cli.stderr
    finally:
        os.chmod(sock, 0o600)
    assert daemon.proc.poll() is None
    status = daemon.status()
    assert status["daemon"]["shutting_down"] is False
    assert psutil.pid_exists(daemon.pid)
    assert daemon.stop() == 0


def test_control_socket_mode_0660_lets_the_group_in_and_no_one_else(
    auth_broker: Broker, tmp_path: Path, open_dir: Path, daemon_factory: DaemonFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    sock = open_dir / "control.sock"
    m, _ = _secret_manifest(
        tmp_path,
        auth_broker.port,
        "inline",
        host_id="ctl-group",
        routes=[manifests.route("ctl", "ctl/{n}")],
        control={"socket": str(sock), "mode": "0660"},
    )
    daemon = daemon_factory(m)
    daemon.wait_ready()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    group = os.getegid()

    # a member of the daemon's group, as usual through a supplementary group (usermod -aG)
    member = as_nobody("-I", "-c", _CLIENT, str(sock), "status", groups=(group,))
    assert member.returncode == 0, member.stderr
    reply = json.loads(member.stdout)["reply"]
    assert reply["ok"] is True, reply
    assert reply["daemon"]["pid"] == daemon.pid

    outsider = as_nobody("-I", "-c", _CLIENT, str(sock), "status")
    assert outsider.returncode == 0, outsider.stderr
    assert json.loads(outsider.stdout)["refused"] == "connect"
    assert daemon.stop() == 0
