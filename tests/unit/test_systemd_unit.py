"""Checks for the shipped systemd unit and sysusers entry.

``systemd-analyze verify`` catches typos and settings the installed systemd
does not understand, which systemd would otherwise only log (and ignore) at
daemon-reload time on a production host. It comes with the Debian package
``systemd``; the Makefile installs it for CI, and the verify tests skip only
when the binary is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "routemqd.service"
SYSUSERS = REPO / "systemd" / "routemqd.sysusers"
SHIPPED_EXEC = "/usr/local/bin/routemqd"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_SYSUSERS = shutil.which("systemd-sysusers")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (install the Debian package 'systemd')",
)
needs_sysusers = pytest.mark.skipif(
    SYSTEMD_SYSUSERS is None,
    reason="systemd-sysusers not found (install the Debian package 'systemd')",
)


def _service_settings() -> dict[str, list[str]]:
    """Parse the [Service] section into key -> values (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}{key.strip()}", []).append(value.strip())
    return settings


def _one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values is not None, f"{key} missing from {UNIT.name}"
    assert len(values) == 1, f"{key} set more than once: {values}"
    return values[0]


def _existing_executable() -> str:
    """An executable that exists here, to stand in for /usr/local/bin/routemqd."""
    script = Path(sys.executable).parent / "routemqd"
    if script.is_file():
        return str(script)
    return sys.executable


def _unit_with_existing_executable(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart=/ExecReload= name an executable that exists here."""
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"={SHIPPED_EXEC} ", f"={_existing_executable()} "))
    return unit


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify fails when ExecStart's binary does not exist, and routemqd is not
    # installed at /usr/local/bin on a development or CI machine. Verify a copy
    # whose ExecStart points at an executable that does exist (the venv's
    # console script, else this interpreter); nothing is executed.
    unit = _unit_with_existing_executable(tmp_path)

    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in proc.stderr.splitlines() if UNIT.name in line]
    report = (
        f"systemd-analyze verify exited {proc.returncode}\n"
        f"diagnostics about our unit:\n" + "\n".join(ours) + "\n"
        f"full stderr:\n{proc.stderr}"
    )
    assert proc.returncode == 0, report
    assert not ours, report


@needs_sysusers
def test_sysusers_entry(tmp_path: Path) -> None:
    """The sysusers.d line parses and creates the user and group named in the unit."""
    (tmp_path / "etc").mkdir()
    assert SYSTEMD_SYSUSERS is not None
    proc = subprocess.run(
        [SYSTEMD_SYSUSERS, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Creating group 'routemqd'" in output, output
    assert "Creating user 'routemqd'" in output, output


def test_key_settings() -> None:
    s = _service_settings()

    assert _one(s, "[Service]Type") in {"notify", "notify-reload"}
    if _one(s, "[Service]Type") == "notify-reload":
        assert _one(s, "[Service]ReloadSignal") == "SIGHUP"
    else:
        # Not `kill -HUP`: only a command that waits for the reload's outcome makes a failed
        # reload fail `systemctl reload` on systemd 252.
        assert _one(s, "[Service]ExecReload") == f"{SHIPPED_EXEC} reload -c /etc/routemq.yaml"
    assert _one(s, "[Service]NotifyAccess") == "main"
    assert _one(s, "[Service]ExecStart") == f"{SHIPPED_EXEC} run -c /etc/routemq.yaml"

    assert _one(s, "[Service]KillMode") == "mixed"
    # Must exceed supervisor.graceful_timeout (default 30 s).
    stop = _one(s, "[Service]TimeoutStopSec")
    assert re.fullmatch(r"\d+", stop), f"TimeoutStopSec={stop} should be plain seconds"
    assert int(stop) > 30

    watchdog = _one(s, "[Service]WatchdogSec")
    assert re.fullmatch(r"\d+", watchdog) and int(watchdog) > 0
    assert _one(s, "[Service]Restart") == "on-failure"
    assert _one(s, "[Service]RuntimeDirectory") == "routemqd"
    assert _one(s, "[Service]User") == "routemqd"
    assert _one(s, "[Service]Group") == "routemqd"

    assert _one(s, "[Service]NoNewPrivileges") == "yes"
    assert _one(s, "[Service]ProtectSystem") == "strict"
    assert _one(s, "[Service]RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"

    assert _one(s, "[Install]WantedBy") == "multi-user.target"


MAX_EXPOSURE = 2.5


@needs_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's sandbox at most 2.5 ("OK").

    --offline reads the unit file instead of asking a running systemd; the score under a real
    systemd 252 is checked by `make systemd-test`.
    """
    unit = _unit_with_existing_executable(tmp_path)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_sandbox_keeps_what_handlers_and_the_master_need() -> None:
    """The hardening settings that would break handlers or the master are not there.

    ProcSubset=pid hides /proc/stat, which psutil needs for a worker's start time;
    PrivateUsers= would map the control socket's peers to nobody, locking operators out.
    """
    s = _service_settings()
    assert "[Service]ProcSubset" not in s
    assert "[Service]PrivateUsers" not in s
    assert _one(s, "[Service]SystemCallErrorNumber") == "EPERM"
    assert _one(s, "[Service]StateDirectory") == "routemqd"
    assert _one(s, "[Service]CapabilityBoundingSet") == ""
