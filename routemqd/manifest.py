"""Load ``/etc/routemq.yaml`` into frozen dataclasses, or fail naming file:line and field.

The manifest is the only thing operators edit, usually in a hurry and over SSH, so every error must
point at the exact line and key. We therefore never use ``yaml.safe_load``: we compose the YAML into
nodes (which keep their positions) and build the dataclasses ourselves while walking them. Only the
safe node types are accepted (no ``!!python/...`` tags), the node walk is bounded (alias bombs), and
unknown keys are errors with a "did you mean" hint because a misspelt ``max_memroy`` silently
ignored is a limit that never applies.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from routemqd.topics import (
    TopicError,
    TopicPattern,
    compile_pattern,
    shared_filter,
    validate_group,
    validate_topic_name,
)
from routemqd.units import UnitError, parse_duration, parse_size

MAX_MANIFEST_BYTES = 1024 * 1024
MAX_NODES = 50_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HANDLER_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
DEFAULT_CONTROL_SOCKET = "/run/routemqd/control.sock"


class ManifestError(Exception):
    """One readable error: ``file:line: field: what is wrong``."""

    def __init__(self, path: str, line: int | None, field_name: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.field = field_name
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return (
            f"{where}: {self.field}: {self.problem}" if self.field else f"{where}: {self.problem}"
        )


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
    stop_mode: str = "keep"  # keep: sessions wait for this host to return; retire: end them


@dataclass(frozen=True)
class ControlConfig:
    socket: str = DEFAULT_CONTROL_SOCKET
    mode: int = 0o600


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
    line: int = field(default=0, compare=False)
    scaling: Scaling | None = None  # None: a fixed pool of ``workers``; else ``workers`` == min

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


# --------------------------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Manifest:
    """Read and validate a manifest file. Raises ManifestError, never anything else."""
    p = str(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(p, None, "", "not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                p, None, "", f"file is {st.st_size} bytes; a manifest may be at most 1 MiB"
            )
        with open(p, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except ManifestError:
        raise
    except OSError as e:
        raise ManifestError(p, None, "", f"cannot read: {e.strerror or e}") from None
    return loads(data, p, environ=environ, world_readable=_world_readable(p))


def _world_readable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def loads(
    data: bytes | str,
    path: str = "<manifest>",
    environ: dict[str, str] | None = None,
    world_readable: bool = False,
) -> Manifest:
    """Validate manifest text. ``path`` is only used in messages and to resolve relative paths."""
    env = dict(os.environ) if environ is None else environ
    if isinstance(data, bytes) and len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, None, "", "a manifest may be at most 1 MiB")
    try:
        root = _compose(data)
    except ManifestError as e:
        raise ManifestError(path, e.line, e.field, e.problem) from None
    ctx = _Ctx(path=path, env=env)
    try:
        return _build(ctx, root, world_readable)
    except RecursionError:
        raise ManifestError(path, None, "", "the document is nested too deeply") from None


class _BoundedLoader(yaml.SafeLoader):
    """Stops composing after MAX_NODES nodes. Counting only afterwards, while walking the tree,
    lets 1 MiB of tiny nodes (``[1,1,1,...]``) keep PyYAML busy for half a minute first: a
    master reloading such a file would stop supervising for that long."""

    def __init__(self, stream: bytes | str) -> None:
        super().__init__(stream)
        self.composed = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.composed += 1
        if self.composed > MAX_NODES:
            line = self.peek_event().start_mark.line + 1
            problem = f"more than {MAX_NODES} YAML nodes; a manifest is far smaller"
            raise ManifestError("", line, "", problem)
        return super().compose_node(parent, index)


def _compose(data: bytes | str) -> yaml.Node | None:
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(data)  # reads the first bytes: encoding errors start here
        root = loader.get_node() if loader.check_node() else None
        if loader.check_node():
            line = loader.get_node().start_mark.line + 1
            raise ManifestError("", line, "", "more than one YAML document; a manifest is one")
        return root
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = e.problem or e.context or "invalid YAML"
        raise ManifestError("", line, "", f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:  # reader errors: bad encoding, control characters
        text = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ManifestError("", None, "", f"not readable as YAML text: {text}") from None
    except RecursionError:
        raise ManifestError("", None, "", "the document is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


@dataclass
class _Ctx:
    path: str
    env: dict[str, str]
    visited: int = 0
    warnings: list[str] = field(default_factory=list)

    def error(self, node: yaml.Node | None, fname: str, problem: str) -> ManifestError:
        line = node.start_mark.line + 1 if node is not None else None
        return ManifestError(self.path, line, fname, problem)

    def count(self, node: yaml.Node) -> None:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise self.error(node, "", f"more than {MAX_NODES} YAML nodes (alias expansion?)")


_constructor = yaml.constructor.SafeConstructor()


def _plain(ctx: _Ctx, node: yaml.Node, fname: str) -> Any:
    """A scalar's Python value; refuses anything but the plain YAML scalar types."""
    ctx.count(node)
    if not isinstance(node, yaml.ScalarNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        raise ctx.error(node, fname, f"expected a single value, got {kind}")
    if node.tag not in _SAFE_TAGS:
        raise ctx.error(node, fname, f"the tag {node.tag!r} is not allowed in a manifest")
    try:
        return _constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        raise ctx.error(node, fname, f"invalid value: {e}") from None


class _Map:
    """A YAML mapping that keeps key positions; keys are consumed so leftovers are unknown."""

    def __init__(self, ctx: _Ctx, node: yaml.Node, fname: str) -> None:
        ctx.count(node)
        if not isinstance(node, yaml.MappingNode):
            raise ctx.error(node, fname or "manifest", f"expected a mapping, got {_kind(node)}")
        if node.tag not in ("tag:yaml.org,2002:map",):
            raise ctx.error(node, fname, f"the tag {node.tag!r} is not allowed in a manifest")
        if _merged_size(node, {}) > MAX_NODES:
            raise ctx.error(node, fname, f"more than {MAX_NODES} keys after merging (<< bomb?)")
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        try:
            _constructor.flatten_mapping(node)
        except yaml.YAMLError as e:
            raise ctx.error(node, fname, f"invalid merge: {e}") from None
        self.ctx = ctx
        self.node = node
        self.fname = fname
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = _plain(ctx, knode, fname)
            if not isinstance(key, str):
                raise ctx.error(knode, fname, f"keys must be text, got {key!r}")
            if key in self.items and id(self.items[key][0]) in own and id(knode) in own:
                first = self.items[key][0].start_mark.line + 1
                raise ctx.error(knode, self.sub(key), f"duplicate key (first set on line {first})")
            # merged keys come first: a later merge, or the mapping's own key, overrides them
            self.items[key] = (knode, vnode)
        self.used: set[str] = set()

    def sub(self, key: str) -> str:
        return f"{self.fname}.{key}" if self.fname else key

    def has(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> yaml.Node:
        return self.items[key][1]

    def take(self, key: str) -> yaml.Node | None:
        self.used.add(key)
        item = self.items.get(key)
        return item[1] if item else None

    def finish(self, allowed: set[str] | None = None) -> None:
        """Unknown keys are errors: a typo would otherwise silently keep the default."""
        names = allowed if allowed is not None else self.used
        for key, (knode, _) in self.items.items():
            if key not in names:
                near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                valid = ", ".join(sorted(names))
                raise self.ctx.error(
                    knode, self.sub(key), f"unknown key{hint} (valid keys: {valid})"
                )


def _merged_size(node: yaml.MappingNode, memo: dict[int, int]) -> int:
    """How many pairs ``flatten_mapping`` would produce, in linear time (merges nest and repeat)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_NODES + 1  # a merge that reaches itself
    total = 0
    for knode, vnode in node.value:
        if knode.tag != "tag:yaml.org,2002:merge":
            total += 1
            continue
        subs = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
        for sub in subs:
            if isinstance(sub, yaml.MappingNode):
                total += _merged_size(sub, memo)
        if total > MAX_NODES:
            break
    memo[id(node)] = total
    return total


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}" if isinstance(node, yaml.ScalarNode) else "something else"


T = TypeVar("T")


def _field(m: _Map, key: str, default: T, convert: Callable[[_Ctx, yaml.Node, str], T]) -> T:
    node = m.take(key)
    if node is None:
        return default
    return convert(m.ctx, node, m.sub(key))


def _as_str(ctx: _Ctx, node: yaml.Node, fname: str) -> str:
    v = _plain(ctx, node, fname)
    if not isinstance(v, str) or not v:
        raise ctx.error(node, fname, f"expected non-empty text, got {_show(v)}")
    if "\0" in v:
        raise ctx.error(node, fname, "must not contain a NUL character")
    return v


def _as_opt_str(ctx: _Ctx, node: yaml.Node, fname: str) -> str | None:
    v = _plain(ctx, node, fname)
    if v is None:
        return None
    return _as_str(ctx, node, fname)


def _as_bool(ctx: _Ctx, node: yaml.Node, fname: str) -> bool:
    v = _plain(ctx, node, fname)
    if not isinstance(v, bool):
        raise ctx.error(node, fname, f"expected true or false, got {_show(v)}")
    return v


def _int_between(lo: int, hi: int | None) -> Callable[[_Ctx, yaml.Node, str], int]:
    def convert(ctx: _Ctx, node: yaml.Node, fname: str) -> int:
        v = _plain(ctx, node, fname)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ctx.error(node, fname, f"expected a whole number, got {_show(v)}")
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ctx.error(node, fname, f"must be {rng}, got {v}")
        return v

    return convert


def _duration(lo: float = 0.0, allow_none: bool = False) -> Callable[..., Any]:
    def convert(ctx: _Ctx, node: yaml.Node, fname: str) -> float | None:
        v = _plain(ctx, node, fname)
        if v is None and allow_none:
            return None
        try:
            seconds = parse_duration(v)
        except UnitError as e:
            raise ctx.error(node, fname, str(e)) from None
        if seconds < lo:
            raise ctx.error(node, fname, f"must be at least {lo:g}s, got {v!r}")
        return seconds

    return convert


def _size_or_none(ctx: _Ctx, node: yaml.Node, fname: str) -> int | None:
    v = _plain(ctx, node, fname)
    if v is None:
        return None
    try:
        n = parse_size(v)
    except UnitError as e:
        raise ctx.error(node, fname, str(e)) from None
    if n < 1024 * 1024:
        raise ctx.error(node, fname, f"at least 1MiB makes sense for a worker, got {v!r}")
    return n


def _percent_or_none(ctx: _Ctx, node: yaml.Node, fname: str) -> float | None:
    v = _plain(ctx, node, fname)
    if v is None:
        return None
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            v = float(v.strip()[:-1])
        except ValueError:
            raise ctx.error(
                node, fname, f"expected a CPU percentage such as 90, got {v!r}"
            ) from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 100 * os.cpu_count():
        raise ctx.error(node, fname, f"expected a CPU percentage such as 90, got {_show(v)}")
    return float(v)


def _qos(ctx: _Ctx, node: yaml.Node, fname: str) -> int:
    return _int_between(0, 2)(ctx, node, fname)


def _protocol(ctx: _Ctx, node: yaml.Node, fname: str) -> int:
    v = _plain(ctx, node, fname)
    accepted = {5: 5, "5": 5, "5.0": 5, 4: 4, 311: 4, "3.1.1": 4, "311": 4, "4": 4}
    if isinstance(v, bool) or v not in accepted:
        raise ctx.error(node, fname, f"expected 5 (MQTT 5) or 3.1.1, got {_show(v)}")
    return accepted[v]


def _show(v: object) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    return f"{type(v).__name__} {v!r}"


def _seq(ctx: _Ctx, node: yaml.Node, fname: str) -> Iterator[tuple[int, yaml.Node]]:
    ctx.count(node)
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, fname, f"expected a list, got {_kind(node)}")
    if node.tag != "tag:yaml.org,2002:seq":
        raise ctx.error(node, fname, f"the tag {node.tag!r} is not allowed in a manifest")
    yield from enumerate(node.value)


# ------------------------------------------------------------------------------------- sections


def _build(ctx: _Ctx, root: yaml.Node | None, world_readable: bool) -> Manifest:
    if root is None:
        raise ManifestError(ctx.path, None, "", "the manifest is empty; it needs at least routes:")
    top = _Map(ctx, root, "")
    broker = _broker(ctx, top)
    group = _field(top, "group", "routemq", _group)
    host_id = _field(top, "host_id", _default_host_id(), _host_id)
    python_path = _python_path(ctx, top)
    supervisor = _supervisor(ctx, top)
    control = _control(ctx, top)
    logging_cfg = _logging(ctx, top)
    metrics = _metrics(ctx, top)
    defaults = _route_settings(ctx, top)
    routes_node = top.take("routes")
    for key in top.items:
        if key.startswith("x-"):
            top.take(key)  # extension fields: a place for YAML anchors, otherwise ignored
    top.finish()
    if routes_node is None:
        raise ctx.error(root, "routes", "missing: a manifest needs at least one route")
    routes = _routes(ctx, routes_node, defaults, group)
    if broker.password is not None and broker.password.source == "manifest" and world_readable:
        ctx.warnings.append(
            f"{ctx.path}: broker.password is set inline and the file is readable by every user; "
            "use password_file or password_env, or chmod o-r the manifest"
        )
    return Manifest(
        path=ctx.path,
        broker=broker,
        group=group,
        host_id=host_id,
        python_path=python_path,
        supervisor=supervisor,
        control=control,
        logging=logging_cfg,
        metrics=metrics,
        routes=routes,
        warnings=tuple(ctx.warnings),
    )


def _group(ctx: _Ctx, node: yaml.Node, fname: str) -> str:
    v = _as_str(ctx, node, fname)
    try:
        return validate_group(v)
    except TopicError as e:
        raise ctx.error(node, fname, str(e)) from None


def _default_host_id() -> str:
    return _sanitize_id(socket.gethostname()) or "host"


def _sanitize_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:64]


def _host_id(ctx: _Ctx, node: yaml.Node, fname: str) -> str:
    v = _as_str(ctx, node, fname)
    if not _NAME_RE.match(v):
        raise ctx.error(node, fname, f"use letters, digits, '_', '.', '-' (at most 64), got {v!r}")
    return v


def _resolve_path(ctx: _Ctx, p: str) -> str:
    base = Path(ctx.path).parent if not ctx.path.startswith("<") else Path.cwd()
    return str((base / p).resolve()) if not os.path.isabs(p) else p


def _python_path(ctx: _Ctx, top: _Map) -> tuple[str, ...]:
    node = top.take("python_path")
    if node is None:
        return ()
    if isinstance(node, yaml.ScalarNode):
        return (_resolve_path(ctx, _as_str(ctx, node, "python_path")),)
    return tuple(
        _resolve_path(ctx, _as_str(ctx, item, f"python_path[{i}]"))
        for i, item in _seq(ctx, node, "python_path")
    )


def _broker(ctx: _Ctx, top: _Map) -> BrokerConfig:
    node = top.take("broker")
    if node is None:
        return BrokerConfig()
    m = _Map(ctx, node, "broker")
    d = BrokerConfig()
    host = _field(m, "host", d.host, _as_str)
    port = _field(m, "port", d.port, _int_between(1, 65535))
    protocol = _field(m, "protocol", d.protocol, _protocol)
    keepalive = _field(m, "keepalive", d.keepalive, _int_between(5, 65535))
    prefix = _field(m, "client_id_prefix", d.client_id_prefix, _as_str)
    if not _NAME_RE.match(prefix):
        raise ctx.error(
            m.node_of("client_id_prefix"),
            "broker.client_id_prefix",
            f"use letters, digits, '_', '.', '-' (at most 64), got {prefix!r}",
        )
    username = _field(m, "username", None, _as_opt_str)
    password = _password(ctx, m)
    if password is not None and username is None:
        key = next(k for k in ("password", "password_file", "password_env") if m.has(k))
        raise ctx.error(m.node_of(key), f"broker.{key}", "a password needs broker.username too")
    tls = _tls(ctx, m)
    session_expiry = int(_field(m, "session_expiry", float(d.session_expiry), _duration(0)))
    rmin = _field(m, "reconnect_min", d.reconnect_min, _duration(0.01))
    rmax = _field(m, "reconnect_max", d.reconnect_max, _duration(0.01))
    if rmax < rmin:
        raise ctx.error(
            m.node_of("reconnect_max") if m.has("reconnect_max") else m.node,
            "broker.reconnect_max",
            f"must be at least reconnect_min ({rmin:g}s)",
        )
    connect_timeout = _field(m, "connect_timeout", d.connect_timeout, _duration(0.1))
    m.finish()
    return BrokerConfig(
        host=host,
        port=port,
        protocol=protocol,
        keepalive=keepalive,
        client_id_prefix=prefix,
        username=username,
        password=password,
        tls=tls,
        session_expiry=session_expiry,
        reconnect_min=rmin,
        reconnect_max=rmax,
        connect_timeout=connect_timeout,
    )


def _password(ctx: _Ctx, m: _Map) -> Secret | None:
    given = [k for k in ("password", "password_file", "password_env") if m.has(k)]
    for k in ("password", "password_file", "password_env"):
        m.take(k)
    if not given:
        return None
    if len(given) > 1:
        raise ctx.error(
            m.node_of(given[1]),
            f"broker.{given[1]}",
            f"set only one of password, password_file, password_env (also set: {given[0]})",
        )
    key = given[0]
    node = m.node_of(key)
    if key == "password" and not (
        isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str"
    ):
        # the usual "got int 12345" would print the password itself
        raise ctx.error(
            node, "broker.password", "expected text; put the password in quotes (value not shown)"
        )
    value = _as_str(ctx, node, f"broker.{key}")
    if key == "password":
        return Secret(value, "manifest")
    if key == "password_env":
        if value not in ctx.env:
            raise ctx.error(node, "broker.password_env", f"environment variable {value} is not set")
        return Secret(ctx.env[value], f"env:{value}")
    pw_path = _resolve_path(ctx, value)
    try:
        with open(pw_path, encoding="utf-8") as f:
            secret = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ctx.error(node, "broker.password_file", f"cannot read {pw_path}: {reason}") from None
    return Secret(secret, f"file:{pw_path}")


def _tls(ctx: _Ctx, m: _Map) -> TLSConfig | None:
    node = m.take("tls")
    if node is None:
        return None
    if isinstance(node, yaml.ScalarNode):
        if _as_bool(ctx, node, "broker.tls"):
            return TLSConfig()
        return None
    t = _Map(ctx, node, "broker.tls")
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        v = _field(t, key, None, _as_opt_str)
        if v is not None:
            v = _resolve_path(ctx, v)
            if not os.path.isfile(v):
                raise ctx.error(t.node_of(key), f"broker.tls.{key}", f"no such file: {v}")
        files[key] = v
    insecure = _field(t, "insecure", False, _as_bool)
    t.finish()
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        raise ctx.error(t.node, f"broker.tls.{missing}", "cert_file and key_file go together")
    return TLSConfig(insecure=insecure, **files)


def _supervisor(ctx: _Ctx, top: _Map) -> SupervisorConfig:
    node = top.take("supervisor")
    d = SupervisorConfig()
    if node is None:
        return d
    m = _Map(ctx, node, "supervisor")
    cfg = SupervisorConfig(
        graceful_timeout=_field(m, "graceful_timeout", d.graceful_timeout, _duration(0.1)),
        health_interval=_field(m, "health_interval", d.health_interval, _duration(0.05)),
        backoff_initial=_field(m, "backoff_initial", d.backoff_initial, _duration(0.01)),
        backoff_max=_field(m, "backoff_max", d.backoff_max, _duration(0.01)),
        healthy_after=_field(m, "healthy_after", d.healthy_after, _duration(0)),
        failure_limit=_field(m, "failure_limit", d.failure_limit, _int_between(1, 1000)),
        failure_window=_field(m, "failure_window", d.failure_window, _duration(0.1)),
        failed_cooldown=_field(m, "failed_cooldown", d.failed_cooldown, _duration(0.1)),
        recycle_min_lifetime=_field(
            m, "recycle_min_lifetime", d.recycle_min_lifetime, _duration(0)
        ),
        stop_mode=_field(m, "stop_mode", d.stop_mode, _stop_mode),
    )
    m.finish()
    return cfg


def _stop_mode(ctx: _Ctx, node: yaml.Node, fname: str) -> str:
    v = _as_str(ctx, node, fname)
    if v not in ("keep", "retire"):
        raise ctx.error(
            node,
            fname,
            f"expected keep (sessions wait for this host to come back) or retire (leave the "
            f"groups and end the sessions), got {v!r}",
        )
    return v


def _control(ctx: _Ctx, top: _Map) -> ControlConfig:
    node = top.take("control")
    if node is None:
        return ControlConfig()
    m = _Map(ctx, node, "control")
    sock = _field(m, "socket", DEFAULT_CONTROL_SOCKET, _as_str)
    mode_node = m.take("mode")
    mode = 0o600
    if mode_node is not None:
        raw = _plain(ctx, mode_node, "control.mode")
        text = mode_node.value if isinstance(raw, int | str) and not isinstance(raw, bool) else ""
        if not re.fullmatch(r"0?o?[0-7]{3}", text):
            raise ctx.error(mode_node, "control.mode", f"expected 0600 or 0660, got {_show(raw)}")
        mode = int(text.lstrip("0o") or "0", 8)
        if mode & 0o007:
            raise ctx.error(
                mode_node, "control.mode", "the control socket must not be world-accessible"
            )
    m.finish()
    return ControlConfig(socket=_resolve_path(ctx, sock), mode=mode)


def _logging(ctx: _Ctx, top: _Map) -> LoggingConfig:
    node = top.take("logging")
    if node is None:
        return LoggingConfig()
    m = _Map(ctx, node, "logging")
    level = _field(m, "level", "info", _as_str).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ctx.error(
            m.node_of("level"), "logging.level", "expected debug, info, warning or error"
        )
    fmt = _field(m, "format", "auto", _as_str).lower()
    if fmt not in ("auto", "json", "console"):
        raise ctx.error(m.node_of("format"), "logging.format", "expected auto, json or console")
    file = _field(m, "file", None, _as_opt_str)
    m.finish()
    return LoggingConfig(level=level, format=fmt, file=_resolve_path(ctx, file) if file else None)


def _metrics(ctx: _Ctx, top: _Map) -> MetricsConfig | None:
    node = top.take("metrics")
    if node is None:
        return None
    m = _Map(ctx, node, "metrics")
    listen_node = m.take("listen")
    m.finish()
    if listen_node is None:
        return None
    listen = _as_str(ctx, listen_node, "metrics.listen")
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ctx.error(listen_node, "metrics.listen", f"expected host:port, got {listen!r}")
    return MetricsConfig(host=host.strip("[]") or "127.0.0.1", port=int(port_s))


_SETTING_CONVERTERS: dict[str, Callable[[_Ctx, yaml.Node, str], Any]] = {
    "qos": _qos,
    "concurrency": _int_between(1, 1024),
    "prefetch": _int_between(0, 65000),
    "max_memory": _size_or_none,
    "max_cpu": _percent_or_none,
    "cpu_window": _duration(1),
    "heartbeat_timeout": _duration(1),
    "handler_timeout": _duration(0.01, allow_none=True),
    "dead_letter_topic": lambda ctx, n, f: _topic_name(ctx, n, f),
    "max_attempts": _int_between(1, 1000),
    "group": _group,
}


def _topic_name(ctx: _Ctx, node: yaml.Node, fname: str) -> str | None:
    v = _as_opt_str(ctx, node, fname)
    if v is None:
        return None
    try:
        return validate_topic_name(v)
    except TopicError as e:
        raise ctx.error(node, fname, str(e)) from None


def _route_settings(ctx: _Ctx, top: _Map) -> RouteSettings:
    node = top.take("defaults")
    if node is None:
        return RouteSettings()
    m = _Map(ctx, node, "defaults")
    values = _read_settings(m, RouteSettings())
    knobs = _scaling_knobs(m, RouteSettings().scaling)
    m.finish()
    return RouteSettings(**values, scaling=knobs)


def _read_settings(m: _Map, base: RouteSettings) -> dict[str, Any]:
    return {
        key: _field(m, key, getattr(base, key), conv) for key, conv in _SETTING_CONVERTERS.items()
    }


_ROUTE_KEYS = {"name", "topic", "handler", "shared", "workers", "worker_count", "scaling"}


def _routes(ctx: _Ctx, node: yaml.Node, defaults: RouteSettings, group: str) -> tuple[Route, ...]:
    routes: list[Route] = []
    seen: dict[str, int] = {}
    items = list(_seq(ctx, node, "routes"))
    if not items:
        raise ctx.error(node, "routes", "is empty: a manifest needs at least one route")
    for i, item in items:
        route = _route(ctx, item, f"routes[{i}]", defaults, group)
        if route.name in seen:
            raise ctx.error(
                item,
                f"routes[{i}].name",
                f"duplicate route name {route.name!r} (first used on line {seen[route.name]}); "
                "names identify routes across reloads and must be unique",
            )
        seen[route.name] = route.line
        routes.append(route)
    return tuple(routes)


def _route(ctx: _Ctx, node: yaml.Node, fname: str, defaults: RouteSettings, group: str) -> Route:
    m = _Map(ctx, node, fname)
    line = node.start_mark.line + 1
    topic_node = m.take("topic")
    if topic_node is None:
        raise ctx.error(node, f"{fname}.topic", "missing: every route needs a topic pattern")
    pattern_text = _as_str(ctx, topic_node, f"{fname}.topic")
    try:
        pattern = compile_pattern(pattern_text)
    except TopicError as e:
        raise ctx.error(topic_node, f"{fname}.topic", str(e)) from None
    handler_node = m.take("handler")
    if handler_node is None:
        raise ctx.error(node, f"{fname}.handler", "missing: every route needs a handler")
    handler = _as_str(ctx, handler_node, f"{fname}.handler")
    if not _HANDLER_RE.match(handler):
        raise ctx.error(
            handler_node,
            f"{fname}.handler",
            f"expected 'package.module:function', got {handler!r}",
        )
    name_node = m.take("name")
    if name_node is not None:
        name = _as_str(ctx, name_node, f"{fname}.name")
        if not _NAME_RE.match(name):
            raise ctx.error(
                name_node,
                f"{fname}.name",
                f"use letters, digits, '_', '.', '-' (at most 64, starting with a letter "
                f"or digit), got {name!r}",
            )
    else:
        name = pattern_text.replace("{", "").replace("}", "").replace("/", "-")
        name = name.replace("+", "any").replace("#", "all")
        name = _sanitize_id(name) or "route"
    shared = _field(m, "shared", False, _as_bool)
    workers_key = "workers"
    if m.has("workers") and m.has("worker_count"):
        raise ctx.error(
            m.node_of("worker_count"),
            f"{fname}.worker_count",
            "set either workers or worker_count, not both",
        )
    if m.has("worker_count"):
        workers_key = "worker_count"
    m.take("worker_count" if workers_key == "workers" else "workers")
    workers_node = m.take(workers_key)
    scaling: Scaling | None = None
    workers = 1
    if isinstance(workers_node, yaml.MappingNode):
        if not shared:
            raise ctx.error(
                workers_node,
                f"{fname}.{workers_key}",
                "a range needs 'shared: true'; a non-shared route is one ordered worker and "
                "cannot scale (a second plain subscriber would get every message again)",
            )
        lo, hi = _worker_range(ctx, workers_node, f"{fname}.{workers_key}")
        scaling = Scaling(min=lo, max=hi)
        workers = lo
    elif workers_node is not None:
        workers = _int_between(1, 1024)(ctx, workers_node, f"{fname}.{workers_key}")
    if workers > 1 and not shared:
        raise ctx.error(
            m.node_of(workers_key),
            f"{fname}.{workers_key}",
            f"{workers} workers need 'shared: true'; a non-shared route is one ordered worker "
            "(several plain subscribers would each get every message)",
        )
    knobs_node = m.node_of("scaling") if m.has("scaling") else None
    knobs = _scaling_knobs(m, defaults.scaling)
    if knobs_node is not None and scaling is None:
        raise ctx.error(
            knobs_node,
            f"{fname}.scaling",
            "applies only to an autoscaled pool; write workers: {min: N, max: M} "
            "(with shared: true) or remove scaling:",
        )
    if scaling is not None:
        scaling = Scaling(min=scaling.min, max=scaling.max, knobs=knobs)
    values = _read_settings(m, defaults)
    m.finish(_ROUTE_KEYS | set(_SETTING_CONVERTERS))
    if not shared and values["concurrency"] > 1:
        if m.has("concurrency"):
            raise ctx.error(
                m.node_of("concurrency"),
                f"{fname}.concurrency",
                "a non-shared route keeps message order, so it handles one message at a time; "
                "use shared: true for concurrency",
            )
        values["concurrency"] = 1  # a default meant for shared pools; order wins here
    route_group = values.pop("group") or group
    return Route(
        name=name,
        topic=pattern,
        handler=handler,
        shared=shared,
        workers=workers,
        group=route_group,
        line=line,
        scaling=scaling,
        **values,
    )


def _worker_range(ctx: _Ctx, node: yaml.Node, fname: str) -> tuple[int, int]:
    """``{min: 1, max: 8}``: both bounds required, so a forgotten ``max`` is not a silent cap."""
    r = _Map(ctx, node, fname)
    r.finish({"min", "max"})  # a typo (``maxx``) first: it explains the "missing" that follows
    bounds = {}
    for key in ("min", "max"):
        if not r.has(key):
            raise ctx.error(node, f"{fname}.{key}", "missing: a range needs both min and max")
        bounds[key] = _field(r, key, 1, _int_between(1, 1024))
    if bounds["max"] < bounds["min"]:
        raise ctx.error(r.node_of("max"), f"{fname}.max", f"must be at least min ({bounds['min']})")
    return bounds["min"], bounds["max"]


def _scaling_knobs(m: _Map, base: ScalingKnobs) -> ScalingKnobs:
    """``scaling:`` in ``defaults:`` or a route; a route's keys override the defaults one by one."""
    node = m.take("scaling")
    if node is None:
        return base
    fname = m.sub("scaling")
    k = _Map(m.ctx, node, fname)
    knobs = ScalingKnobs(
        up_after=_field(k, "up_after", base.up_after, _duration(0.1)),
        down_after=_field(k, "down_after", base.down_after, _duration(1)),
        busy_high=_field(k, "busy_high", base.busy_high, _fraction),
        busy_low=_field(k, "busy_low", base.busy_low, _fraction),
        host_cpu_max=_field(k, "host_cpu_max", base.host_cpu_max, _fraction),
    )
    k.finish()
    if knobs.busy_low >= knobs.busy_high:
        key = "busy_low" if k.has("busy_low") else "busy_high"
        raise m.ctx.error(
            k.node_of(key),
            f"{fname}.{key}",
            f"busy_low ({knobs.busy_low:.0%}) must be below busy_high ({knobs.busy_high:.0%}): "
            "the gap is what stops a step down from being undone by a step up",
        )
    return knobs


def _fraction(ctx: _Ctx, node: yaml.Node, fname: str) -> float:
    """A percentage, ``80`` or ``80%``, as a fraction. ``0.8`` is refused rather than guessed."""
    v = _plain(ctx, node, fname)
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            v = float(v.strip()[:-1])
        except ValueError:
            raise ctx.error(node, fname, f"expected a percentage such as 80%, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 100:
        raise ctx.error(
            node, fname, f"expected a percentage between 1 and 100 such as 80%, got {_show(v)}"
        )
    return float(v) / 100.0
