"""``routemqd check`` end to end: the real CLI, handler imports in a child, exit codes, output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from routemqd import cli
from routemqd.manifest import load
from routemqd.plan import slots_for

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "routemq.yaml"
TIMEOUT = 60


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTEMQD_")}
    return subprocess.run(
        [sys.executable, "-m", "routemqd", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )


def write_module(tmp_path: Path, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


def write_manifest(tmp_path: Path, routes: str, name: str = "routemq.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        f"python_path: [{tmp_path}]\nroutes:\n" + textwrap.dedent(routes), encoding="utf-8"
    )
    path.chmod(0o600)
    return path


def test_shipped_manifest_passes() -> None:
    proc = run_check(SHIPPED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    for name in ("sensor-data", "device-events", "echo"):
        assert f"route {name}" in out
    assert "$share/routemq/sensors/+/data" in out
    assert "devices/+/events/#" in out
    assert "routemqd.examples.handlers:echo (async)  [ok]" in out
    assert "routes    3, slots 4" in out
    for spec in slots_for(load(SHIPPED)).values():
        assert spec.client_id in out
    assert out.rstrip().endswith("manifest ok")


def test_handler_failing_at_import(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "rmq_boom",
        """\
        raise RuntimeError("database unreachable at import time")

        def handle(message):
            pass
        """,
    )
    path = write_manifest(tmp_path, "  - topic: a/b\n    handler: rmq_boom:handle\n")
    proc = run_check(path)
    assert proc.returncode == 78
    assert "rmq_boom:handle" in proc.stderr
    assert "RuntimeError: database unreachable at import time" in proc.stderr
    assert "[FAILED]" in proc.stdout
    assert "manifest ok" not in proc.stdout


def test_handlers_are_imported_only_in_a_child(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "imported-by.pid"
    write_module(
        tmp_path,
        "rmq_child_only",
        f"""\
        import os

        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")

        def handle(message):
            pass
        """,
    )
    path = write_manifest(tmp_path, "  - topic: a/b\n    handler: rmq_child_only:handle\n")
    sys_path_before = list(sys.path)

    assert cli.main(["check", "-c", str(path)]) == 0

    out = capsys.readouterr().out
    assert "rmq_child_only:handle  [ok]" in out
    assert "rmq_child_only" not in sys.modules
    assert sys.path == sys_path_before
    pids = marker.read_text().split()
    assert len(pids) == 1
    assert int(pids[0]) != os.getpid()


def test_import_happens_in_a_process_other_than_check(tmp_path: Path) -> None:
    marker = tmp_path / "imported-by.pid"
    write_module(
        tmp_path,
        "rmq_pid",
        f"""\
        import os

        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")

        def handle(message):
            pass
        """,
    )
    path = write_manifest(tmp_path, "  - topic: a/b\n    handler: rmq_pid:handle\n")
    with subprocess.Popen(
        [sys.executable, "-m", "routemqd", "check", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    ) as proc:
        out, err = proc.communicate(timeout=TIMEOUT)
        check_pid = proc.pid
    assert proc.returncode == 0, err
    assert "manifest ok" in out
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 1
    assert pids[0] != check_pid


@pytest.mark.parametrize(
    ("source", "phrase"),
    [
        ("handle = 42\n", "int is not callable"),
        ("def handle():\n    pass\n", "must accept exactly one argument"),
        ("def handle(a, b):\n    pass\n", "must accept exactly one argument"),
        ("def other(message):\n    pass\n", "rmq_bad has no attribute 'handle'"),
    ],
    ids=["not-callable", "no-argument", "two-arguments", "missing"],
)
def test_unusable_handler(tmp_path: Path, source: str, phrase: str) -> None:
    write_module(tmp_path, "rmq_bad", source)
    path = write_manifest(tmp_path, "  - topic: a/b\n    handler: rmq_bad:handle\n")
    proc = run_check(path)
    assert proc.returncode == 78
    assert f"routemqd: handler rmq_bad:handle: {phrase}" in proc.stderr


def test_handler_module_that_exits_the_interpreter(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "rmq_exit",
        """\
        import os

        os._exit(3)
        """,
    )
    write_module(tmp_path, "rmq_fine", "def handle(message):\n    pass\n")
    path = write_manifest(
        tmp_path,
        """\
        - topic: a/b
          handler: rmq_exit:handle
        - topic: c/d
          handler: rmq_fine:handle
        """,
    )
    proc = run_check(path)
    assert proc.returncode == 78
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert "rmq_exit:handle" in lines[0]
    assert "rmq_fine" not in proc.stderr


def test_overlapping_routes_warn_but_pass(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
        - name: wildcard
          topic: a/+
          handler: routemqd.examples.handlers:noop
        - name: exact
          topic: a/b
          handler: routemqd.examples.handlers:noop
        - name: unrelated
          topic: z/+
          handler: routemqd.examples.handlers:noop
        """,
    )
    proc = run_check(path)
    assert proc.returncode == 0, proc.stderr
    assert "warnings:" in proc.stdout
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("  - ")]
    assert len(warnings) == 1
    assert "'wildcard'" in warnings[0] and "'exact'" in warnings[0]
    assert "unrelated" not in warnings[0]
    assert proc.stdout.rstrip().endswith("manifest ok")


def test_bad_manifest_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "  - topic: a/b\n    handler: m:f\n    wokers: 2\n")
    proc = run_check(path)
    assert proc.returncode == 78
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"routemqd: {path}:5: routes[0].wokers: unknown key")
    assert "did you mean 'workers'" in lines[0]


def test_missing_manifest_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    proc = run_check(path)
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [f"routemqd: {path}: cannot read: No such file or directory"]


def test_autoscaled_route_prints_its_range_and_knobs(tmp_path: Path) -> None:
    write_module(tmp_path, "rmq_scaled", "def handle(message):\n    pass\n")
    path = write_manifest(
        tmp_path,
        """\
          - name: scaled
            topic: a/+
            handler: rmq_scaled:handle
            shared: true
            workers: {min: 1, max: 4}
            scaling:
              up_after: 3s
              busy_low: 40%
        """,
    )
    proc = run_check(path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "routes    1, slots 1" in out
    assert "shared, autoscaled 1..4 workers (starts with 1), group routemq" in out
    assert "up after 3s at busy >= 80% (host cpu below 85%), down after 60s" in out
    assert "if busy over one fewer < 40%" in out
    assert "slot 1-3    added by the scaler" in out
    assert out.rstrip().endswith("manifest ok")


def test_range_on_an_ordered_route_fails_naming_the_line(tmp_path: Path) -> None:
    write_module(tmp_path, "rmq_scaled", "def handle(message):\n    pass\n")
    path = write_manifest(
        tmp_path, "  - topic: a/b\n    handler: rmq_scaled:handle\n    workers: {min: 1, max: 2}\n"
    )
    proc = run_check(path)
    assert proc.returncode != 0
    assert f"{path}:5: routes[0].workers: a range needs 'shared: true'" in proc.stderr
    assert "cannot scale" in proc.stderr
