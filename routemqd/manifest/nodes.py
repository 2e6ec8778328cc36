"""The YAML node reader: compose YAML into nodes that keep their line, and walk them safely.

We never use ``yaml.safe_load``: nodes keep positions, so every error names file:line and field.
Only the plain scalar tags are accepted (no ``!!python/...``), composing and walking are bounded
(alias and merge bombs), and a mapping's keys are consumed as they are read, so what is left over
is an unknown key, reported with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

MAX_NODES = 50_000


_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


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


class BoundedLoader(yaml.SafeLoader):
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


def compose(data: bytes | str) -> yaml.Node | None:
    loader: BoundedLoader | None = None
    try:
        loader = BoundedLoader(data)  # reads the first bytes: encoding errors start here
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
class Ctx:
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


def plain(ctx: Ctx, node: yaml.Node, fname: str) -> Any:
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


class Map:
    """A YAML mapping that keeps key positions; keys are consumed so leftovers are unknown."""

    def __init__(self, ctx: Ctx, node: yaml.Node, fname: str) -> None:
        ctx.count(node)
        if not isinstance(node, yaml.MappingNode):
            raise ctx.error(node, fname or "manifest", f"expected a mapping, got {kind(node)}")
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
            key = plain(ctx, knode, fname)
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


def kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}" if isinstance(node, yaml.ScalarNode) else "something else"


T = TypeVar("T")


def setting(m: Map, key: str, default: T, convert: Callable[[Ctx, yaml.Node, str], T]) -> T:
    node = m.take(key)
    if node is None:
        return default
    return convert(m.ctx, node, m.sub(key))


def show(v: object) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    return f"{type(v).__name__} {v!r}"


def seq(ctx: Ctx, node: yaml.Node, fname: str) -> Iterator[tuple[int, yaml.Node]]:
    ctx.count(node)
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, fname, f"expected a list, got {kind(node)}")
    if node.tag != "tag:yaml.org,2002:seq":
        raise ctx.error(node, fname, f"the tag {node.tag!r} is not allowed in a manifest")
    yield from enumerate(node.value)
