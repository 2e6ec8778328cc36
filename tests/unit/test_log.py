"""Log set-up: secrets scrubbed, JSON off a terminal, readable on one, reopen after rotation."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from routemqd import log


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() changes process-wide state: put it back for the tests that follow."""
    monkeypatch.delenv("ROUTEMQD_LOG_FORMAT", raising=False)
    config = structlog.get_config()
    sink, secrets = log._sink, log._secrets
    try:
        yield
    finally:
        structlog.configure(**config)
        log._sink, log._secrets = sink, secrets
        log.set_process_fields()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_secrets_are_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "auto")
    log.set_secrets(["s3cret", ""])
    logger = log.get("routemqd.test")
    logger.info("connect_failed", reason="bad password s3cret for user x")
    logger.info("s3cret in the event name")
    logger.error("boom", error=ValueError("dsn=mqtt://u:s3cret@host"), extra={"pw": "s3cret"})
    out = capsys.readouterr().out
    assert "s3cret" not in out
    first, second, third = json_lines(out)
    assert first["reason"] == "bad password <hidden> for user x"
    assert second["event"] == "<hidden> in the event name"
    assert third["error"] == "dsn=mqtt://u:<hidden>@host"
    assert "<hidden>" in third["extra"]


def test_process_fields_reach_events_from_every_thread(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json")
    log.set_process_fields(pool="sensors", slot=2, pid=42)
    t = threading.Thread(target=lambda: structlog.get_logger("h").info("from_thread", slot=9))
    t.start()
    t.join()
    log.get().info("from_main")
    thread_line, main_line = json_lines(capsys.readouterr().out)
    # an event's own value wins over the process's
    assert (thread_line["pool"], thread_line["slot"], thread_line["pid"]) == ("sensors", 9, 42)
    assert (main_line["pool"], main_line["slot"]) == ("sensors", 2)


def test_values_without_secrets_keep_their_type(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json")
    log.set_secrets(["s3cret"])
    log.get().info("stats", count=3, ratio=0.5, ok=True, nothing=None, items=[1, 2])
    (line,) = json_lines(capsys.readouterr().out)
    assert line["count"] == 3
    assert line["ratio"] == 0.5
    assert line["ok"] is True
    assert line["nothing"] is None
    assert line["items"] == [1, 2]


def test_redact_helper() -> None:
    log.set_secrets(["abc", "xyz"])
    assert log.redact("abc-xyz-abc") == "<hidden>-<hidden>-<hidden>"
    log.set_secrets([])
    assert log.redact("abc") == "abc"


def test_json_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "auto")
    log.get("routemqd.test", pool="a").info("worker_ready", slot=1)
    (line,) = json_lines(capsys.readouterr().out)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["level"] == "info"
    assert line["event"] == "worker_ready"
    assert line["pool"] == "a" and line["slot"] == 1
    assert line["timestamp"].endswith("Z")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = FakeTty()
    monkeypatch.setattr("sys.stdout", tty)
    log.configure("info", "auto")
    log.set_secrets(["s3cret"])
    log.get().info("worker_ready", pool="a", token="s3cret")
    text = tty.getvalue()
    assert "worker_ready" in text
    assert "s3cret" not in text and "<hidden>" in text
    with pytest.raises(ValueError):
        json.loads(text.splitlines()[0])


@pytest.mark.parametrize(
    ("fmt", "env", "expect_json"),
    [
        ("json", None, True),
        ("console", None, False),
        ("auto", "console", False),
        ("json", "console", False),
        ("console", "json", True),
    ],
)
def test_format_choice(
    fmt: str,
    env: str | None,
    expect_json: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if env is not None:
        monkeypatch.setenv("ROUTEMQD_LOG_FORMAT", env)
    log.configure("info", fmt)
    log.get().info("hello", n=1)
    first = capsys.readouterr().out.splitlines()[0]
    if expect_json:
        assert json.loads(first)["event"] == "hello"
    else:
        with pytest.raises(ValueError):
            json.loads(first)
        assert "hello" in first


def test_level_filter(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("warning", "json")
    logger = log.get()
    logger.info("quiet")
    logger.warning("loud")
    assert [e["event"] for e in json_lines(capsys.readouterr().out)] == ["loud"]


def test_file_sink_reopens_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "routemqd.log"
    log.configure("info", "auto", str(path))
    logger = log.get()
    logger.info("before")
    rotated = tmp_path / "routemqd.log.1"
    path.rename(rotated)
    logger.info("still_old")
    log.sink().reopen()
    logger.info("after")
    assert [e["event"] for e in json_lines(rotated.read_text())] == ["before", "still_old"]
    assert [e["event"] for e in json_lines(path.read_text())] == ["after"]


def test_reopen_without_a_file_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json")
    log.sink().reopen()
    log.get().info("x")
    assert json_lines(capsys.readouterr().out)[0]["event"] == "x"


def test_writes_to_a_closed_stream_are_dropped() -> None:
    stream = io.StringIO()
    sink = log.LogSink(stream=stream)
    stream.close()
    sink.write("lost\n")  # must not raise
    assert sink.isatty() is False
