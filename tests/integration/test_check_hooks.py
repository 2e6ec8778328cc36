"""``routemqd check`` on hooks and middleware: imported and inspected in the child, never called,
and every unusable one reported at file:line with its field."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_check import run_check, write_manifest, write_module

MODULE = """\
import os, pathlib

MARK = pathlib.Path(__file__).with_name("called")

def _called(what):
    MARK.write_text(what)

def handle(message):
    pass

async def ahandle(message):
    pass

def setup(ctx):
    _called("setup")
    os._exit(9)

def teardown(ctx):
    _called("teardown")

async def asetup(ctx):
    _called("asetup")

def mw(message, call_next):
    _called("mw")
    return call_next(message)

async def amw(message, call_next):
    return await call_next(message)

def teardown_two_args(ctx, extra):
    pass

NOT_CALLABLE = 3
"""


def test_good_hooks_pass_and_are_never_called(tmp_path: Path) -> None:
    write_module(tmp_path, "rmq_ok_hooks", MODULE)
    path = write_manifest(
        tmp_path,
        """\
          - topic: a/b
            handler: rmq_ok_hooks:handle
            setup: rmq_ok_hooks:setup
            teardown: rmq_ok_hooks:teardown
            middleware: [rmq_ok_hooks:mw]
          - topic: a/c
            handler: rmq_ok_hooks:ahandle
            setup: rmq_ok_hooks:asetup
            teardown: rmq_ok_hooks:teardown
            middleware: [rmq_ok_hooks:amw]
        """,
    )
    proc = run_check(path)
    assert proc.returncode == 0, proc.stderr
    assert "  setup       rmq_ok_hooks:setup  [ok]" in proc.stdout
    assert "  setup       rmq_ok_hooks:asetup (async)  [ok]" in proc.stdout
    assert "  middleware  rmq_ok_hooks:amw (async)  [ok]" in proc.stdout
    assert not (tmp_path / "called").exists()


def test_bad_hooks_are_reported_at_file_line_and_field(tmp_path: Path) -> None:
    write_module(tmp_path, "rmq_bad_hooks", MODULE)
    path = write_manifest(
        tmp_path,
        """\
          - topic: a/b
            handler: rmq_bad_hooks:handle
            setup: rmq_bad_hooks:asetup
            teardown: rmq_bad_hooks:teardown_two_args
          - topic: a/c
            handler: rmq_bad_hooks:ahandle
            middleware:
              - rmq_bad_hooks:mw
              - rmq_bad_hooks:NOT_CALLABLE
              - rmq_missing_module:mw
        """,
    )
    proc = run_check(path)
    assert proc.returncode == 78
    errors = proc.stderr.splitlines()
    assert errors == [
        f"routemqd: {path}:5: routes[0].setup: setup rmq_bad_hooks:asetup: an async setup runs "
        "on the handler's event loop, and a plain-function handler has none; make the setup a "
        "plain function",
        f"routemqd: {path}:6: routes[0].teardown: teardown rmq_bad_hooks:teardown_two_args: "
        "must accept exactly one argument (the worker context)",
        f"routemqd: {path}:10: routes[1].middleware[0]: middleware rmq_bad_hooks:mw: the handler "
        "is async, so middleware must be 'async def' and 'await call_next(message)'",
        f"routemqd: {path}:11: routes[1].middleware[1]: middleware rmq_bad_hooks:NOT_CALLABLE: "
        "int is not callable",
        f"routemqd: {path}:12: routes[1].middleware[2]: middleware rmq_missing_module:mw: "
        "importing rmq_missing_module failed: ModuleNotFoundError: No module named "
        "'rmq_missing_module'",
    ]
    assert "[FAILED]" in proc.stdout
    assert "manifest ok" not in proc.stdout
    assert not (tmp_path / "called").exists()


def test_defaults_middleware_names_the_route_it_cannot_serve(tmp_path: Path) -> None:
    write_module(tmp_path, "rmq_dflt_hooks", MODULE)
    path = tmp_path / "routemq.yaml"
    path.write_text(
        f"python_path: [{tmp_path}]\n"
        "defaults:\n  middleware: [rmq_dflt_hooks:mw]\n"
        "routes:\n"
        "  - {name: plain, topic: a/b, handler: rmq_dflt_hooks:handle}\n"
        "  - {name: coro, topic: a/c, handler: rmq_dflt_hooks:ahandle}\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    proc = run_check(path)
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [
        f"routemqd: {path}:3: defaults.middleware[0]: middleware rmq_dflt_hooks:mw (route coro): "
        "the handler is async, so middleware must be 'async def' and 'await call_next(message)'"
    ]
