"""``routemqd check``: validate a manifest, import its handlers in a child, print the plan.

Like ``nginx -t``: operators run it before ``systemctl reload``. Handler imports happen in a
separate interpreter so the checker (and the daemon, which shares this code) never executes user
code in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TextIO

from routemqd.hooks import kind_problem
from routemqd.manifest import Manifest, Route, Scaling
from routemqd.plan import slots_for
from routemqd.topics import filters_overlap

PROBE_TIMEOUT = 60.0


@dataclass(frozen=True)
class HandlerReport:
    ref: str
    ok: bool
    error: str = ""
    is_async: bool = False
    checked: bool = True
    role: str = ""  # "" for a handler, else setup | teardown | middleware


def probe_key(role: str, ref: str) -> str:
    """How the child is asked about a callable, and how its answer is filed."""
    return f"{role}={ref}" if role else ref


def probe_handlers(manifest: Manifest, timeout: float = PROBE_TIMEOUT) -> dict[str, HandlerReport]:
    """Import every handler and hook in one child; reports keyed by :func:`probe_key`."""
    refs = sorted({r.handler for r in manifest.routes}) + sorted(
        {probe_key(role, hook.ref) for r in manifest.routes for role, hook in r.hooks}
    )
    env = dict(os.environ)
    env["ROUTEMQD_PYTHON_PATH"] = os.pathsep.join(manifest.python_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "routemqd.handlers", *refs],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        out = proc.stdout
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail = [f"importing handlers took longer than {timeout:g}s"]
    reports: dict[str, HandlerReport] = {}
    for line in out.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        role = item.get("role", "")
        reports[probe_key(role, item["ref"])] = HandlerReport(
            ref=item["ref"],
            ok=item["ok"],
            error=item.get("error", ""),
            is_async=item.get("async", False),
            role=role,
        )
    died = False
    for key in refs:
        if key in reports:
            continue
        role, _, ref = key.rpartition("=")
        if not died:  # the child died while importing this one (os._exit, segfault, hang)
            died = True
            why = tail[0] if tail else "the import process died"
            error = f"{role or 'handler'} {ref}: {why}"
            reports[key] = HandlerReport(ref=ref, ok=False, error=error, role=role)
        else:
            reports[key] = HandlerReport(ref=ref, ok=False, checked=False, role=role)
    return reports


def hook_errors(manifest: Manifest, reports: dict[str, HandlerReport]) -> list[str]:
    """One ``file:line: field: problem`` per unusable hook, including a kind that cannot work
    with the route's handler (judged only once the handler itself imported)."""
    errors: list[str] = []
    for route in manifest.routes:
        handler = reports.get(route.handler)
        for role, hook in route.hooks:
            rep = reports.get(probe_key(role, hook.ref))
            if rep is None:
                continue
            if not rep.ok:
                problem = rep.error if rep.checked else ""  # shown as "not checked" in the plan
            elif handler is not None and handler.ok:
                why = kind_problem(role, rep.is_async, handler.is_async)
                where = f" (route {route.name})" if hook.field.startswith("defaults") else ""
                problem = f"{role} {hook.ref}{where}: {why}" if why else ""
            else:
                problem = ""
            text = f"{manifest.path}:{hook.line}: {hook.field}: {problem}"
            if problem and text not in errors:  # a hook under defaults: serves many routes
                errors.append(text)
    return errors


def _hook_status(route: Route, reports: dict[str, HandlerReport]) -> list[str]:
    handler = reports.get(route.handler)
    lines = []
    for role, hook in route.hooks:
        rep = reports.get(probe_key(role, hook.ref))
        status = "ok" if rep is None or rep.ok else ("FAILED" if rep.checked else "not checked")
        if rep is not None and rep.ok and handler is not None and handler.ok:
            status = "FAILED" if kind_problem(role, rep.is_async, handler.is_async) else status
        kind = " (async)" if rep is not None and rep.is_async else ""
        lines.append(f"  {role:<11} {hook.ref}{kind}  [{status}]\n")
    return lines


def overlaps(manifest: Manifest) -> list[str]:
    out = []
    routes = manifest.routes
    for i, a in enumerate(routes):
        for b in routes[i + 1 :]:
            if filters_overlap(a.topic.filter, b.topic.filter):
                out.append(
                    f"routes {a.name!r} ({a.topic.filter}) and {b.name!r} ({b.topic.filter}) "
                    "overlap: a message on a topic both match reaches both pools"
                )
    return out


def render_plan(manifest: Manifest, handlers: dict[str, HandlerReport], out: TextIO) -> None:
    b = manifest.broker
    proto = "MQTT 5" if b.protocol == 5 else "MQTT 3.1.1"
    auth = f"user {b.username}" if b.username else "anonymous"
    if b.password is not None:
        auth += f", password from {b.password.source.split(':')[0]}"
    tls = "tls" if b.tls else "no tls"
    slots = slots_for(manifest)
    w = out.write
    w(f"manifest  {manifest.path}\n")
    w(
        f"broker    {b.host}:{b.port} ({proto}, keepalive {b.keepalive}s, {auth}, {tls}, "
        f"session expiry {b.session_expiry}s)\n"
    )
    w(f"host id   {manifest.host_id}\n")
    w(f"routes    {len(manifest.routes)}, slots {len(slots)}\n")
    for r in manifest.routes:
        rep = handlers.get(r.handler)
        status = "ok" if rep is None or rep.ok else ("FAILED" if rep.checked else "not checked")
        kind = " (async)" if rep is not None and rep.is_async else ""
        w(f"\nroute {r.name}  (line {r.line})\n")
        w(f"  topic       {r.topic.pattern}\n")
        w(f"  handler     {r.handler}{kind}  [{status}]\n")
        for line in _hook_status(r, handlers):
            w(line)
        w(f"  pool        {describe_pool(r)}\n")
        if r.scaling is not None:
            w(f"  scaling     {describe_scaling(r.scaling)}\n")
        qos = f"{r.qos} (subscribed as 1)" if r.qos != r.subscribe_qos else str(r.qos)
        w(f"  subscribes  {r.subscription}  qos {qos}\n")
        w(
            f"  options     concurrency {r.concurrency}, prefetch {r.prefetch}, "
            f"heartbeat_timeout {r.heartbeat_timeout:g}s"
            + (f", dead letters -> {r.dead_letter_topic}" if r.dead_letter_topic else "")
            + "\n"
        )
        for (name, index), spec in slots.items():
            if name == r.name:
                w(f"  slot {index:<3}    {spec.client_id}\n")
        if r.scaling is not None and r.max_workers > r.min_workers:
            hi = r.max_workers - 1
            more = f"{r.min_workers}" if hi == r.min_workers else f"{r.min_workers}-{hi}"
            w(f"  slot {more:<3}    added by the scaler under load, retired when it falls\n")


def describe_pool(r: Route) -> str:
    if not r.shared:
        return "single ordered worker"
    if r.scaling is None:
        return f"shared x{r.workers}, group {r.group}"
    s = r.scaling
    return f"shared, autoscaled {s.min}..{s.max} workers (starts with {s.min}), group {r.group}"


def describe_scaling(s: Scaling) -> str:
    k = s.knobs
    return (
        f"up after {k.up_after:g}s at busy >= {k.busy_high:.0%} "
        f"(host cpu below {k.host_cpu_max:.0%}), down after {k.down_after:g}s "
        f"if busy over one fewer < {k.busy_low:.0%}"
    )


def run_check(manifest: Manifest, out: TextIO, err: TextIO) -> int:
    handlers = probe_handlers(manifest)
    render_plan(manifest, handlers, out)
    warnings = list(manifest.warnings) + overlaps(manifest)
    for r in manifest.routes:
        if r.qos == 2:
            warnings.append(
                f"route {r.name!r}: qos 2 is subscribed as qos 1 so a message stays with the "
                "broker until its handler finished (at-least-once; handlers see dup redeliveries)"
            )
    if warnings:
        out.write("\nwarnings:\n")
        for text in warnings:
            out.write(f"  - {text}\n")
    failed = [h for h in handlers.values() if not h.ok and not h.role]
    for h in failed:
        if h.checked:  # the unchecked ones show as "not checked" in the plan
            err.write(f"routemqd: {h.error}\n")
    bad_hooks = hook_errors(manifest, handlers)
    for text in bad_hooks:
        err.write(f"routemqd: {text}\n")
    if failed or bad_hooks or any(not h.ok for h in handlers.values()):
        return 78
    out.write("\nmanifest ok\n")
    return 0
