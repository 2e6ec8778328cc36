"""The manifest's ``setup``, ``teardown``, ``middleware`` and their timeouts: inheritance from
``defaults:``, errors at file:line and field, and what a change of them does on reload."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from routemqd.manifest import HookRef, ManifestError, loads
from routemqd.plan import diff, slots_for

PATH = "/etc/routemq.yaml"


def load(text: str) -> Any:
    return loads(textwrap.dedent(text), PATH, environ={})


def test_route_without_hooks_has_none() -> None:
    r = load("routes:\n  - topic: a/b\n    handler: m:f\n").routes[0]
    assert (r.setup, r.teardown, r.middleware, r.hooks) == (None, None, (), ())
    assert (r.setup_timeout, r.teardown_timeout) == (30.0, 10.0)


def test_hooks_are_inherited_overridden_and_switched_off() -> None:
    m = load(
        """\
        defaults:
          setup: app.db:open
          teardown: app.db:close
          middleware: [app.mw:timing, app.mw:tenant]
          setup_timeout: 5s
        routes:
          - name: inherits
            topic: a/b
            handler: app.h:f
          - name: overrides
            topic: a/c
            handler: app.h:f
            setup: app.other:open
            middleware: [app.mw:audit]
            teardown_timeout: 2s
          - name: switched-off
            topic: a/d
            handler: app.h:f
            setup: null
            teardown: null
            middleware: []
        """
    )
    inherits, overrides, off = m.routes
    assert inherits.setup == HookRef("app.db:open")
    assert inherits.setup.line == 2 and inherits.setup.field == "defaults.setup"
    assert [h.ref for h in inherits.middleware] == ["app.mw:timing", "app.mw:tenant"]
    assert inherits.middleware[1].field == "defaults.middleware[1]"
    assert inherits.setup_timeout == 5.0
    assert overrides.setup is not None and overrides.setup.field == "routes[1].setup"
    assert overrides.setup.line == 13
    assert overrides.teardown == HookRef("app.db:close")
    assert [h.ref for h in overrides.middleware] == ["app.mw:audit"]
    assert overrides.middleware[0].line == 14
    assert overrides.teardown_timeout == 2.0
    assert (off.setup, off.teardown, off.middleware) == (None, None, ())
    assert [role for role, _ in inherits.hooks] == ["setup", "teardown", "middleware", "middleware"]


def test_hook_ref_compares_by_reference_only() -> None:
    assert HookRef("a:b", 3, "routes[0].setup") == HookRef("a:b", 9, "defaults.setup")
    assert HookRef("a:b") != HookRef("a:c")
    assert str(HookRef("a:b", 3)) == "a:b"


R = "routes:\n  - topic: a/b\n    handler: m:f\n"


@pytest.mark.parametrize(
    ("text", "line", "field", "phrase"),
    [
        (R + "    setup: not-a-ref\n", 4, "routes[0].setup", "expected 'package.module:function'"),
        (R + "    teardown: 12\n", 4, "routes[0].teardown", "expected non-empty text"),
        (R + "    middleware: m:g\n", 4, "routes[0].middleware", "expected a list"),
        (
            R + "    middleware:\n      - m:g\n      - nope\n",
            6,
            "routes[0].middleware[1]",
            "expected 'package.module:function'",
        ),
        (
            R + "    middleware:\n      - m:g\n      - m:h\n      - m:g\n",
            7,
            "routes[0].middleware[2]",
            "m:g is already in the chain (line 5)",
        ),
        ("defaults:\n  setup: [m:g]\n" + R, 2, "defaults.setup", "expected a single value"),
        ("defaults:\n  middleware: [m]\n" + R, 2, "defaults.middleware[0]", "package.module"),
        (R + "    setup_timeout: soon\n", 4, "routes[0].setup_timeout", "expected a duration"),
        (R + "    teardown_timeout: 0\n", 4, "routes[0].teardown_timeout", "at least 0.1s"),
        (R + "    setupp: m:g\n", 4, "routes[0].setupp", "did you mean 'setup'"),
        ("defaults:\n  midleware: [m:g]\n" + R, 2, "defaults.midleware", "'middleware'"),
    ],
)
def test_bad_hooks_name_file_line_and_field(text: str, line: int, field: str, phrase: str) -> None:
    with pytest.raises(ManifestError) as info:
        loads(text, PATH, environ={})
    msg = str(info.value)
    assert msg.startswith(f"{PATH}:{line}: {field}: "), msg
    assert phrase in msg


# ------------------------------------------------------------------------------ reload diff


def manifest(**route_keys: Any) -> Any:
    route = {"name": "s", "topic": "s/{id}", "handler": "app:h", "shared": True, "workers": 2}
    route.update(route_keys)
    doc = {"host_id": "h", "routes": [route]}
    return loads(yaml.safe_dump(doc), PATH, environ={})


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"setup": "app:open"}),
        ({"setup": "app:open"}, {"setup": "app:open_v2"}),
        ({"teardown": "app:close"}, {}),
        ({}, {"middleware": ["app:mw"]}),
        ({"middleware": ["app:a", "app:b"]}, {"middleware": ["app:b", "app:a"]}),
        ({}, {"setup_timeout": "5s"}),
    ],
    ids=["add-setup", "change-setup", "drop-teardown", "add-mw", "reorder-mw", "setup-timeout"],
)
def test_hook_changes_replace_the_pool_keeping_its_sessions(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    old, new = slots_for(manifest(**before)), slots_for(manifest(**after))
    changes = diff(old, new)
    assert {c.action for c in changes} == {"replace-session"}
    assert all(old[c.key].client_id == new[c.key].client_id for c in changes)


def test_moving_a_hook_to_defaults_keeps_the_pool() -> None:
    route = {"name": "s", "topic": "s/x", "handler": "app:h"}
    own = loads(
        yaml.safe_dump({"routes": [{**route, "setup": "app:open", "middleware": ["app:mw"]}]}),
        PATH,
        environ={},
    )
    shared = loads(
        yaml.safe_dump(
            {"defaults": {"setup": "app:open", "middleware": ["app:mw"]}, "routes": [route]}
        ),
        PATH,
        environ={},
    )
    assert {c.action for c in diff(slots_for(own), slots_for(shared))} == {"keep"}
