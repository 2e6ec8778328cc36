"""The process in one slot: an at-least-once MQTT consumer that runs one route's handler.

Threads, each with one job:
- paho's network thread reads packets and only enqueues messages (never runs a handler, so a slow
  handler cannot starve keepalive and get the client timed out and the message redelivered);
- runner threads (or one asyncio loop for ``async def`` handlers) run the handler and then
  acknowledge: a message is PUBACKed only after its handler returned, so a worker killed mid-message
  leaves it unacked and the broker delivers it again;
- the main thread talks to the master: commands in, ``ready`` and heartbeats out, and it notices a
  handler stuck past its deadline and reports where it is stuck.

Exit codes are named in :mod:`routemqd.exitcodes`: the master tells a crash from a boot failure.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import os
import queue
import random
import selectors
import signal
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from routemqd import log as logsetup
from routemqd import protocol
from routemqd.board import InflightBoard, fingerprint
from routemqd.exitcodes import ExitCode
from routemqd.handlers import HandlerError, LoadedHandler, load_handler
from routemqd.log import redact
from routemqd.message import Message
from routemqd.plan import SlotSpec

HEARTBEAT_INTERVAL = 1.0
RETIRE_IDLE = 0.5  # quiet time after UNSUBACK before ending the session (BROKER-FACTS)
QOS0_INBOX_LIMIT = 10_000  # QoS 0 has no flow control; past this we drop rather than grow
QOS0_INBOX_BYTES = 64 * 1024 * 1024  # ... and past this many payload bytes waiting
DURATION_BUCKETS = protocol.DURATION_BUCKETS
_AUTH_REASONS = {134, 135}  # Bad user name or password / Not authorized (3.1.1 rc 4/5 map here)
_STOP = object()
PR_SET_PDEATHSIG = 1


def _until_next_beat() -> float:
    """Seconds to the next wall-clock heartbeat tick. Every worker beats on the same tick, so the
    master reads a whole pool's heartbeats in one wake-up instead of one wake-up per worker."""
    return HEARTBEAT_INTERVAL - (time.time() % HEARTBEAT_INTERVAL)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when the master dies, so a worker never outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent-pid check in the main loop still catches it


@dataclass
class RunnerState:
    """Owned by one runner; the main thread only reads it (sums for heartbeats)."""

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    busy_since: float | None = None
    busy_topic: str = ""
    busy_thread: int | None = None
    stuck_reported: bool = False
    last_error: str = ""
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    cell: int = 0  # this runner's cell on the in-flight board
    fingerprint: bytes | None = None
    resolved: list[bytes] = field(default_factory=list)  # earlier crashers now finished


class Worker:
    def __init__(
        self,
        spec: SlotSpec,
        status_fd: int,
        command_fd: int | None = None,
        parent_pid: int | None = None,
        board: InflightBoard | None = None,
        attempts: Mapping[bytes, int] | None = None,
    ) -> None:
        self.spec = spec
        self.board = board
        self.attempts: Mapping[bytes, int] = attempts or {}
        self.route = spec.route
        self.status_fd = status_fd
        self.command_fd = command_fd
        self.parent_pid = parent_pid
        self.log = structlog.get_logger("routemqd.worker").bind(
            pool=spec.route.name, slot=spec.index, pid=os.getpid()
        )
        self.handler: LoadedHandler | None = None
        self.client: mqtt.Client | None = None
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.accepting = True
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.unsubscribed = threading.Event()
        self.retiring = False
        self.connected_at = 0.0
        self.stopping = threading.Event()
        self.boot_failure: tuple[ExitCode, str] | None = None
        self.stop_mode: str | None = None
        self.connect_allowed = False
        self.ready_sent = False
        self.received = 0
        self.dropped = 0
        self.redelivered = 0
        self.last_message_at = time.monotonic()
        self.states: list[RunnerState] = []
        self.threads: list[threading.Thread] = []
        self.async_loop: asyncio.AbstractEventLoop | None = None
        self.async_queue: asyncio.Queue[Any] | None = None
        self.reconnect_attempts = 0
        self.jitter = random.Random()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)
        self._qos0_lock = threading.Lock()
        self.qos0_queued = 0  # QoS 0 messages waiting for a runner, and their payload bytes
        self.qos0_bytes = 0

    # ------------------------------------------------------------------------------ lifecycle

    def main(self, hold: bool = False) -> int:
        self._install_signals()
        try:
            self.handler = load_handler(self.route.handler, self.spec.python_path)
        except HandlerError as e:
            code = (
                ExitCode.HANDLER_IMPORT_FAILED if e.kind == "import" else ExitCode.HANDLER_INVALID
            )
            self.log.error("handler_unusable", reason=str(e), detail=e.detail or None)
            self._emit({"t": "boot_error", "code": int(code), "reason": str(e)})
            return int(code)
        self._emit({"t": "warm"})
        self.connect_allowed = not hold
        mode = self._serve()
        return self._shutdown(mode)

    def _serve(self) -> str:
        """The main thread's loop: commands, signals, heartbeats, deadlines. Returns a stop mode."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        reader = None
        if self.command_fd is not None:
            os.set_blocking(self.command_fd, False)
            reader = protocol.LineReader(self.command_fd)
            sel.register(self.command_fd, selectors.EVENT_READ, "command")
        next_beat = time.monotonic()
        try:
            while self.stop_mode is None and self.boot_failure is None:
                if self.connect_allowed and self.client is None:
                    self._start_client()
                    if self.boot_failure is not None:
                        break
                timeout = max(0.0, next_beat - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                    elif reader is not None:
                        for cmd in reader.read():
                            self._command(cmd)
                        if reader.eof:
                            self.log.warning("master_gone", reason="command pipe closed")
                            sel.unregister(self.command_fd)
                            self.stop_mode = self.stop_mode or protocol.STOP_KEEP
                if self.subscribed.is_set() and not self.ready_sent:
                    self.ready_sent = True
                    self._emit({"t": "ready"})
                    self.log.info("subscribed", filter=self.route.subscription)
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.log.warning("master_gone", reason="parent changed")
                    self.stop_mode = protocol.STOP_KEEP
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + _until_next_beat()
        finally:
            sel.close()
        if self.boot_failure is not None:
            return "boot_failure"
        return self.stop_mode or protocol.STOP_KEEP

    def _command(self, cmd: dict[str, Any]) -> None:
        kind = cmd.get("cmd")
        if kind == "connect":
            self.connect_allowed = True
        elif kind == "reopen_logs":
            logsetup.sink().reopen()  # our copy of the log file, inherited through fork
        elif kind == "stop":
            mode = cmd.get("mode")
            self.stop_mode = mode if mode in (protocol.STOP_KEEP, protocol.STOP_RETIRE) else "keep"

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR2, self._on_signal)
        # A terminal's Ctrl-C / Ctrl-\ / hangup reach the whole process group: the master
        # decides how its workers stop, so they ignore these.
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if self.parent_pid is None:  # `routemqd worker` alone in a terminal: Ctrl-C stops it
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record the wish; the main loop acts on it (woken by the wakeup fd).
        if self.stop_mode is None:
            self.stop_mode = (
                protocol.STOP_RETIRE if signum == signal.SIGUSR2 else protocol.STOP_KEEP
            )

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _emit(self, event: dict[str, Any]) -> None:
        if not protocol.write_event(self.status_fd, event) and self.stop_mode is None:
            self.stop_mode = protocol.STOP_KEEP  # the master is gone

    # ---------------------------------------------------------------------------- MQTT client

    def _build_client(self, clean: bool = False) -> mqtt.Client:
        b = self.spec.broker
        v5 = b.protocol == 5
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.spec.client_id,
            clean_session=None if v5 else clean,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        if b.username is not None:
            client.username_pw_set(b.username, b.password.reveal() if b.password else None)
        if b.tls is not None:
            client.tls_set(
                ca_certs=b.tls.ca_file,
                certfile=b.tls.cert_file,
                keyfile=b.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if b.tls.insecure:
                client.tls_insecure_set(True)
        client.reconnect_delay_set(b.reconnect_min, b.reconnect_max)
        client.connect_timeout = b.connect_timeout
        if clean:
            return client
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        return client

    def _connect_args(self) -> dict[str, Any]:
        b = self.spec.broker
        args: dict[str, Any] = {"host": b.host, "port": b.port, "keepalive": b.keepalive}
        if b.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry
            props.ReceiveMaximum = max(1, min(65535, self.route.concurrency + self.route.prefetch))
            args["clean_start"] = False  # paho's default cleans the first connect: never for us
            args["properties"] = props
        return args

    def _start_client(self) -> None:
        assert self.handler is not None
        self._start_runners(self.handler)
        try:
            self.client = self._build_client()
        except (ssl.SSLError, OSError) as e:
            # tls_set loads the CA and client certificate files: a bad file fails every restart
            reason = f"TLS set-up failed: cannot load the CA or client certificate files: {e}"
            self._boot_fail(ExitCode.TLS_FAILED, reason)
            return
        args = self._connect_args()
        try:
            self.client.connect(**args)
        except ssl.SSLError as e:
            reason = (
                f"TLS handshake with {self.spec.broker.host}:{self.spec.broker.port} failed: {e}"
            )
            self._boot_fail(ExitCode.TLS_FAILED, reason)
            return
        except OSError as e:
            self.log.warning(
                "broker_unreachable",
                reason=str(e),
                host=self.spec.broker.host,
                port=self.spec.broker.port,
            )
            self.client.connect_async(**args)
        self.client.loop_start()

    def _boot_fail(self, code: ExitCode, reason: str) -> None:
        if self.boot_failure is None:
            self.boot_failure = (code, reason)
            self.log.error("worker_boot_failed", reason=reason, code=code.name.lower())
            self._emit({"t": "boot_error", "code": int(code), "reason": reason})
        self._wake()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            if rc.value in _AUTH_REASONS:
                self._boot_fail(
                    ExitCode.BROKER_AUTH_REFUSED, f"broker refused the connection: {rc}"
                )
                client.disconnect()
            else:
                self.log.warning("connect_refused", reason=str(rc))
            return
        self.reconnect_attempts = 0
        self.max_packet = getattr(props, "MaximumPacketSize", None)
        self.connected.set()
        self.log.info(
            "connected",
            session_present=bool(getattr(flags, "session_present", False)),
            client_id=self.spec.client_id,
        )
        self.connected_at = time.monotonic()
        if self.retiring:
            # Leaving: a restarted broker may have restored a plain subscription with the session,
            # so say UNSUBSCRIBE again on every connect instead of SUBSCRIBE.
            client.unsubscribe(self.route.subscription)
            return
        # Subscribe on every connect: Mosquitto 2.0.11 forgets $share subscriptions over a
        # restart even when it says session_present, and a repeated SUBSCRIBE never doubles a share.
        result, _mid = client.subscribe(self.route.subscription, qos=self.route.subscribe_qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.log.warning("subscribe_not_sent", reason=str(result))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any
    ) -> None:
        failures = [rc for rc in rcs if rc.is_failure]
        if failures:
            self._boot_fail(
                ExitCode.SUBSCRIBE_REFUSED,
                f"broker refused the subscription {self.route.subscription!r}: {failures[0]}",
            )
            return
        self.subscribed.set()
        self._wake()

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any
    ) -> None:
        self.unsubscribed.set()
        self._wake()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        self.unsubscribed.clear()
        if self.stopping.is_set() or self.boot_failure is not None:
            return
        if was:
            self.log.warning("disconnected", reason=str(rc))
        self._reconnect_jitter()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._reconnect_jitter()

    def _reconnect_jitter(self) -> None:
        """paho backs off exponentially but in lockstep; this spreads a whole host's workers so
        they do not all reconnect in the same millisecond after a broker restart."""
        b = self.spec.broker
        base = min(b.reconnect_max, b.reconnect_min * (2**self.reconnect_attempts))
        self.reconnect_attempts = min(self.reconnect_attempts + 1, 16)
        self.stopping.wait(self.jitter.uniform(0, base / 2))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self.last_message_at = time.monotonic()
        if msg.dup:
            self.redelivered += 1
        if not self.accepting:
            # Not acked: it stays in this slot's session and the next worker gets it.
            if msg.qos == 0:
                self.dropped += 1
            return
        if msg.qos == 0 and not self._queue_qos0(len(msg.payload)):
            self.dropped += 1
            return
        if self.async_loop is not None:
            assert self.async_queue is not None
            self.async_loop.call_soon_threadsafe(self.async_queue.put_nowait, msg)
        else:
            self.inbox.put(msg)

    def _queue_qos0(self, size: int) -> bool:
        """Bound what QoS 0 queues by count and by bytes: a flood of large messages faster than
        the handler would otherwise grow the worker without limit. One message always fits."""
        with self._qos0_lock:
            if self.qos0_queued and (
                self.qos0_queued >= QOS0_INBOX_LIMIT or self.qos0_bytes + size > QOS0_INBOX_BYTES
            ):
                return False
            self.qos0_queued += 1
            self.qos0_bytes += size
            return True

    # ------------------------------------------------------------------------------- runners

    def _start_runners(self, handler: LoadedHandler) -> None:
        n = self.route.concurrency
        self.states = [RunnerState(cell=i) for i in range(n)]
        if handler.is_async:
            ready = threading.Event()
            t = threading.Thread(
                target=self._async_main, args=(handler, ready), name="handlers", daemon=True
            )
            t.start()
            ready.wait(5)
            self.threads = [t]
        else:
            self.threads = []
            for i, state in enumerate(self.states):
                t = threading.Thread(
                    target=self._sync_runner,
                    args=(handler, state),
                    name=f"handler-{i}",
                    daemon=True,
                )
                t.start()
                self.threads.append(t)

    def _bind_log_context(self) -> None:
        """Handlers that log with structlog get pool/slot/pid on every event for free."""
        structlog.contextvars.bind_contextvars(
            pool=self.route.name, slot=self.spec.index, pid=os.getpid()
        )

    def _sync_runner(self, handler: LoadedHandler, state: RunnerState) -> None:
        self._bind_log_context()
        state.busy_thread = threading.get_ident()
        func = handler.func
        while True:
            raw = self.inbox.get()
            if raw is _STOP:
                return
            begun = self._begin(state, raw)
            if begun is None:
                continue
            message, pending, start = begun
            error: BaseException | None = None
            try:
                func(message)
            except BaseException as e:
                error = e
            finally:
                state.busy_since = None
            self._complete(state, raw, message, pending, error, start)

    def _async_main(self, handler: LoadedHandler, ready: threading.Event) -> None:
        self._bind_log_context()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.async_queue = asyncio.Queue()
        self.async_loop = loop
        ready.set()

        async def consume(state: RunnerState) -> None:
            state.busy_thread = threading.get_ident()
            assert self.async_queue is not None
            while True:
                raw = await self.async_queue.get()
                if raw is _STOP:
                    return
                begun = (
                    await loop.run_in_executor(None, self._begin, state, raw)
                    if (self.board is not None and self.attempts)
                    else self._begin(state, raw)
                )
                if begun is None:
                    continue
                message, pending, start = begun
                error: BaseException | None = None
                try:
                    await handler.func(message)
                except BaseException as e:
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    error = e
                finally:
                    state.busy_since = None
                needs_wait = bool(pending) or (
                    error is not None and bool(self.route.dead_letter_topic)
                )
                if needs_wait:
                    # waiting for published messages' PUBACKs blocks: keep it off the loop
                    await loop.run_in_executor(
                        None, self._complete, state, raw, message, pending, error, start
                    )
                else:
                    self._complete(state, raw, message, pending, error, start)

        async def run_all() -> None:
            await asyncio.gather(*(consume(s) for s in self.states))

        try:
            loop.run_until_complete(run_all())
        finally:
            loop.close()

    def _begin(
        self, state: RunnerState, raw: mqtt.MQTTMessage
    ) -> tuple[Message, list[mqtt.MQTTMessageInfo], float] | None:
        """Mark the message as in flight on the board; None if it is a known worker-killer
        (then it has been dead-lettered or dropped, and acknowledged)."""
        if raw.qos == 0:
            with self._qos0_lock:
                self.qos0_queued -= 1
                self.qos0_bytes -= len(raw.payload)
        message, pending = self._message(raw)
        state.fingerprint = None
        if self.board is not None and raw.qos > 0:
            digest = fingerprint(message.topic, message.payload)
            prior = self.attempts.get(digest, 0)
            if prior:
                message.attempt = prior + 1
                if prior >= self.route.max_attempts:
                    self._poison(state, raw, message, pending, digest, prior)
                    return None
            state.fingerprint = digest
            self.board.set(state.cell, digest)
        start = time.monotonic()
        state.busy_topic = message.topic
        state.stuck_reported = False
        state.busy_since = start
        return message, pending, start

    def _poison(
        self,
        state: RunnerState,
        raw: mqtt.MQTTMessage,
        message: Message,
        pending: list[mqtt.MQTTMessageInfo],
        digest: bytes,
        prior: int,
    ) -> None:
        error = f"message took down {prior} workers (max_attempts {self.route.max_attempts})"
        state.failed += 1
        state.last_error = error
        self.log.error(
            "poison_message",
            topic=message.topic,
            attempts=prior,
            action="dead-lettered" if self.route.dead_letter_topic else "dropped",
        )
        if self.route.dead_letter_topic:
            if (info := self._dead_letter(message, error)) is not None:
                pending.append(info)
            state.dead_lettered += 1
        if pending and not self._wait_published(pending):
            return
        state.resolved.append(digest)
        if raw.qos > 0 and self.client is not None:
            self.client.ack(raw.mid, raw.qos)

    def _message(self, raw: mqtt.MQTTMessage) -> tuple[Message, list[mqtt.MQTTMessageInfo]]:
        """The handler's view of a delivery; kept cheap, it runs once per message."""
        try:
            topic = raw.topic
        except UnicodeDecodeError:
            topic = raw._topic.decode("utf-8", "replace")
        message = Message(
            topic=topic,
            payload=raw.payload,
            qos=raw.qos,
            retain=bool(raw.retain),
            dup=bool(raw.dup),
            mid=raw.mid,
            properties=raw.properties,
            route=self.route.name,
            attempt=2 if raw.dup else 1,
            publish=self._publish,
            pattern=self.route.topic,
        )
        return message, message.pending

    def _publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        props: Mapping[str, Any] | None,
    ) -> mqtt.MQTTMessageInfo:
        assert self.client is not None
        properties = None
        if self.spec.broker.protocol == 5 and props:
            properties = Properties(PacketTypes.PUBLISH)
            for name, value in props.items():
                if name == "user_properties":
                    properties.UserProperty = [(str(k), str(v)) for k, v in value]
                else:
                    attr = "".join(p.capitalize() for p in name.split("_"))
                    setattr(properties, attr, value)
        if self.max_packet is not None:
            # The broker drops the connection on a larger packet, and paho sends it again on every
            # reconnect: refuse it here. Fixed header at most 5, topic length 2, packet id 2.
            body = len(payload.encode() if isinstance(payload, str) else payload)
            extra = len(properties.pack()) if properties is not None else 1
            size = 5 + 2 + len(topic.encode()) + 2 + extra + body
            if size > self.max_packet:
                raise PublishTooLarge(
                    f"publishing {size} bytes to {topic!r} exceeds the broker's maximum packet "
                    f"size of {self.max_packet}"
                )
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def _complete(
        self,
        state: RunnerState,
        raw: mqtt.MQTTMessage,
        message: Message,
        pending: list[mqtt.MQTTMessageInfo],
        error: BaseException | None,
        start: float,
    ) -> None:
        elapsed = time.monotonic() - start
        state.buckets[bisect.bisect_left(DURATION_BUCKETS, elapsed)] += 1
        state.duration_sum += elapsed
        if error is not None:
            state.failed += 1
            # status and dead letters carry it too: scrub secrets here, not only in the log
            state.last_error = redact(f"{type(error).__name__}: {error}")[:500]
            self.log.error(
                "handler_failed",
                topic=message.topic,
                mid=raw.mid,
                attempt=message.attempt,
                error=state.last_error,
                traceback="".join(traceback.format_exception(error)[-12:]),
            )
            if self.route.dead_letter_topic:
                if (info := self._dead_letter(message, state.last_error)) is not None:
                    pending.append(info)
                state.dead_lettered += 1
        else:
            state.handled += 1
        if pending and not self._wait_published(pending):
            # Not confirmed: leave the message unacked so it comes back with the session.
            self._clear_cell(state)
            return
        if raw.qos > 0 and self.client is not None:
            self.client.ack(raw.mid, raw.qos)
        if state.fingerprint is not None and message.attempt > 1:
            state.resolved.append(state.fingerprint)
        self._clear_cell(state)

    def _clear_cell(self, state: RunnerState) -> None:
        if self.board is not None and state.fingerprint is not None:
            self.board.clear(state.cell)
            state.fingerprint = None

    def _dead_letter(self, message: Message, error: str) -> mqtt.MQTTMessageInfo | None:
        topic = self.route.dead_letter_topic
        assert topic is not None
        if self.spec.broker.protocol == 5:
            users = [
                ("original_topic", message.topic),
                ("route", self.route.name),
                ("error", error),
                ("attempt", str(message.attempt)),
            ]
            try:
                return self._publish(topic, message.payload, 1, False, {"user_properties": users})
            except PublishTooLarge as e:
                omitted = f"{len(message.payload)} bytes: {e}"
                users.append(("payload_omitted", omitted))
            try:
                return self._publish(topic, b"", 1, False, {"user_properties": users})
            except PublishTooLarge as e:
                self.log.error("dead_letter_dropped", topic=message.topic, reason=str(e))
                return None
        import base64
        import json

        envelope = {
            "original_topic": message.topic,
            "route": self.route.name,
            "error": error,
            "attempt": message.attempt,
            "payload_b64": base64.b64encode(message.payload).decode(),
        }
        return self._publish(topic, json.dumps(envelope), 1, False, None)

    def _wait_published(self, infos: list[mqtt.MQTTMessageInfo], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        for info in infos:
            try:
                while not info.is_published():
                    if time.monotonic() > deadline or not self.connected.is_set():
                        return False
                    info.wait_for_publish(0.2)
            except (RuntimeError, ValueError):
                # is_published() raises too, e.g. for a publish made while disconnected (rc
                # NO_CONN): not confirmed, and it must not kill the runner thread
                return False
        return True

    # ---------------------------------------------------------------------------- reporting

    def _heartbeat(self, now: float) -> None:
        busy_for = 0.0
        busy: RunnerState | None = None
        for s in self.states:
            since = s.busy_since
            if since is not None and now - since > busy_for:
                busy_for, busy = now - since, s
        deadline = self.route.handler_timeout or self.route.heartbeat_timeout
        if busy is not None and busy_for > deadline and not busy.stuck_reported:
            busy.stuck_reported = True
            stack = self._stack_of(busy.busy_thread)
            self.log.error(
                "handler_stuck", topic=busy.busy_topic, busy_for=round(busy_for, 1), stack=stack
            )
            self._emit(
                {
                    "t": "stuck",
                    "topic": busy.busy_topic,
                    "busy_for": busy_for,
                    "stack": stack[-3000:],
                }
            )
        buckets = [0] * (len(DURATION_BUCKETS) + 1)
        for s in self.states:
            for i, c in enumerate(s.buckets):
                buckets[i] += c
        last_error = next((s.last_error for s in self.states if s.last_error), "")
        self._emit(
            {
                "t": "hb",
                "received": self.received,
                "handled": sum(s.handled for s in self.states),
                "failed": sum(s.failed for s in self.states),
                "dead_lettered": sum(s.dead_lettered for s in self.states),
                "dropped": self.dropped,
                "redelivered": self.redelivered,
                "inflight": sum(1 for s in self.states if s.busy_since is not None),
                "queued": self.inbox.qsize(),
                "connected": self.connected.is_set(),
                "busy_for": round(busy_for, 3),
                "busy_topic": busy.busy_topic if busy is not None else "",
                "last_error": last_error,
                "buckets": buckets,
                "duration_sum": round(sum(s.duration_sum for s in self.states), 6),
                "resolved": self._take_resolved(),
            }
        )

    def _take_resolved(self) -> list[str]:
        out: list[str] = []
        for s in self.states:
            taken, s.resolved = s.resolved, []
            out.extend(d.hex() for d in taken)
        return out

    @staticmethod
    def _stack_of(thread_id: int | None) -> str:
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else ""

    # ------------------------------------------------------------------------------ shutdown

    def _shutdown(self, mode: str) -> int:
        graceful = self.spec.graceful_timeout
        deadline = time.monotonic() + max(0.5, graceful - 1.0)
        if mode == "boot_failure":
            assert self.boot_failure is not None
            self.stopping.set()
            self._stop_client(end_session=False)
            return int(self.boot_failure[0])
        if self.client is None:
            return int(ExitCode.OK)
        self.log.info("worker_stopping", mode=mode)
        end_session = mode == protocol.STOP_RETIRE and self._retire(deadline)
        self.accepting = False
        self._stop_runners(deadline)
        self.stopping.set()
        self._stop_client(end_session=end_session)
        self.log.info("worker_stopped", mode=mode, handled=sum(s.handled for s in self.states))
        return int(ExitCode.OK)

    def _retire(self, deadline: float) -> bool:
        """Leave the group without stranding anything: UNSUBSCRIBE, wait for UNSUBACK, handle what
        is still in flight, stay idle a moment. True when that happened on a live connection, so
        the caller may end the session; False (broker away until the deadline) keeps the session
        for whoever resumes this client id, rather than dropping what it holds."""
        assert self.client is not None
        self.retiring = True
        if self.connected.is_set():
            self.unsubscribed.clear()
            self.client.unsubscribe(self.route.subscription)
        while time.monotonic() < deadline:
            now = time.monotonic()
            settled = (
                self.connected.is_set()
                and self.unsubscribed.is_set()
                # after a reconnect the broker first resends what was in flight
                and now - self.connected_at >= RETIRE_IDLE
                and now - self.last_message_at >= RETIRE_IDLE
                and self.inbox.qsize() == 0
                and all(s.busy_since is None for s in self.states)
                and (self.async_queue is None or self.async_queue.qsize() == 0)
            )
            if settled:
                return True
            time.sleep(0.05)
        self.log.warning(
            "retire_incomplete",
            reason="the broker was not reachable long enough to leave cleanly; "
            "the session is kept for the next worker with this client id",
        )
        return False

    def _stop_runners(self, deadline: float) -> None:
        if self.async_loop is not None and self.async_queue is not None:
            for _ in self.states:
                self.async_loop.call_soon_threadsafe(self.async_queue.put_nowait, _STOP)
        else:
            for _ in self.threads:
                self.inbox.put(_STOP)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _stop_client(self, end_session: bool) -> None:
        client = self.client
        if client is None:
            return
        v5 = self.spec.broker.protocol == 5
        connected = self.connected.is_set()
        if connected and end_session and v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
        else:
            client.disconnect()
        client.loop_stop()
        if connected and end_session and not v5:
            self._end_session_311()

    def _end_session_311(self) -> None:
        """MQTT 3.1.1 cannot end a session at DISCONNECT: connect once with a clean session."""
        b = self.spec.broker
        client = self._build_client(clean=True)
        try:
            client.connect(b.host, b.port, b.keepalive)
            client.loop(1.0)
            client.disconnect()
        except OSError as e:
            self.log.warning("session_not_ended", reason=str(e))


class PublishTooLarge(ValueError):
    """A publish the broker would refuse (over its Maximum Packet Size)."""


def run(
    spec: SlotSpec,
    status_fd: int,
    command_fd: int | None = None,
    hold: bool = False,
    parent_pid: int | None = None,
    board: InflightBoard | None = None,
    attempts: Mapping[bytes, int] | None = None,
) -> int:
    """Run one slot's worker until told to stop; returns an ExitCode value."""
    worker = Worker(spec, status_fd, command_fd, parent_pid, board, attempts)
    try:
        return worker.main(hold=hold)
    except Exception as e:
        worker.log.error(
            "worker_crashed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
        return int(ExitCode.CRASH)
