"""The MQTT connection: the only module of routemqd that imports paho-mqtt.

It builds the client, connects, (re)subscribes on every connect, and offers the few primitives the
socket drivers (:mod:`routemqd.worker.drivers`) and the acknowledger need: ``service()`` (read
everything buffered, write, keepalive bookkeeping), ``ack()``, ``publish()``, ``unsubscribe()``,
``close()``. It never decides *whether* a message is acknowledged: that is
:mod:`routemqd.worker.delivery`.

One thread at a time touches paho's state. Every public method here holds ``self.lock`` (an
RLock). The thread that reads the socket holds it while it calls into paho; an inline handler is
run with the lock released (``run_unlocked()``) and reacquires it when it returns. So the keepalive
guard (``keep_alive_if_starved``, called from the worker's main thread) can take the lock exactly
while a handler has the socket thread busy, and never while paho is parsing or writing. paho runs
without its own network thread (no ``loop_start``), and the socket-write hooks are set, so paho
never writes from inside ``publish()`` or ``ack()``: every write happens in ``service()`` or in
the guard, both under the lock.

This relies on paho 2.2 internals (``_sock_recv``, ``_sock``, ``_send_pingreq``), pinned in
setup.cfg; ``tests/unit/test_worker_link.py`` checks them.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK, PUBCOMP, PUBREC, PUBREL
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from routemqd.plan import SlotSpec

READ_CHUNK = 65536  # one recv() serves every small read paho makes until it is used up
AUTH_REASONS = {134, 135}  # Bad user name or password / Not authorized (3.1.1 rc 4/5 map here)
GUARD_FRACTION = 0.5  # the guard pings once the socket went unserviced this share of keepalive
ACK_BATCH = 8  # acknowledgements held back while more packets are in hand, at most
ACK_HOLD = 0.002  # ... and for at most this long (seconds)
_ACKS = frozenset(int(c) for c in (PUBACK, PUBREC, PUBREL, PUBCOMP))


class PublishTooLarge(ValueError):
    """A publish the broker would refuse (over its Maximum Packet Size)."""


class LinkObserver(Protocol):
    """What the link tells the worker; called with the link's lock held."""

    def on_connected(self, session_present: bool) -> None: ...
    def on_refused(self, reason: str, auth: bool) -> None: ...
    def on_subscribed(self, failure: str | None) -> None: ...
    def on_unsubscribed(self) -> None: ...
    def on_disconnected(self, reason: str) -> None: ...
    def on_message(self, raw: Any) -> None: ...
    def on_problem(self) -> None: ...


class BufferedClient(mqtt.Client):
    """paho reads a packet with at least three ``recv()`` calls (type, length, body), each a
    system call that releases the GIL. Here they are served from one large read. The socket
    drivers keep reading while ``buffered()`` is true, so select() never waits with a packet
    already in hand (TLS sockets hold decrypted bytes of their own: ``pending()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rdata = b""
        self._rpos = 0
        self._rsock: Any = None

    def _sock_recv(self, bufsize: int) -> bytes:
        sock = self._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        if sock is not self._rsock:  # a new connection: nothing buffered belongs to it
            self._rsock, self._rdata, self._rpos = sock, b"", 0
        data, pos = self._rdata, self._rpos
        if pos >= len(data):
            try:
                data = sock.recv(READ_CHUNK)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self._call_socket_register_write()
                raise BlockingIOError() from err
            self._rdata, pos = data, 0
        end = pos + bufsize
        self._rpos = min(end, len(data))
        return data[pos:end]

    def loop_write(self) -> MQTTErrorCode:
        if len(self._out_packet) > 1:
            self._coalesce_acks()
        return super().loop_write()

    def _coalesce_acks(self) -> None:
        """Join each run of queued acknowledgements into one packet, so they leave in one
        send(). paho's writer does nothing per acknowledgement once it is sent (it acts only on
        QoS 0 PUBLISH and DISCONNECT), so one entry carrying several is the same to it."""
        out = self._out_packet
        merged: list[Any] = []
        run: list[Any] = []
        for packet in out:
            if packet["pos"] == 0 and packet["command"] & 0xF0 in _ACKS:
                run.append(packet)
                continue
            _join(run, merged)
            merged.append(packet)
        _join(run, merged)
        if len(merged) < len(out):
            out.clear()
            out.extend(merged)

    def buffered(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        if sock is self._rsock and self._rpos < len(self._rdata):
            return True
        pending = getattr(sock, "pending", None)
        return bool(pending is not None and pending() > 0)


def _join(run: list[Any], into: list[Any]) -> None:
    if len(run) > 1:
        data = b"".join(bytes(p["packet"]) for p in run)
        into.append({**run[0], "packet": data, "to_process": len(data)})
    elif run:
        into.append(run[0])
    run.clear()


class Link:
    """One slot's MQTT session. Built once per worker; paho reconnects the same client."""

    def __init__(self, spec: SlotSpec, observer: LinkObserver) -> None:
        self.spec = spec
        self.observer = observer
        self.lock = threading.RLock()
        self.connected = False
        self.retiring = False  # leaving the group: UNSUBSCRIBE on every connect instead
        self.closing = False
        self.max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)
        # Why the link is not connected, with the broker's address, for the heartbeat (so
        # `routemqd status` and systemd's STATUS= can say why workers are not ready); "" when up.
        self.problem = ""
        self.serviced_at = time.monotonic()  # the socket thread's last pass over the socket
        self.guard_pings = 0
        self._guard_pinged_at = 0.0
        self.owner: int | None = None  # ident of the thread that reads the socket
        self.wake: Callable[[], None] = lambda: None  # set by the driver
        self.client = self._build(clean=False)

    # ------------------------------------------------------------------------ building

    def _build(self, clean: bool) -> BufferedClient:
        b = self.spec.broker
        v5 = b.protocol == 5
        client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.spec.client_id,
            clean_session=None if v5 else clean,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        if b.username is not None:
            client.username_pw_set(b.username, b.password.reveal() if b.password else None)
        if b.tls is not None:
            # loads the CA and client certificate files: ssl.SSLError / OSError for bad ones
            client.tls_set(
                ca_certs=b.tls.ca_file,
                certfile=b.tls.cert_file,
                keyfile=b.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if b.tls.insecure:
                client.tls_insecure_set(True)
        client.connect_timeout = b.connect_timeout
        if clean:
            return client
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = lambda _c, _u, raw: self.observer.on_message(raw)
        # With these hooks set paho never writes from inside publish()/ack(): it only asks.
        client.on_socket_register_write = lambda _c, _u, _s: self._want_write()
        client.on_socket_unregister_write = lambda _c, _u, _s: None
        return client

    def _connect_args(self) -> dict[str, Any]:
        b = self.spec.broker
        args: dict[str, Any] = {"host": b.host, "port": b.port, "keepalive": b.keepalive}
        if b.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry
            route = self.spec.route
            props.ReceiveMaximum = max(1, min(65535, route.concurrency + route.prefetch))
            args["clean_start"] = False  # paho's default cleans the first connect: never for us
            args["properties"] = props
        return args

    def connect(self) -> None:
        """First connect; ssl.SSLError for a failed handshake, OSError if unreachable (then the
        driver keeps trying)."""
        with self.lock:
            try:
                self.client.connect(**self._connect_args())
            except ssl.SSLError:
                raise
            except OSError as e:
                self._note_problem("unreachable", e)
                self.client.connect_async(**self._connect_args())
                raise

    def reconnect(self) -> None:
        with self.lock:
            try:
                self.client.reconnect()
            except OSError as e:
                self._note_problem("unreachable", e)
                raise

    def _note_problem(self, what: str, why: object) -> None:
        b = self.spec.broker
        problem = f"broker {b.host}:{b.port} {what}: {why}"
        if problem != self.problem:
            self.problem = problem
            self.observer.on_problem()

    # ----------------------------------------------------------------- socket primitives

    def on_socket_thread(self) -> bool:
        return threading.get_ident() == self.owner

    def _want_write(self) -> None:
        if not self.on_socket_thread():
            self.wake()

    def socket(self) -> Any:
        return self.client.socket()

    def want_write(self) -> bool:
        return self.client.want_write()

    def service(self, readable: bool) -> None:
        """One pass of the socket thread: read every packet in hand, write, check keepalive."""
        client = self.client
        with self.lock:
            if readable or client.buffered():
                held_since = 0.0
                while True:
                    if client.loop_read() or client._sock is None:
                        break
                    if not client.buffered():
                        break
                    # More packets in hand: hold the acknowledgements of the handlers that just
                    # returned a little, to send several in one write; never so many that the
                    # broker's window of unacknowledged messages runs dry.
                    if client.want_write():
                        now = time.monotonic()
                        held_since = held_since or now
                        if len(client._out_packet) >= ACK_BATCH or now - held_since >= ACK_HOLD:
                            client.loop_write()
                            held_since = 0.0
            if client._sock is not None and client.want_write():
                client.loop_write()
            if client._sock is not None:
                client.loop_misc()
            self.serviced_at = time.monotonic()

    def write(self) -> None:
        with self.lock:
            if self.client._sock is not None:
                self.client.loop_write()

    def misc(self) -> None:
        with self.lock:
            if self.client._sock is not None:
                self.client.loop_misc()
            self.serviced_at = time.monotonic()

    def is_open(self) -> bool:
        return self.client._sock is not None

    def run_unlocked(self, func: Callable[[Any], Any], arg: Any) -> BaseException | None:
        """Run an inline handler without the lock, so the keepalive guard may use the socket;
        returns what it raised (anything, even SystemExit: it belongs to the message). Plain
        release/acquire rather than a context manager: this runs once per message, and a
        generator-based ``with`` costs more than the rest of routemqd's per-message work."""
        lock = self.lock
        lock.release()
        try:
            func(arg)
        except BaseException as e:
            return e
        finally:
            lock.acquire()
            self.serviced_at = time.monotonic()
        return None

    def keep_alive_if_starved(self, now: float) -> bool:
        """Called by the worker's main thread. While a handler keeps the socket thread away from
        the socket for more than half the keepalive, send PINGREQ and flush what is queued, so
        the broker never times the client out (it allows 1.5 x keepalive of silence).

        Why this is safe: it runs only with ``self.lock``, which the socket thread holds whenever
        it is inside paho, so paho's state is touched by one thread at a time. The socket thread
        is then inside a handler, and paho's half-read state (``_in_packet``, the PUBLISH being
        handled) is left alone: the guard never reads. It writes through paho's own
        ``loop_write``, which resumes any partly written packet first, so the byte stream stays
        whole. The PINGRESP is read by the socket thread once the handler returns, before its
        next keepalive check (``service`` reads before ``loop_misc``)."""
        keepalive = self.spec.broker.keepalive
        limit = keepalive * GUARD_FRACTION
        if not self.connected or now - self.serviced_at < limit:
            return False
        if now - self._guard_pinged_at < limit:
            return False
        if not self.lock.acquire(blocking=False):
            return False  # the socket thread is in paho: it keeps the connection alive itself
        try:
            if self.client._sock is None or time.monotonic() - self.serviced_at < limit:
                return False
            self.client._send_pingreq()
            self.client.loop_write()
            self._guard_pinged_at = now
            self.guard_pings += 1
            return True
        finally:
            self.lock.release()

    # ------------------------------------------------------------------- MQTT commands

    def ack(self, mid: int, qos: int) -> None:
        with self.lock:
            self.client.ack(mid, qos)

    def subscribe(self) -> None:
        route = self.spec.route
        with self.lock:
            result, _mid = self.client.subscribe(route.subscription, qos=route.subscribe_qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise OSError(f"subscribe not sent: {result}")

    def unsubscribe(self) -> None:
        with self.lock:
            self.client.unsubscribe(self.spec.route.subscription)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        props: Mapping[str, Any] | None,
    ) -> Any:
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
        with self.lock:
            return self.client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )

    def close(self, end_session: bool) -> None:
        """Queue DISCONNECT (MQTT 5 ending the session when asked); the driver writes it."""
        with self.lock:
            self.closing = True
            if self.connected and end_session and self.spec.broker.protocol == 5:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
                self.client.disconnect(properties=props)
            else:
                self.client.disconnect()
        self.wake()

    def drop(self) -> None:
        """Close the socket without DISCONNECT (the driver is gone or never ran)."""
        with self.lock:
            self.closing = True
            with contextlib.suppress(OSError):
                self.client._sock_close()

    def end_session_311(self) -> str | None:
        """MQTT 3.1.1 cannot end a session at DISCONNECT: connect once with a clean session.
        Returns why it failed, or None."""
        b = self.spec.broker
        client = self._build(clean=True)
        try:
            client.connect(b.host, b.port, b.keepalive)
            client.loop(1.0)
            client.disconnect()
            client.loop(0.2)
        except OSError as e:
            return str(e)
        return None

    # -------------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: Any, _u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._note_problem("refused the connection", rc)
            self.observer.on_refused(str(rc), rc.value in AUTH_REASONS)
            return
        self.connected = True
        self.problem = ""
        self.max_packet = getattr(props, "MaximumPacketSize", None)
        self.observer.on_connected(bool(getattr(flags, "session_present", False)))
        if self.retiring:
            # Leaving: a restarted broker may have restored a plain subscription with the session,
            # so say UNSUBSCRIBE again on every connect instead of SUBSCRIBE.
            client.unsubscribe(self.spec.route.subscription)
            return
        # Subscribe on every connect: Mosquitto 2.0.11 forgets $share subscriptions over a
        # restart even when it says session_present, and a repeated SUBSCRIBE never doubles a share.
        route = self.spec.route
        result, _mid = client.subscribe(route.subscription, qos=route.subscribe_qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.observer.on_subscribed(f"subscribe not sent: {result}")

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
        failures = [rc for rc in rcs if rc.is_failure]
        self.observer.on_subscribed(str(failures[0]) if failures else None)

    def _on_unsubscribe(self, _c: Any, _u: Any, _mid: int, _rcs: Any, _p: Any) -> None:
        self.observer.on_unsubscribed()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _p: Any) -> None:
        was = self.connected
        self.connected = False
        if was:
            if not self.closing:
                self._note_problem("connection lost", rc)
            self.observer.on_disconnected(str(rc))


def published(info: Any) -> bool | None:
    """True once the broker acknowledged a publish, None while waiting, False if it never will
    be on this connection (paho raises for a publish made while disconnected)."""
    try:
        return True if info.is_published() else None
    except (RuntimeError, ValueError):
        return False
