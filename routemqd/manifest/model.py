"""What a manifest is: frozen dataclasses, the defaults every setting falls back to, the limits.

Everything else in the daemon reads these; only :mod:`routemqd.manifest.sections` and
:mod:`routemqd.manifest.routes` build them, from the YAML nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routemqd.topics import (
    TopicPattern,
    shared_filter,
)

MAX_MANIFEST_BYTES = 1024 * 1024


DEFAULT_CONTROL_SOCKET = "/run/routemqd/control.sock"


@dataclass(frozen=True)
class Secret:
    """A password that prints as ``<hidden>`` wherever it ends up (logs, reprs, tracebacks)."""

    value: str = field(repr=False)
    source: str = "manifest"

    def reveal(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Secret(<hidden>, source={self.source})"

    __str__ = __repr__


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: int = 5  # 5 = MQTT 5, 4 = MQTT 3.1.1
    keepalive: int = 30
    client_id_prefix: str = "routemq"
    username: str | None = None
    password: Secret | None = None
    tls: TLSConfig | None = None
    session_expiry: int = 3600
    reconnect_min: float = 0.5
    reconnect_max: float = 5.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class SupervisorConfig:
    graceful_timeout: float = 30.0
    health_interval: float = 2.0
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    healthy_after: float = 10.0
    failure_limit: int = 5
    failure_window: float = 60.0
    failed_cooldown: float = 60.0
    recycle_min_lifetime: float = 30.0
    ready_timeout: float = 30.0  # READY=1 to systemd after this even if workers are not up
    stop_mode: str = "keep"  # keep: sessions wait for this host to return; retire: end them


@dataclass(frozen=True)
class ControlConfig:
    socket: str = DEFAULT_CONTROL_SOCKET
    mode: int = 0o600
    # False when the manifest leaves control.mode out: the socket then opens to the daemon's
    # group if its directory is closed to everyone else (see control.socket_mode).
    mode_given: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | console
    file: str | None = None


@dataclass(frozen=True)
class HookRef:
    """A ``package.module:function`` named by a ``setup``, ``teardown`` or ``middleware`` key.

    It compares by ``ref`` alone: moving a line in the manifest changes no worker, changing the
    function replaces the pool. ``line`` and ``field`` let ``check`` point at the exact entry."""

    ref: str
    line: int = field(default=0, compare=False)
    field: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.ref


@dataclass(frozen=True)
class ScalingKnobs:
    """How an autoscaled pool reacts (``scaling:`` under ``defaults:`` or a route).

    Up is fast and down is slow on purpose: a pool that falls behind queues messages in the
    broker (memory, latency), while a pool one worker too big for a minute costs almost nothing.
    ``busy_low`` below ``busy_high`` is the hysteresis that keeps a step down from undoing itself.
    """

    up_after: float = 5.0  # saturation must last this long before one more worker
    down_after: float = (
        60.0  # low load this long (and this long since the last step) before one fewer
    )
    busy_high: float = 0.8  # a worker at or above this fraction of its time is saturated
    busy_low: float = 0.5  # one fewer only if the pool's load over n-1 workers stays below this
    host_cpu_max: float = 0.85  # no step up while the host's CPU over all cores is above this


@dataclass(frozen=True)
class Scaling:
    """A pool that follows the load between ``min`` and ``max`` workers: ``workers: {min, max}``."""

    min: int
    max: int
    knobs: ScalingKnobs = ScalingKnobs()


@dataclass(frozen=True)
class RouteSettings:
    """What ``defaults:`` may set and each route may override."""

    qos: int = 1
    concurrency: int = 1
    prefetch: int = 16
    max_memory: int | None = 512 * 1024 * 1024
    max_cpu: float | None = None
    cpu_window: float = 30.0
    heartbeat_timeout: float = 60.0
    handler_timeout: float | None = None
    dead_letter_topic: str | None = None
    max_attempts: int = 5
    group: str | None = None
    setup: HookRef | None = None
    teardown: HookRef | None = None
    middleware: tuple[HookRef, ...] = ()
    setup_timeout: float = 30.0
    teardown_timeout: float = 10.0
    scaling: ScalingKnobs = ScalingKnobs()


@dataclass(frozen=True)
class Route:
    name: str
    topic: TopicPattern
    handler: str
    shared: bool
    workers: int
    group: str
    qos: int
    concurrency: int
    prefetch: int
    max_memory: int | None
    max_cpu: float | None
    cpu_window: float
    heartbeat_timeout: float
    handler_timeout: float | None
    dead_letter_topic: str | None
    max_attempts: int
    setup: HookRef | None = None
    teardown: HookRef | None = None
    middleware: tuple[HookRef, ...] = ()  # outermost first
    setup_timeout: float = 30.0
    teardown_timeout: float = 10.0
    line: int = field(default=0, compare=False)
    scaling: Scaling | None = None  # None: a fixed pool of ``workers``; else ``workers`` == min

    @property
    def hooks(self) -> tuple[tuple[str, HookRef], ...]:
        """Every hook with its role (``setup``, ``teardown``, ``middleware``), in manifest order."""
        out: list[tuple[str, HookRef]] = []
        if self.setup is not None:
            out.append(("setup", self.setup))
        if self.teardown is not None:
            out.append(("teardown", self.teardown))
        out.extend(("middleware", m) for m in self.middleware)
        return tuple(out)

    @property
    def autoscaled(self) -> bool:
        return self.scaling is not None

    @property
    def min_workers(self) -> int:
        return self.scaling.min if self.scaling is not None else self.workers

    @property
    def max_workers(self) -> int:
        return self.scaling.max if self.scaling is not None else self.workers

    @property
    def subscription(self) -> str:
        """The filter the broker sees: shared routes let the broker balance across the pool."""
        return shared_filter(self.group, self.topic.filter) if self.shared else self.topic.filter

    @property
    def subscribe_qos(self) -> int:
        """QoS 2 is subscribed as QoS 1: see the README (a QoS 2 message is handed over at PUBREC,
        before the handler runs, so only QoS 1 keeps it in the broker until the handler is done)."""
        return min(self.qos, 1)


@dataclass(frozen=True)
class Manifest:
    path: str
    broker: BrokerConfig
    group: str
    host_id: str
    python_path: tuple[str, ...]
    supervisor: SupervisorConfig
    control: ControlConfig
    logging: LoggingConfig
    metrics: MetricsConfig | None
    routes: tuple[Route, ...]
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, so log redaction can scrub them wherever they would leak."""
        pw = self.broker.password
        return (pw.reveal(),) if pw is not None and pw.reveal() else ()
