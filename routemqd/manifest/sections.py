"""The manifest's top-level sections: broker (with TLS and the password's source), supervisor,
control, logging, metrics, group, host id and python path; and the walk that builds a Manifest."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import yaml

from routemqd.manifest.model import (
    DEFAULT_CONTROL_SOCKET,
    BrokerConfig,
    ControlConfig,
    LoggingConfig,
    Manifest,
    MetricsConfig,
    Secret,
    SupervisorConfig,
    TLSConfig,
)
from routemqd.manifest.nodes import Ctx, ManifestError, Map, plain, seq, setting, show
from routemqd.manifest.routes import read_route_settings, read_routes
from routemqd.manifest.values import (
    NAME_RE,
    as_bool,
    as_duration,
    as_group,
    as_opt_str,
    as_protocol,
    as_str,
    int_between,
    sanitize_id,
)


def build(ctx: Ctx, root: yaml.Node | None, world_readable: bool) -> Manifest:
    if root is None:
        raise ManifestError(ctx.path, None, "", "the manifest is empty; it needs at least routes:")
    top = Map(ctx, root, "")
    broker = _broker(ctx, top)
    group = setting(top, "group", "routemq", as_group)
    host_id = setting(top, "host_id", _default_host_id(), _host_id)
    python_path = _python_path(ctx, top)
    supervisor = _supervisor(ctx, top)
    control = _control(ctx, top)
    logging_cfg = _logging(ctx, top)
    metrics = _metrics(ctx, top)
    defaults = read_route_settings(ctx, top)
    routes_node = top.take("routes")
    for key in top.items:
        if key.startswith("x-"):
            top.take(key)  # extension fields: a place for YAML anchors, otherwise ignored
    top.finish()
    if routes_node is None:
        raise ctx.error(root, "routes", "missing: a manifest needs at least one route")
    routes = read_routes(ctx, routes_node, defaults, group)
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


def _default_host_id() -> str:
    return sanitize_id(socket.gethostname()) or "host"


def _host_id(ctx: Ctx, node: yaml.Node, fname: str) -> str:
    v = as_str(ctx, node, fname)
    if not NAME_RE.match(v):
        raise ctx.error(node, fname, f"use letters, digits, '_', '.', '-' (at most 64), got {v!r}")
    return v


def _resolve_path(ctx: Ctx, p: str) -> str:
    base = Path(ctx.path).parent if not ctx.path.startswith("<") else Path.cwd()
    return str((base / p).resolve()) if not os.path.isabs(p) else p


def _python_path(ctx: Ctx, top: Map) -> tuple[str, ...]:
    node = top.take("python_path")
    if node is None:
        return ()
    if isinstance(node, yaml.ScalarNode):
        return (_resolve_path(ctx, as_str(ctx, node, "python_path")),)
    return tuple(
        _resolve_path(ctx, as_str(ctx, item, f"python_path[{i}]"))
        for i, item in seq(ctx, node, "python_path")
    )


def _broker(ctx: Ctx, top: Map) -> BrokerConfig:
    node = top.take("broker")
    if node is None:
        return BrokerConfig()
    m = Map(ctx, node, "broker")
    d = BrokerConfig()
    host = setting(m, "host", d.host, as_str)
    port = setting(m, "port", d.port, int_between(1, 65535))
    protocol = setting(m, "protocol", d.protocol, as_protocol)
    keepalive = setting(m, "keepalive", d.keepalive, int_between(5, 65535))
    prefix = setting(m, "client_id_prefix", d.client_id_prefix, as_str)
    if not NAME_RE.match(prefix):
        raise ctx.error(
            m.node_of("client_id_prefix"),
            "broker.client_id_prefix",
            f"use letters, digits, '_', '.', '-' (at most 64), got {prefix!r}",
        )
    username = setting(m, "username", None, as_opt_str)
    password = _password(ctx, m)
    if password is not None and username is None:
        key = next(k for k in ("password", "password_file", "password_env") if m.has(k))
        raise ctx.error(m.node_of(key), f"broker.{key}", "a password needs broker.username too")
    tls = _tls(ctx, m)
    session_expiry = int(setting(m, "session_expiry", float(d.session_expiry), as_duration(0)))
    rmin = setting(m, "reconnect_min", d.reconnect_min, as_duration(0.01))
    rmax = setting(m, "reconnect_max", d.reconnect_max, as_duration(0.01))
    if rmax < rmin:
        raise ctx.error(
            m.node_of("reconnect_max") if m.has("reconnect_max") else m.node,
            "broker.reconnect_max",
            f"must be at least reconnect_min ({rmin:g}s)",
        )
    connect_timeout = setting(m, "connect_timeout", d.connect_timeout, as_duration(0.1))
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


def _password(ctx: Ctx, m: Map) -> Secret | None:
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
    value = as_str(ctx, node, f"broker.{key}")
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


def _tls(ctx: Ctx, m: Map) -> TLSConfig | None:
    node = m.take("tls")
    if node is None:
        return None
    if isinstance(node, yaml.ScalarNode):
        if as_bool(ctx, node, "broker.tls"):
            return TLSConfig()
        return None
    t = Map(ctx, node, "broker.tls")
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        v = setting(t, key, None, as_opt_str)
        if v is not None:
            v = _resolve_path(ctx, v)
            if not os.path.isfile(v):
                raise ctx.error(t.node_of(key), f"broker.tls.{key}", f"no such file: {v}")
        files[key] = v
    insecure = setting(t, "insecure", False, as_bool)
    t.finish()
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        raise ctx.error(t.node, f"broker.tls.{missing}", "cert_file and key_file go together")
    return TLSConfig(insecure=insecure, **files)


def _supervisor(ctx: Ctx, top: Map) -> SupervisorConfig:
    node = top.take("supervisor")
    d = SupervisorConfig()
    if node is None:
        return d
    m = Map(ctx, node, "supervisor")
    cfg = SupervisorConfig(
        graceful_timeout=setting(m, "graceful_timeout", d.graceful_timeout, as_duration(0.1)),
        health_interval=setting(m, "health_interval", d.health_interval, as_duration(0.05)),
        backoff_initial=setting(m, "backoff_initial", d.backoff_initial, as_duration(0.01)),
        backoff_max=setting(m, "backoff_max", d.backoff_max, as_duration(0.01)),
        healthy_after=setting(m, "healthy_after", d.healthy_after, as_duration(0)),
        failure_limit=setting(m, "failure_limit", d.failure_limit, int_between(1, 1000)),
        failure_window=setting(m, "failure_window", d.failure_window, as_duration(0.1)),
        failed_cooldown=setting(m, "failed_cooldown", d.failed_cooldown, as_duration(0.1)),
        recycle_min_lifetime=setting(
            m, "recycle_min_lifetime", d.recycle_min_lifetime, as_duration(0)
        ),
        ready_timeout=setting(m, "ready_timeout", d.ready_timeout, as_duration(0)),
        stop_mode=setting(m, "stop_mode", d.stop_mode, _stop_mode),
    )
    m.finish()
    return cfg


def _stop_mode(ctx: Ctx, node: yaml.Node, fname: str) -> str:
    v = as_str(ctx, node, fname)
    if v not in ("keep", "retire"):
        raise ctx.error(
            node,
            fname,
            f"expected keep (sessions wait for this host to come back) or retire (leave the "
            f"groups and end the sessions), got {v!r}",
        )
    return v


def _control(ctx: Ctx, top: Map) -> ControlConfig:
    node = top.take("control")
    if node is None:
        return ControlConfig()
    m = Map(ctx, node, "control")
    sock = setting(m, "socket", DEFAULT_CONTROL_SOCKET, as_str)
    mode_node = m.take("mode")
    mode = 0o600
    if mode_node is not None:
        raw = plain(ctx, mode_node, "control.mode")
        text = mode_node.value if isinstance(raw, int | str) and not isinstance(raw, bool) else ""
        if not re.fullmatch(r"0?o?[0-7]{3}", text):
            raise ctx.error(mode_node, "control.mode", f"expected 0600 or 0660, got {show(raw)}")
        mode = int(text.lstrip("0o") or "0", 8)
        if mode & 0o007:
            raise ctx.error(
                mode_node, "control.mode", "the control socket must not be world-accessible"
            )
    m.finish()
    return ControlConfig(
        socket=_resolve_path(ctx, sock), mode=mode, mode_given=mode_node is not None
    )


def _logging(ctx: Ctx, top: Map) -> LoggingConfig:
    node = top.take("logging")
    if node is None:
        return LoggingConfig()
    m = Map(ctx, node, "logging")
    level = setting(m, "level", "info", as_str).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ctx.error(
            m.node_of("level"), "logging.level", "expected debug, info, warning or error"
        )
    fmt = setting(m, "format", "auto", as_str).lower()
    if fmt not in ("auto", "json", "console"):
        raise ctx.error(m.node_of("format"), "logging.format", "expected auto, json or console")
    file = setting(m, "file", None, as_opt_str)
    m.finish()
    return LoggingConfig(level=level, format=fmt, file=_resolve_path(ctx, file) if file else None)


def _metrics(ctx: Ctx, top: Map) -> MetricsConfig | None:
    node = top.take("metrics")
    if node is None:
        return None
    m = Map(ctx, node, "metrics")
    listen_node = m.take("listen")
    m.finish()
    if listen_node is None:
        return None
    listen = as_str(ctx, listen_node, "metrics.listen")
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ctx.error(listen_node, "metrics.listen", f"expected host:port, got {listen!r}")
    return MetricsConfig(host=host.strip("[]") or "127.0.0.1", port=int(port_s))
