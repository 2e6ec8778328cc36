"""Hostile manifests cost bounded work: what ``tests/unit/test_manifest.py`` does not cover yet.

The master loads the manifest in its only loop (start, every reload), so a manifest must never
keep it busy for long. The bounds are asserted as work done (YAML nodes composed), never as
time, so the tests mean the same on a loaded machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemqd.manifest import MAX_MANIFEST_BYTES, MAX_NODES, Manifest, ManifestError, load, loads

R = "routes:\n  - topic: a/b\n    handler: m:f\n"
BUDGET = MAX_MANIFEST_BYTES - 200  # leave room for R and the wrapping


@pytest.fixture
def composed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the YAML nodes PyYAML composes while the test runs."""
    count = [0]
    original = yaml.composer.Composer.compose_node

    def counting(self: Any, parent: Any, index: Any) -> Any:
        count[0] += 1
        return original(self, parent, index)

    monkeypatch.setattr(yaml.composer.Composer, "compose_node", counting)
    yield count


def _flow_list() -> str:
    return "python_path: [" + "1," * (BUDGET // 2) + "1]\n" + R


def _extension_map() -> str:
    """Block style, in an ``x-`` field the manifest otherwise ignores."""
    lines, size, i = [], 0, 0
    while size < BUDGET - 20:
        line = f"  k{i}: 1\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "x-big:\n" + "".join(lines) + R


@pytest.mark.parametrize(
    "make",
    [_flow_list, _extension_map],
    ids=["flow-list", "extension-map"],
)
def test_a_megabyte_of_tiny_nodes_stops_at_the_node_limit(make: Any, composed: list[int]) -> None:
    doc = make()
    assert MAX_MANIFEST_BYTES - 1000 < len(doc.encode()) <= MAX_MANIFEST_BYTES
    with pytest.raises(ManifestError, match=f"more than {MAX_NODES} YAML nodes") as info:
        loads(doc, "big.yaml", environ={})
    assert composed[0] <= MAX_NODES + 1
    if make is _extension_map:  # the error names the line where the limit was crossed
        assert info.value.line is not None
        assert MAX_NODES // 2 - 10 < info.value.line < MAX_NODES // 2 + 10


def test_many_documents_stop_at_the_second(composed: list[int]) -> None:
    doc = R + "---\n" * (BUDGET // 4)
    with pytest.raises(ManifestError, match="more than one YAML document") as info:
        loads(doc, "docs.yaml", environ={})
    assert info.value.line == 5
    assert composed[0] < 20


def test_a_normal_large_manifest_is_still_fine() -> None:
    routes = "".join(
        f"  - name: r{i}\n    topic: t{i}/{{x}}\n    handler: m:f\n    qos: 0\n"
        for i in range(1000)
    )
    m = loads("routes:\n" + routes, "many.yaml", environ={})
    assert len(m.routes) == 1000


@pytest.mark.parametrize(
    "doc",
    [
        "routes: &r [*r]\n",
        "python_path: &p [*p]\n" + R,
        "broker: &b {host: *b}\n" + R,
        "defaults: &d {<<: [*d]}\n" + R,
        "x-loop: &l [*l]\nroutes: *l\n",
        "routes:\n  - &m {topic: a/b, handler: 'm:f', <<: *m}\n",
    ],
    ids=["routes", "python-path", "broker", "merge-list", "extension", "route-merges-itself"],
)
def test_self_referencing_aliases_are_manifest_errors(doc: str) -> None:
    with pytest.raises(ManifestError):
        loads(doc, "loop.yaml", environ={})


def test_deep_nesting_inside_an_ignored_extension_field() -> None:
    with pytest.raises(ManifestError, match="nested too deeply"):
        loads("x-deep: " + "[" * 20_000 + "]" * 20_000 + "\n" + R, "deep.yaml", environ={})


HACK = '!!python/object/apply:os.system ["touch {marker}"]'


@pytest.mark.parametrize(
    "template",
    [
        "x-evil: {hack}\n" + R,
        "x-evil: [{hack}]\n" + R,
        "? {hack}\n: 1\n" + R,
        "<<: {hack}\n" + R,
        "routes:\n  - topic: a/b\n    handler: m:f\n    <<: {hack}\n",
        "broker: !!python/object:routemqd.manifest.BrokerConfig {{host: x}}\n" + R,
    ],
    ids=["extension", "extension-list", "key", "top-merge", "route-merge", "object-tag"],
)
def test_python_tags_anywhere_are_never_executed(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "hacked"
    doc = template.format(hack=HACK.format(marker=marker))
    try:
        result = loads(doc, str(tmp_path / "m.yaml"), environ={})
    except ManifestError:
        pass
    else:
        assert isinstance(result, Manifest)  # an ignored x- field is never constructed
    assert not marker.exists()


def _only_manifest_errors(data: bytes) -> None:
    try:
        result = loads(data, "<bytes>", environ={})
    except ManifestError as e:
        assert str(e).startswith("<bytes>")
        return
    assert isinstance(result, Manifest)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_manifest_error(data: bytes) -> None:
    _only_manifest_errors(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"]),
    st.text(max_size=40),
)
def test_manifests_in_other_encodings_only_raise_manifest_error(encoding: str, text: str) -> None:
    doc = f"group: g\n# {text}\n" + R
    try:
        data = doc.encode(encoding)
    except UnicodeEncodeError:
        data = doc.encode(encoding, errors="replace")
    _only_manifest_errors(data)


def test_a_manifest_file_at_the_size_limit_loads(tmp_path: Path) -> None:
    path = tmp_path / "limit.yaml"
    path.write_bytes(R.encode() + b"# " + b"x" * (MAX_MANIFEST_BYTES - len(R) - 3) + b"\n")
    assert path.stat().st_size == MAX_MANIFEST_BYTES
    assert load(path, environ={}).routes[0].topic.filter == "a/b"
