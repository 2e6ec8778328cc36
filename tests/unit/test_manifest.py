"""Tests for routemqd.manifest: the shipped example, defaults and inheritance, every error naming
file:line and field, and robustness against hostile or broken input."""

from __future__ import annotations

import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemqd.manifest import (
    DEFAULT_CONTROL_SOCKET,
    MAX_NODES,
    BrokerConfig,
    Manifest,
    ManifestError,
    Secret,
    load,
    loads,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "routemq.yaml"
MiB = 1024 * 1024
UNSET_ENV = "ROUTEMQD_TEST_SURELY_UNSET_PASSWORD"

ONE_ROUTE = """\
routes:
  - topic: a/b
    handler: m:f
"""


def write(tmp_path: Path, text: str, name: str = "routemq.yaml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(mode)
    return path


def load_text(tmp_path: Path, text: str, **kwargs: Any) -> Manifest:
    return load(write(tmp_path, text, **kwargs))


# ------------------------------------------------------------------------------ shipped example


def test_shipped_manifest_loads() -> None:
    m = load(SHIPPED)
    assert m.path == str(SHIPPED)
    assert [r.name for r in m.routes] == ["sensor-data", "device-events", "echo"]
    assert m.group == "routemq"
    assert m.broker == BrokerConfig(session_expiry=3600)
    assert m.supervisor.graceful_timeout == 30.0
    assert m.control.socket == DEFAULT_CONTROL_SOCKET
    assert m.metrics is None
    assert m.warnings == ()

    sensors = m.route("sensor-data")
    assert sensors.shared and sensors.workers == 2
    assert sensors.subscription == "$share/routemq/sensors/+/data"
    assert sensors.topic.params == ("device_id",)
    assert sensors.dead_letter_topic == "dead-letters/sensor-data"
    assert sensors.line == 32

    events = m.route("device-events")
    assert not events.shared and events.workers == 1
    assert events.subscription == "devices/+/events/#"

    echo = m.route("echo")
    assert echo.shared and echo.workers == 1 and echo.concurrency == 4

    for r in m.routes:
        assert r.qos == 1
        assert r.max_memory == 512 * MiB
        assert r.heartbeat_timeout == 60.0
        assert r.group == "routemq"


def test_route_lookup_by_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        load(SHIPPED).route("nope")


# ------------------------------------------------------------------------------------- defaults


def test_minimal_manifest_gets_every_default(tmp_path: Path) -> None:
    m = load_text(tmp_path, ONE_ROUTE)
    assert m.broker == BrokerConfig()
    assert m.broker.protocol == 5
    assert m.group == "routemq"
    assert m.python_path == ()
    assert m.metrics is None
    assert m.control.mode == 0o600
    (r,) = m.routes
    assert r.name == "a-b"
    assert r.shared is False
    assert r.workers == 1
    assert r.group == "routemq"
    assert r.qos == 1
    assert r.concurrency == 1
    assert r.prefetch == 16
    assert r.max_memory == 512 * MiB
    assert r.max_cpu is None
    assert r.heartbeat_timeout == 60.0
    assert r.handler_timeout is None
    assert r.dead_letter_topic is None
    assert r.max_attempts == 5
    assert r.line == 2
    assert r.subscription == "a/b"


def test_ready_timeout_defaults_to_30s_and_takes_a_duration(tmp_path: Path) -> None:
    assert load_text(tmp_path, ONE_ROUTE).supervisor.ready_timeout == 30.0
    m = load_text(tmp_path, "supervisor:\n  ready_timeout: 2m\n" + ONE_ROUTE)
    assert m.supervisor.ready_timeout == 120.0
    with pytest.raises(ManifestError, match=r"routemq.yaml:2: supervisor.ready_timeout"):
        load_text(tmp_path, "supervisor:\n  ready_timeout: soon\n" + ONE_ROUTE)


def test_worker_count_is_a_spelling_of_workers(tmp_path: Path) -> None:
    m = load_text(
        tmp_path,
        """\
        routes:
          - topic: a/b
            handler: m:f
            shared: true
            worker_count: 3
        """,
    )
    assert m.routes[0].workers == 3


def test_defaults_are_inherited_and_overridable(tmp_path: Path) -> None:
    m = load_text(
        tmp_path,
        """\
        group: main
        defaults:
          qos: 0
          max_memory: 1GiB
          heartbeat_timeout: 2m
          concurrency: 8
          group: pools
          handler_timeout: 500ms
          max_cpu: 50%
        routes:
          - name: inherits
            topic: a/+
            handler: m:f
            shared: true
          - name: overrides
            topic: b/+
            handler: m:f
            shared: true
            qos: 2
            max_memory: null
            heartbeat_timeout: 5
            concurrency: 2
            group: other
            handler_timeout: null
          - name: ordered
            topic: c/+
            handler: m:f
        """,
    )
    inherits, overrides, ordered = m.routes
    assert inherits.qos == 0
    assert inherits.max_memory == 1024**3
    assert inherits.heartbeat_timeout == 120.0
    assert inherits.concurrency == 8
    assert inherits.group == "pools"
    assert inherits.handler_timeout == 0.5
    assert inherits.max_cpu == 50.0
    assert inherits.subscription == "$share/pools/a/+"

    assert overrides.qos == 2
    assert overrides.subscribe_qos == 1
    assert overrides.max_memory is None
    assert overrides.heartbeat_timeout == 5.0
    assert overrides.concurrency == 2
    assert overrides.group == "other"
    assert overrides.handler_timeout is None

    # A default concurrency meant for shared pools does not apply to an ordered route.
    assert ordered.concurrency == 1
    assert ordered.qos == 0
    assert m.group == "main"


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("a/b", "a-b"),
        ("sensors/{device_id}/data", "sensors-device_id-data"),
        ("echo/+", "echo-any"),
        ("devices/{id}/events/#", "devices-id-events-all"),
        ("#", "all"),
        ("+/status", "any-status"),
        ("température/+", "temp-rature-any"),
    ],
)
def test_route_name_is_derived_from_topic(tmp_path: Path, topic: str, name: str) -> None:
    m = load_text(tmp_path, f"routes:\n  - topic: '{topic}'\n    handler: m:f\n")
    assert m.routes[0].name == name


def test_derived_names_keep_wildcard_routes_apart(tmp_path: Path) -> None:
    m = load_text(
        tmp_path,
        """\
        routes:
          - topic: echo/+
            handler: m:f
          - topic: echo/#
            handler: m:f
        """,
    )
    assert [r.name for r in m.routes] == ["echo-any", "echo-all"]


@pytest.mark.parametrize(
    ("written", "protocol"), [("'3.1.1'", 4), ("3.1.1", 4), ("311", 4), ("5", 5)]
)
def test_protocol_spellings(tmp_path: Path, written: str, protocol: int) -> None:
    m = load_text(tmp_path, f"broker:\n  protocol: {written}\n" + ONE_ROUTE)
    assert m.broker.protocol == protocol


@pytest.mark.parametrize(("written", "mode"), [("0600", 0o600), ("0660", 0o660), ("'0640'", 0o640)])
def test_control_mode_is_octal_as_written(tmp_path: Path, written: str, mode: int) -> None:
    m = load_text(tmp_path, f"control:\n  mode: {written}\n" + ONE_ROUTE)
    assert m.control.mode == mode


# -------------------------------------------------------------------------------------- secrets


def _assert_hidden(m: Manifest, value: str) -> None:
    for text in (repr(m), str(m), repr(m.broker), str(m.broker), repr(m.broker.password)):
        assert value not in text
    assert "<hidden>" in repr(m.broker)


def test_inline_password_is_hidden(tmp_path: Path) -> None:
    m = load_text(
        tmp_path, "broker:\n  username: svc\n  password: inline-s3cret-value\n" + ONE_ROUTE
    )
    assert m.broker.username == "svc"
    assert m.broker.password == Secret("inline-s3cret-value", "manifest")
    assert m.broker.password.reveal() == "inline-s3cret-value"
    assert m.secrets() == ("inline-s3cret-value",)
    _assert_hidden(m, "inline-s3cret-value")


def test_password_file_is_read_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "broker.password").write_text("file-s3cret-value\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = load_text(conf, "broker:\n  username: svc\n  password_file: broker.password\n" + ONE_ROUTE)
    pw = m.broker.password
    assert pw is not None
    assert pw.reveal() == "file-s3cret-value"
    assert pw.source == f"file:{(conf / 'broker.password').resolve()}"
    _assert_hidden(m, "file-s3cret-value")


def test_password_env_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTEMQD_TEST_PW", "env-s3cret-value")
    m = load_text(
        tmp_path, "broker:\n  username: svc\n  password_env: ROUTEMQD_TEST_PW\n" + ONE_ROUTE
    )
    pw = m.broker.password
    assert pw is not None
    assert pw.reveal() == "env-s3cret-value"
    assert pw.source == "env:ROUTEMQD_TEST_PW"
    _assert_hidden(m, "env-s3cret-value")


def test_password_env_uses_the_given_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  username: u\n  password_env: PW\n" + ONE_ROUTE)
    m = load(path, environ={"PW": "from-dict"})
    assert m.broker.password is not None
    assert m.broker.password.reveal() == "from-dict"


def test_relative_python_path_resolves_against_manifest_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.chdir(tmp_path)
    m = load_text(conf, "python_path: [lib, ../app, /opt/abs]\n" + ONE_ROUTE)
    assert m.python_path == (
        str((conf / "lib").resolve()),
        str((tmp_path / "app").resolve()),
        "/opt/abs",
    )
    single = load_text(conf, "python_path: lib\n" + ONE_ROUTE)
    assert single.python_path == (str((conf / "lib").resolve()),)


def test_world_readable_inline_password_warns(tmp_path: Path) -> None:
    text = "broker:\n  username: u\n  password: pw\n" + ONE_ROUTE
    m = load_text(tmp_path, text, mode=0o644)
    assert len(m.warnings) == 1
    assert "password_file" in m.warnings[0]
    assert str(tmp_path / "routemq.yaml") in m.warnings[0]


def test_private_inline_password_does_not_warn(tmp_path: Path) -> None:
    m = load_text(tmp_path, "broker:\n  username: u\n  password: pw\n" + ONE_ROUTE, mode=0o600)
    assert m.warnings == ()


def test_world_readable_password_file_reference_does_not_warn(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x", encoding="utf-8")
    m = load_text(tmp_path, "broker:\n  username: u\n  password_file: pw\n" + ONE_ROUTE, mode=0o644)
    assert m.warnings == ()


# ------------------------------------------------------------------------------- bad manifests


@dataclass(frozen=True)
class Bad:
    text: str
    line: int | None
    field: str | None
    phrase: str
    files: dict[str, str] = field(default_factory=dict)


R = ONE_ROUTE
HACK = '!!python/object/apply:os.system ["echo hacked > @TMP@/hacked"]'

BAD: dict[str, Bad] = {
    "yaml-syntax": Bad(
        "routes:\n  - topic: a/b\n     handler: m:f\n", 3, None, "YAML syntax error"
    ),
    "yaml-unclosed-flow": Bad("broker:\n  host: [1, 2\nroutes: []\n", 3, None, "YAML syntax error"),
    "unknown-top-level-key": Bad("brokr:\n  host: x\n" + R, 1, "brokr", "did you mean 'broker'"),
    "unknown-route-key": Bad(
        R + "    shared: true\n    wokers: 2\n", 5, "routes[0].wokers", "did you mean 'workers'"
    ),
    "unknown-nested-key": Bad(
        "supervisor:\n  graceful_timout: 5s\n" + R,
        2,
        "supervisor.graceful_timout",
        "did you mean 'graceful_timeout'",
    ),
    "workers-wrong-type": Bad(R + "    workers: three\n", 4, "routes[0].workers", "whole number"),
    "workers-bool": Bad(R + "    workers: true\n", 4, "routes[0].workers", "whole number"),
    "workers-zero": Bad(R + "    workers: 0\n", 4, "routes[0].workers", "between 1 and 1024"),
    "duplicate-route-name": Bad(
        "routes:\n"
        "  - name: x\n    topic: a/b\n    handler: m:f\n"
        "  - name: x\n    topic: a/c\n    handler: m:f\n",
        5,
        "routes[1].name",
        "duplicate route name 'x' (first used on line 2)",
    ),
    "duplicate-derived-name": Bad(
        "routes:\n  - topic: a/b\n    handler: m:f\n  - topic: a/b\n    handler: n:g\n",
        4,
        "routes[1].name",
        "duplicate route name 'a-b'",
    ),
    "workers-without-shared": Bad(
        R + "    workers: 2\n", 4, "routes[0].workers", "need 'shared: true'"
    ),
    "worker-count-without-shared": Bad(
        R + "    worker_count: 2\n", 4, "routes[0].worker_count", "need 'shared: true'"
    ),
    "bad-size": Bad(
        R + "    max_memory: 512 potatoes\n", 4, "routes[0].max_memory", "expected a size"
    ),
    "tiny-size": Bad(R + "    max_memory: 100KB\n", 4, "routes[0].max_memory", "at least 1MiB"),
    "huge-size": Bad(
        "defaults:\n  max_memory: " + "9" * 400 + "MB\n" + R,
        2,
        "defaults.max_memory",
        "too large",
    ),
    "bad-duration": Bad(
        R + "    heartbeat_timeout: soon\n",
        4,
        "routes[0].heartbeat_timeout",
        "expected a duration",
    ),
    "huge-duration": Bad(
        "defaults:\n  heartbeat_timeout: 1" + "0" * 400 + "\n" + R,
        2,
        "defaults.heartbeat_timeout",
        "too large",
    ),
    "bad-default-duration": Bad(
        "defaults:\n  heartbeat_timeout: soon\n" + R,
        2,
        "defaults.heartbeat_timeout",
        "expected a duration",
    ),
    "qos-3": Bad(R + "    qos: 3\n", 4, "routes[0].qos", "between 0 and 2"),
    "handler-without-colon": Bad(
        "routes:\n  - topic: a/b\n    handler: myapp.sensors\n",
        3,
        "routes[0].handler",
        "expected 'package.module:function'",
    ),
    "hash-not-last": Bad(
        "routes:\n  - topic: a/#/b\n    handler: m:f\n",
        2,
        "routes[0].topic",
        "'#' must be the last level",
    ),
    "param-inside-level": Bad(
        "routes:\n  - topic: sensors/sensor-{id}\n    handler: m:f\n",
        2,
        "routes[0].topic",
        "a param must be a whole level",
    ),
    "share-prefix": Bad(
        "routes:\n  - topic: $share/g/a\n    handler: m:f\n",
        2,
        "routes[0].topic",
        "must not start with '$share/'",
    ),
    "missing-topic": Bad(
        "routes:\n  - name: x\n    handler: m:f\n", 2, "routes[0].topic", "missing"
    ),
    "missing-handler": Bad(
        "routes:\n  - name: x\n    topic: a/b\n", 2, "routes[0].handler", "missing"
    ),
    "missing-routes": Bad("group: g\n", 1, "routes", "missing"),
    "empty-routes": Bad("group: g\nroutes: []\n", 2, "routes", "is empty"),
    "routes-not-a-list": Bad("routes:\n  a: 1\n", 2, "routes", "expected a list"),
    "workers-and-worker-count": Bad(
        R + "    shared: true\n    workers: 2\n    worker_count: 2\n",
        6,
        "routes[0].worker_count",
        "not both",
    ),
    "two-password-sources": Bad(
        "broker:\n  username: u\n  password: p\n  password_env: X\n" + R,
        4,
        "broker.password_env",
        "set only one of password, password_file, password_env",
    ),
    "password-without-username": Bad(
        "broker:\n  password: p\n" + R, 2, "broker.password", "needs broker.username"
    ),
    "password-env-unset": Bad(
        f"broker:\n  username: u\n  password_env: {UNSET_ENV}\n" + R,
        3,
        "broker.password_env",
        f"environment variable {UNSET_ENV} is not set",
    ),
    "password-file-missing": Bad(
        "broker:\n  username: u\n  password_file: missing.password\n" + R,
        3,
        "broker.password_file",
        "cannot read @TMP@/missing.password",
    ),
    "password-file-nul": Bad(
        'broker:\n  username: u\n  password_file: "a\\0b"\n' + R,
        3,
        "broker.password_file",
        "NUL",
    ),
    "python-path-nul": Bad('python_path: ["a\\0b"]\n' + R, 1, "python_path[0]", "NUL"),
    "protocol-4.5": Bad("broker:\n  protocol: 4.5\n" + R, 2, "broker.protocol", "or 3.1.1"),
    "port-out-of-range": Bad("broker:\n  port: 70000\n" + R, 2, "broker.port", "between 1"),
    "duplicate-yaml-key": Bad(
        "group: a\ngroup: b\n" + R, 2, "group", "duplicate key (first set on line 1)"
    ),
    "python-tag-on-list": Bad(
        f"python_path: {HACK}\n" + R, 1, "python_path", "is not allowed in a manifest"
    ),
    "python-tag-on-routes": Bad(f"routes: {HACK}\n", 1, "routes", "is not allowed"),
    "python-tag-on-scalar-field": Bad(f"group: {HACK}\n" + R, 1, "group", "single value"),
    "python-tag-at-top": Bad(f"{HACK}\n", 1, "manifest", "expected a mapping"),
    "python-name-tag": Bad(
        "group: !!python/name:os.system\n" + R, 1, "group", "is not allowed in a manifest"
    ),
    "python-object-tag-on-mapping": Bad(
        "broker: !!python/object:os.system {host: x}\n" + R, 1, "broker", "is not allowed"
    ),
    "list-instead-of-mapping": Bad(
        "broker:\n  - host\n  - port\n" + R, 2, "broker", "expected a mapping, got a list"
    ),
    "mapping-instead-of-value": Bad(
        "group:\n  name: g\n" + R, 2, "group", "expected a single value, got a mapping"
    ),
    "top-level-list": Bad("- routes\n- broker\n", 1, "manifest", "expected a mapping"),
    "concurrency-on-ordered-route": Bad(
        R + "    concurrency: 4\n", 4, "routes[0].concurrency", "use shared: true"
    ),
    "control-mode-world": Bad(
        "control:\n  mode: 0666\n" + R, 2, "control.mode", "must not be world-accessible"
    ),
    "control-mode-garbage": Bad(
        "control:\n  mode: rw\n" + R, 2, "control.mode", "expected 0600 or 0660"
    ),
    "metrics-listen-without-port": Bad(
        "metrics:\n  listen: 127.0.0.1\n" + R, 2, "metrics.listen", "expected host:port"
    ),
    "tls-cert-without-key": Bad(
        "broker:\n  tls:\n    cert_file: client.pem\n" + R,
        3,
        "broker.tls.key_file",
        "cert_file and key_file go together",
        files={"client.pem": "cert"},
    ),
    "tls-missing-ca": Bad(
        "broker:\n  tls:\n    ca_file: nope.pem\n" + R, 3, "broker.tls.ca_file", "no such file"
    ),
    "logging-level": Bad(
        "logging:\n  level: loud\n" + R, 2, "logging.level", "expected debug, info"
    ),
    "bad-host-id": Bad("host_id: 'my host'\n" + R, 1, "host_id", "letters, digits"),
    "bad-group": Bad("group: 'a/b'\n" + R, 1, "group", "must not contain"),
    "bad-route-name": Bad(
        "routes:\n  - name: -x\n    topic: a/b\n    handler: m:f\n",
        2,
        "routes[0].name",
        "letters, digits",
    ),
    "empty-file": Bad("", None, None, "the manifest is empty"),
    "only-comments": Bad("# nothing here\n\n", None, None, "the manifest is empty"),
    "two-documents": Bad(R + "---\n" + R, 5, None, "more than one YAML document"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=list(BAD))
def test_bad_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Bad) -> None:
    monkeypatch.delenv(UNSET_ENV, raising=False)
    for name, content in case.files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    path = tmp_path / "routemq.yaml"
    path.write_text(case.text.replace("@TMP@", str(tmp_path)), encoding="utf-8")

    with pytest.raises(ManifestError) as info:
        load(path)

    err = info.value
    text = str(err)
    prefix = f"{path}:{case.line}: " if case.line is not None else f"{path}: "
    if case.field is not None:
        prefix += f"{case.field}: "
    assert text.startswith(prefix), text
    assert case.phrase.replace("@TMP@", str(tmp_path)) in text
    assert err.path == str(path)
    assert err.line == case.line
    assert "\n" not in text
    assert not (tmp_path / "hacked").exists()


def test_bad_table_is_large_enough() -> None:
    assert len(BAD) >= 20


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "hacked"
    for place in ("group: {}\n" + R, "python_path: {}\n" + R, "routes: {}\n", "{}\n"):
        doc = place.format(HACK.replace("@TMP@", str(tmp_path)))
        with pytest.raises(ManifestError):
            loads(doc, str(tmp_path / "m.yaml"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------- robustness


def _laughs() -> str:
    doc = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        doc += f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return doc


@pytest.mark.parametrize(
    "tail", ["python_path: *i\nroutes: *i\n", "routes: *i\n", "routes: [*i]\n"]
)
def test_billion_laughs_is_refused_quickly(tail: str) -> None:
    start = time.monotonic()
    with pytest.raises(ManifestError):
        loads(_laughs() + tail, "bomb.yaml")
    assert time.monotonic() - start < 5


def test_merge_key_bomb_is_refused_quickly() -> None:
    doc = "m0: &m0 {qos: 1, prefetch: 2}\n"
    for i in range(1, 12):
        doc += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}\n"
    doc += "<<: *m11\n" + R
    start = time.monotonic()
    with pytest.raises(ManifestError) as info:
        loads(doc, "bomb.yaml")
    assert time.monotonic() - start < 5
    assert f"more than {MAX_NODES}" in str(info.value)


def test_self_referencing_merge_is_refused() -> None:
    with pytest.raises(ManifestError):
        loads("defaults: &d {<<: *d}\n" + R, "loop.yaml")


def test_small_merge_still_works() -> None:
    m = loads(
        "defaults: &d {qos: 0, max_memory: 64MiB}\n"
        "routes:\n  - topic: a/b\n    handler: m:f\n    <<: *d\n",
        "merge.yaml",
    )
    assert m.routes[0].qos == 0
    assert m.routes[0].max_memory == 64 * MiB


def test_deep_nesting_is_a_manifest_error() -> None:
    start = time.monotonic()
    with pytest.raises(ManifestError, match="nested too deeply"):
        loads("[" * 10_000, "deep.yaml")
    assert time.monotonic() - start < 5


def test_deep_mapping_nesting_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        loads("a: " + "{b: " * 3000 + "1" + "}" * 3000, "deep.yaml")


def test_file_larger_than_one_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(R.encode() + b"# " + b"x" * MiB + b"\n")
    with pytest.raises(ManifestError, match="at most 1 MiB") as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_bytes_larger_than_one_mib_are_refused() -> None:
    with pytest.raises(ManifestError, match="at most 1 MiB"):
        loads(b"#" * (MiB + 1), "big.yaml")


@pytest.mark.parametrize(
    "data",
    [
        b"routes:\n  - topic: a/\xff\xfe\n    handler: m:f\n",
        b"\xc3\x28: 1\n",
        R.encode("utf-16-le"),
        R.encode("utf-16-be"),
        b"\x00\x01\x02",
        b"group: \x07\n",
    ],
    ids=["invalid-utf8", "invalid-utf8-key", "utf16le-no-bom", "utf16be-no-bom", "nul", "bell"],
)
def test_undecodable_bytes_are_a_manifest_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(data)
    with pytest.raises(ManifestError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}")


def test_utf16_with_bom_is_read() -> None:
    m = loads(R.encode("utf-16"), "bom.yaml")
    assert m.routes[0].name == "a-b"


def test_directory_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a regular file") as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError, match="cannot read") as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_manifest_error_str_without_field_or_line() -> None:
    assert str(ManifestError("f.yaml", None, "", "bad")) == "f.yaml: bad"
    assert str(ManifestError("f.yaml", 3, "x.y", "bad")) == "f.yaml:3: x.y: bad"


# ------------------------------------------------------------------------------------ property

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_keys = st.sampled_from(
    [
        "routes",
        "broker",
        "defaults",
        "topic",
        "handler",
        "shared",
        "workers",
        "qos",
        "max_memory",
        "python_path",
        "group",
        "control",
        "mode",
        "metrics",
        "listen",
        "<<",
    ]
) | st.text(max_size=8)
_trees = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)

_BASE: dict[str, Any] = {
    "broker": {"host": "127.0.0.1", "port": 1883, "protocol": 5},
    "control": {"socket": "/run/x.sock", "mode": "0600"},
    "defaults": {"qos": 1, "max_memory": "64MiB", "heartbeat_timeout": "30s"},
    "routes": [{"name": "r", "topic": "a/{x}/b", "handler": "m:f", "shared": True, "workers": 2}],
}
_PLACES = [
    ("broker", "port"),
    ("broker", "protocol"),
    ("control", "mode"),
    ("defaults", "qos"),
    ("defaults", "max_memory"),
    ("defaults", "heartbeat_timeout"),
    ("routes", "topic"),
    ("routes", "handler"),
    ("routes", "workers"),
    ("routes", "shared"),
    ("routes", "name"),
    ("routes", "max_cpu"),
    ("routes", "dead_letter_topic"),
]


def _mutated(place: tuple[str, str], value: Any) -> str:
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(_BASE))
    section, key = place
    target = doc[section][0] if section == "routes" else doc[section]
    target[key] = value
    return yaml.safe_dump(doc, allow_unicode=True)


def _only_manifest_errors(text: str) -> None:
    try:
        result = loads(text, "<hypothesis>", environ={})
    except ManifestError as e:
        assert str(e).startswith("<hypothesis>")
        return
    assert isinstance(result, Manifest)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_text_only_raises_manifest_error(text: str) -> None:
    _only_manifest_errors(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_random_trees_only_raise_manifest_error(tree: Any) -> None:
    _only_manifest_errors(yaml.safe_dump(tree, allow_unicode=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PLACES), _trees)
def test_mutated_manifests_only_raise_manifest_error(place: tuple[str, str], value: Any) -> None:
    _only_manifest_errors(_mutated(place, value))


def test_unmutated_base_is_valid() -> None:
    m = loads(yaml.safe_dump(_BASE), "<base>", environ={})
    assert m.routes[0].workers == 2
    assert os.path.isabs(m.control.socket)


def test_merge_keys_are_overridden_by_the_routes_own_keys(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "x-base: &base\n"
        "  handler: routemqd.examples.handlers:noop\n"
        "  qos: 1\n"
        "routes:\n"
        "  - <<: *base\n"
        "    topic: a/b\n"
        "    qos: 0\n"
    )
    m = load(path)
    assert m.routes[0].qos == 0
    assert m.routes[0].handler == "routemqd.examples.handlers:noop"


def test_own_duplicate_keys_stay_errors_next_to_a_merge(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "x-base: &base {qos: 1}\n"
        "routes:\n"
        "  - <<: *base\n"
        "    topic: a/b\n"
        "    handler: m:f\n"
        "    topic: a/c\n"
    )
    with pytest.raises(ManifestError, match=r"m.yaml:6: routes\[0\]\.topic: duplicate key"):
        load(path)
