"""Routes: ``defaults:`` and each route's settings, the pool's size (a number or a range with
its ``scaling:`` knobs), topic, handler and group."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from routemqd.manifest.model import HookRef, Route, RouteSettings, Scaling, ScalingKnobs
from routemqd.manifest.nodes import Ctx, ManifestError, Map, plain, seq, setting
from routemqd.manifest.values import (
    NAME_RE,
    as_bool,
    as_duration,
    as_fraction,
    as_group,
    as_opt_str,
    as_percent_or_none,
    as_qos,
    as_size_or_none,
    as_str,
    int_between,
    sanitize_id,
)
from routemqd.topics import (
    TopicError,
    compile_pattern,
    validate_topic_name,
)

_HANDLER_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


_SETTING_CONVERTERS: dict[str, Callable[[Ctx, yaml.Node, str], Any]] = {
    "qos": as_qos,
    "concurrency": int_between(1, 1024),
    "prefetch": int_between(0, 65000),
    "max_memory": as_size_or_none,
    "max_cpu": as_percent_or_none,
    "cpu_window": as_duration(1),
    "heartbeat_timeout": as_duration(1),
    "handler_timeout": as_duration(0.01, allow_none=True),
    "dead_letter_topic": lambda ctx, n, f: _topic_name(ctx, n, f),
    "max_attempts": int_between(1, 1000),
    "group": as_group,
    "setup": lambda ctx, n, f: _opt_hook(ctx, n, f),
    "teardown": lambda ctx, n, f: _opt_hook(ctx, n, f),
    "middleware": lambda ctx, n, f: _middleware(ctx, n, f),
    "setup_timeout": as_duration(0.1),
    "teardown_timeout": as_duration(0.1),
}


def _callable_ref(ctx: Ctx, node: yaml.Node, fname: str) -> str:
    ref = as_str(ctx, node, fname)
    if not _HANDLER_RE.match(ref):
        raise ctx.error(node, fname, f"expected 'package.module:function', got {ref!r}")
    return ref


def _hook(ctx: Ctx, node: yaml.Node, fname: str) -> HookRef:
    return HookRef(_callable_ref(ctx, node, fname), node.start_mark.line + 1, fname)


def _opt_hook(ctx: Ctx, node: yaml.Node, fname: str) -> HookRef | None:
    """``null`` on a route switches off a hook set under ``defaults:``."""
    return None if plain(ctx, node, fname) is None else _hook(ctx, node, fname)


def _middleware(ctx: Ctx, node: yaml.Node, fname: str) -> tuple[HookRef, ...]:
    """A route's list replaces the one under ``defaults:`` (``[]`` switches it off)."""
    if isinstance(node, yaml.ScalarNode) and plain(ctx, node, fname) is None:
        return ()
    chain = tuple(_hook(ctx, item, f"{fname}[{i}]") for i, item in seq(ctx, node, fname))
    seen: dict[str, int] = {}
    for item in chain:
        if item.ref in seen:
            problem = f"{item.ref} is already in the chain (line {seen[item.ref]})"
            raise ManifestError(ctx.path, item.line, item.field, problem)
        seen[item.ref] = item.line
    return chain


def _topic_name(ctx: Ctx, node: yaml.Node, fname: str) -> str | None:
    v = as_opt_str(ctx, node, fname)
    if v is None:
        return None
    try:
        return validate_topic_name(v)
    except TopicError as e:
        raise ctx.error(node, fname, str(e)) from None


def read_route_settings(ctx: Ctx, top: Map) -> RouteSettings:
    node = top.take("defaults")
    if node is None:
        return RouteSettings()
    m = Map(ctx, node, "defaults")
    values = _read_settings(m, RouteSettings())
    knobs = _scaling_knobs(m, RouteSettings().scaling)
    m.finish()
    return RouteSettings(**values, scaling=knobs)


def _read_settings(m: Map, base: RouteSettings) -> dict[str, Any]:
    return {
        key: setting(m, key, getattr(base, key), conv) for key, conv in _SETTING_CONVERTERS.items()
    }


_ROUTE_KEYS = {"name", "topic", "handler", "shared", "workers", "worker_count", "scaling"}


def read_routes(
    ctx: Ctx, node: yaml.Node, defaults: RouteSettings, group: str
) -> tuple[Route, ...]:
    routes: list[Route] = []
    seen: dict[str, int] = {}
    items = list(seq(ctx, node, "routes"))
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


def _route(ctx: Ctx, node: yaml.Node, fname: str, defaults: RouteSettings, group: str) -> Route:
    m = Map(ctx, node, fname)
    line = node.start_mark.line + 1
    topic_node = m.take("topic")
    if topic_node is None:
        raise ctx.error(node, f"{fname}.topic", "missing: every route needs a topic pattern")
    pattern_text = as_str(ctx, topic_node, f"{fname}.topic")
    try:
        pattern = compile_pattern(pattern_text)
    except TopicError as e:
        raise ctx.error(topic_node, f"{fname}.topic", str(e)) from None
    handler_node = m.take("handler")
    if handler_node is None:
        raise ctx.error(node, f"{fname}.handler", "missing: every route needs a handler")
    handler = _callable_ref(ctx, handler_node, f"{fname}.handler")
    name_node = m.take("name")
    if name_node is not None:
        name = as_str(ctx, name_node, f"{fname}.name")
        if not NAME_RE.match(name):
            raise ctx.error(
                name_node,
                f"{fname}.name",
                f"use letters, digits, '_', '.', '-' (at most 64, starting with a letter "
                f"or digit), got {name!r}",
            )
    else:
        name = pattern_text.replace("{", "").replace("}", "").replace("/", "-")
        name = name.replace("+", "any").replace("#", "all")
        name = sanitize_id(name) or "route"
    shared = setting(m, "shared", False, as_bool)
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
        workers = int_between(1, 1024)(ctx, workers_node, f"{fname}.{workers_key}")
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


def _worker_range(ctx: Ctx, node: yaml.Node, fname: str) -> tuple[int, int]:
    """``{min: 1, max: 8}``: both bounds required, so a forgotten ``max`` is not a silent cap."""
    r = Map(ctx, node, fname)
    r.finish({"min", "max"})  # a typo (``maxx``) first: it explains the "missing" that follows
    bounds = {}
    for key in ("min", "max"):
        if not r.has(key):
            raise ctx.error(node, f"{fname}.{key}", "missing: a range needs both min and max")
        bounds[key] = setting(r, key, 1, int_between(1, 1024))
    if bounds["max"] < bounds["min"]:
        raise ctx.error(r.node_of("max"), f"{fname}.max", f"must be at least min ({bounds['min']})")
    return bounds["min"], bounds["max"]


def _scaling_knobs(m: Map, base: ScalingKnobs) -> ScalingKnobs:
    """``scaling:`` in ``defaults:`` or a route; a route's keys override the defaults one by one."""
    node = m.take("scaling")
    if node is None:
        return base
    fname = m.sub("scaling")
    k = Map(m.ctx, node, fname)
    knobs = ScalingKnobs(
        up_after=setting(k, "up_after", base.up_after, as_duration(0.1)),
        down_after=setting(k, "down_after", base.down_after, as_duration(1)),
        busy_high=setting(k, "busy_high", base.busy_high, as_fraction),
        busy_low=setting(k, "busy_low", base.busy_low, as_fraction),
        host_cpu_max=setting(k, "host_cpu_max", base.host_cpu_max, as_fraction),
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
