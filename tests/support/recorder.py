"""A handler for hostile-input tests: records what it was given as one JSON line per message.

Unlike ``tests/handlers/ledger.py`` it makes no assumption about the topic or the payload (spaces,
unicode, binary, megabytes): the topic is stored JSON-escaped and the payload as its length and
SHA-256, so a test can match every published message to its record. Lines go to the file named by
``ROUTEMQD_TEST_RECORD`` with one O_APPEND write each, so several workers can share it.
``ROUTEMQD_TEST_RECORD_DELAY`` (seconds) makes it a slow consumer.

After recording, the handler behaves like a strict real one: it answers a request that has a
response topic (``reply``), publishes the payload twice over to ``echo/<topic>`` when the user
property ``echo`` is ``twice``, and raises ``PayloadError`` for a payload that is not UTF-8 (so
the message is dead-lettered).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routemqd.message import Message

ENV = "ROUTEMQD_TEST_RECORD"
DELAY_ENV = "ROUTEMQD_TEST_RECORD_DELAY"
_fd: int | None = None
_lock = threading.Lock()


def _out() -> int:
    global _fd
    if _fd is None:
        with _lock:
            if _fd is None:
                _fd = os.open(os.environ[ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return _fd


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def record(message: Message) -> None:
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    props = message.properties
    users = props.get("user_properties") or []
    correlation = props.get("correlation_data")
    try:
        message.payload.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    entry = {
        "topic": message.topic,
        "params": dict(message.params),
        "len": len(message.payload),
        "sha": digest(message.payload),
        "pid": os.getpid(),
        "utf8": utf8,
        "content_type": props.get("content_type"),
        "response_topic": props.get("response_topic"),
        "correlation_sha": digest(bytes(correlation)) if correlation is not None else None,
        "user_properties": len(users),
        "user_property_bytes": sum(len(k) + len(v) for k, v in users),
    }
    os.write(_out(), (json.dumps(entry) + "\n").encode())
    message.reply({"sha": entry["sha"]})
    if ("echo", "twice") in users:
        message.publish(f"echo/{message.topic}", message.payload * 2)
    message.text()  # PayloadError for a payload that is not UTF-8: dead-lettered


@dataclass(frozen=True)
class Seen:
    topic: str
    params: dict[str, str]
    len: int
    sha: str
    pid: int
    utf8: bool
    content_type: str | None
    response_topic: str | None
    correlation_sha: str | None
    user_properties: int
    user_property_bytes: int


def read(path: Path) -> list[Seen]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            raw: dict[str, Any] = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        out.append(Seen(**raw))
    return out
