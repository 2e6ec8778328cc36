"""Route topic patterns, MQTT subscription filters and the rules that relate them.

Patterns come from user-written manifests, so this module works on split levels and plain
string comparison only. No regular expression is ever built from pattern text: that keeps
'.', '$', '(', '*' and '\\' ordinary characters and rules out regex injection by design
rather than by escaping.

The matching rules follow MQTT 3.1.1 / 5.0 section 4.7 exactly, because a route that the
daemon believes matches a topic the broker would not deliver (or the reverse) is a silent
message-loss bug.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

__all__ = [
    "MAX_TOPIC_BYTES",
    "TopicError",
    "TopicPattern",
    "compile_pattern",
    "filter_matches",
    "filters_overlap",
    "shared_filter",
    "validate_group",
    "validate_topic_name",
]

MAX_TOPIC_BYTES = 65535
"""MQTT encodes strings with a 16-bit length prefix, so nothing longer can be sent."""

_SHARED_PREFIXES = ("$share/", "$queue/")
_NAME_START = frozenset(string.ascii_letters + "_")
_NAME_CHARS = _NAME_START | frozenset(string.digits)


class TopicError(ValueError):
    """Raised for an invalid pattern/filter/group; the message says what is wrong in plain words,
    e.g. "'#' must be the last level" — without any file/line (the manifest loader adds those)."""


def _utf8_size(text: str) -> int | None:
    """Byte length on the wire, or None when the text cannot be sent as UTF-8 at all.

    The ASCII shortcut matters because this runs for every received message.
    """
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _string_problem(text: str, what: str) -> str | None:
    """Why `text` cannot be an MQTT UTF-8 string used as a topic or filter, if it cannot."""
    if not text:
        return f"{what} is empty"
    if "\0" in text:
        return f"{what} {text!r} contains a NUL character"
    size = _utf8_size(text)
    if size is None:
        return f"{what} {text!r} is not valid UTF-8 (it contains a lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"{what} is {size} bytes in UTF-8; MQTT allows at most {MAX_TOPIC_BYTES}"
    return None


def _topic_problem(topic: str) -> str | None:
    problem = _string_problem(topic, "topic name")
    if problem is not None:
        return problem
    if "+" in topic or "#" in topic:
        return (
            f"topic name {topic!r} contains a wildcard ('+' or '#'); "
            f"a topic to publish to must be literal"
        )
    return None


@dataclass(frozen=True)
class _Filter:
    """A validated filter split once, so matching a received topic never re-parses it.

    `levels` excludes a trailing '#'; `multi` records whether it was there. Keeping the '#'
    out of `levels` makes "matches its parent level" fall out of a plain length comparison.
    """

    levels: tuple[str, ...]
    multi: bool

    @property
    def wild_first(self) -> bool:
        """Whether the first level is a wildcard, which hides '$' topics (MQTT-4.7.2-1)."""
        return not self.levels or self.levels[0] == "+"

    def split_if_matches(self, topic: str) -> list[str] | None:
        """The topic's levels when it matches, so callers can read params without re-splitting.

        A string that is not a valid topic name matches nothing: a broker never delivers one,
        and raising here would crash a worker on the hot path over a value it cannot fix.
        """
        if _topic_problem(topic) is not None:
            return None
        if self.wild_first and topic.startswith("$"):
            return None
        parts = topic.split("/")
        count = len(self.levels)
        if len(parts) < count or (len(parts) > count and not self.multi):
            return None
        for want, got in zip(self.levels, parts, strict=False):
            if want != "+" and want != got:
                return None
        return parts


def _reject_shared_prefix(text: str, what: str, hint: str) -> None:
    for prefix in _SHARED_PREFIXES:
        if text.startswith(prefix):
            raise TopicError(f"{what} {text!r} must not start with {prefix!r}; {hint}")


def _check_wildcards(levels: list[str], what: str, text: str) -> None:
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "#":
            if index != last:
                raise TopicError(f"'#' must be the last level in {what} {text!r}")
        elif level != "+":
            if "#" in level:
                raise TopicError(
                    f"'#' must be a whole level in {what} {text!r} (found level {level!r})"
                )
            if "+" in level:
                raise TopicError(
                    f"'+' must be a whole level in {what} {text!r} (found level {level!r})"
                )


def _parse_filter(text: str) -> _Filter:
    problem = _string_problem(text, "filter")
    if problem is not None:
        raise TopicError(problem)
    _reject_shared_prefix(
        text,
        "filter",
        "shared-subscription syntax is not a topic filter; pass the filter after the group",
    )
    levels = text.split("/")
    _check_wildcards(levels, "filter", text)
    if levels[-1] == "#":
        return _Filter(tuple(levels[:-1]), multi=True)
    return _Filter(tuple(levels), multi=False)


def _param_name(level: str, pattern: str) -> str | None:
    """The param name if `level` is a `{name}` level, None if it has no braces at all.

    Any other use of braces is an error rather than a literal, because a stray brace in a
    manifest is far more likely a typo than a real topic character.
    """
    if "{" not in level and "}" not in level:
        return None
    depth = 0
    for char in level:
        if char == "{":
            depth += 1
            if depth > 1:
                raise TopicError(f"nested '{{' in level {level!r} of pattern {pattern!r}")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise TopicError(
                    f"unbalanced braces: '}}' without a matching '{{' in level {level!r} "
                    f"of pattern {pattern!r}"
                )
    if depth != 0:
        raise TopicError(
            f"unbalanced braces: '{{' without a matching '}}' in level {level!r} "
            f"of pattern {pattern!r}"
        )
    if not (level.startswith("{") and level.endswith("}")) or level.count("{") != 1:
        raise TopicError(
            f"a param must be a whole level: {level!r} in pattern {pattern!r} "
            f"mixes a param with other text"
        )
    name = level[1:-1]
    if not name:
        raise TopicError(f"empty param name '{{}}' in pattern {pattern!r}")
    if name[0] not in _NAME_START or any(char not in _NAME_CHARS for char in name):
        raise TopicError(
            f"invalid param name {name!r} in pattern {pattern!r}: "
            f"use ASCII letters, digits and '_', not starting with a digit"
        )
    return name


@dataclass(frozen=True)
class _Compiled:
    filter: str
    params: tuple[str, ...]
    parsed: _Filter
    captures: tuple[tuple[int, str], ...]


def _compile(pattern: str) -> _Compiled:
    problem = _string_problem(pattern, "pattern")
    if problem is not None:
        raise TopicError(problem)
    _reject_shared_prefix(
        pattern,
        "pattern",
        "set `shared: true` and `group: <name>` on the route instead",
    )
    levels = pattern.split("/")
    filter_levels: list[str] = []
    captures: list[tuple[int, str]] = []
    seen: set[str] = set()
    for index, level in enumerate(levels):
        name = _param_name(level, pattern)
        if name is None:
            filter_levels.append(level)
            continue
        if name in seen:
            raise TopicError(f"param {{{name}}} appears more than once in pattern {pattern!r}")
        seen.add(name)
        captures.append((index, name))
        filter_levels.append("+")
    _check_wildcards(levels, "pattern", pattern)
    text = "/".join(filter_levels)
    problem = _string_problem(text, "filter")
    if problem is not None:
        raise TopicError(f"pattern {pattern!r} compiles to an invalid filter: {problem}")
    return _Compiled(
        filter=text,
        params=tuple(name for _, name in captures),
        parsed=_parse_filter(text),
        captures=tuple(captures),
    )


@dataclass(frozen=True)
class TopicPattern:
    """A route's topic pattern together with the filter the broker is subscribed with.

    Build it with `compile_pattern`; constructing it directly re-derives and cross-checks
    everything from `pattern`, so an instance can never hold a filter that disagrees with
    the params it reports.
    """

    pattern: str
    filter: str
    params: tuple[str, ...]
    _parsed: _Filter = field(init=False, repr=False, compare=False)
    _captures: tuple[tuple[int, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = _compile(self.pattern)
        if compiled.filter != self.filter or compiled.params != self.params:
            raise TopicError(
                f"filter {self.filter!r} / params {self.params!r} do not agree with pattern "
                f"{self.pattern!r}; build it with compile_pattern()"
            )
        object.__setattr__(self, "_parsed", compiled.parsed)
        object.__setattr__(self, "_captures", compiled.captures)

    def match(self, topic: str) -> dict[str, str] | None:
        """Params of a received topic, or None when the broker filter would not match it.

        Anonymous '+' and '#' levels yield no params: only names the user chose are exposed,
        so handlers never depend on positional leftovers.
        """
        parts = self._parsed.split_if_matches(topic)
        if parts is None:
            return None
        return {name: parts[index] for index, name in self._captures}

    def matches(self, topic: str) -> bool:
        return self._parsed.split_if_matches(topic) is not None


def compile_pattern(pattern: str) -> TopicPattern:
    """Validate a manifest pattern and turn it into a subscription filter plus matcher."""
    compiled = _compile(pattern)
    return TopicPattern(pattern=pattern, filter=compiled.filter, params=compiled.params)


def filter_matches(filter: str, topic: str) -> bool:
    """MQTT filter matching, for callers that hold a filter rather than a route pattern.

    An invalid filter raises TopicError (it is a configuration bug); an invalid topic name
    simply does not match, exactly like `TopicPattern.match`.
    """
    return _parse_filter(filter).split_if_matches(topic) is not None


def validate_group(group: str) -> str:
    """Check a shared-subscription group name; the broker would reject a bad one only at
    SUBSCRIBE time, long after the manifest was accepted."""
    if not group:
        raise TopicError("shared-subscription group name is empty")
    for char, label in (("/", "'/'"), ("+", "'+'"), ("#", "'#'"), ("\0", "a NUL character")):
        if char in group:
            raise TopicError(f"shared-subscription group name {group!r} must not contain {label}")
    size = _utf8_size(group)
    if size is None:
        raise TopicError(f"shared-subscription group name {group!r} is not valid UTF-8")
    return group


def shared_filter(group: str, filter: str) -> str:
    """The `$share/<group>/<filter>` form, built in one place so both parts are always checked."""
    validate_group(group)
    _parse_filter(filter)
    text = f"$share/{group}/{filter}"
    size = _utf8_size(text)
    if size is not None and size > MAX_TOPIC_BYTES:
        raise TopicError(
            f"shared filter for group {group!r} is {size} bytes in UTF-8; "
            f"MQTT allows at most {MAX_TOPIC_BYTES}"
        )
    return text


def _overlap_witness(a: _Filter, b: _Filter) -> str | None:
    """The shortest valid topic name matching both filters, or None if there is none.

    Constructing the witness (instead of reasoning about the filters abstractly) makes every
    MQTT rule count: '$' topics, '#' matching its parent, the empty topic being invalid and
    the 65535-byte limit all apply to the one concrete topic.
    """
    if a.multi and b.multi:
        count = max(len(a.levels), len(b.levels))
    elif a.multi or b.multi:
        closed, other = (b, a) if a.multi else (a, b)
        count = len(closed.levels)
        if count < len(other.levels):
            return None
    else:
        if len(a.levels) != len(b.levels):
            return None
        count = len(a.levels)

    levels: list[str] = []
    free_first = True
    for index in range(count):
        wanted = {
            f.levels[index] for f in (a, b) if index < len(f.levels) and f.levels[index] != "+"
        }
        if len(wanted) > 1:
            return None
        if index == 0:
            free_first = not wanted
        levels.append(wanted.pop() if wanted else "")

    if levels in ([], [""]):
        # The empty string is not a valid topic name, so give it a non-empty first level
        # or, when the first level is pinned to "", a second (empty) level.
        if free_first:
            levels = ["x"]
        elif a.multi and b.multi:
            levels = ["", ""]
        else:
            return None
    if (a.wild_first or b.wild_first) and levels[0].startswith("$"):
        return None
    topic = "/".join(levels)
    size = _utf8_size(topic)
    if size is None or size > MAX_TOPIC_BYTES:
        return None
    return topic


def filters_overlap(a: str, b: str) -> bool:
    """Whether one published message could be delivered to both filters.

    Used to warn about routes that would double-handle a message, so a false "no" is the
    costly mistake; the answer is exact, not a conservative approximation.
    """
    return _overlap_witness(_parse_filter(a), _parse_filter(b)) is not None


def validate_topic_name(topic: str) -> str:
    """Check a topic the daemon will publish to, e.g. a dead-letter topic, at load time
    rather than when the first failed message needs it."""
    problem = _topic_problem(topic)
    if problem is not None:
        raise TopicError(problem)
    return topic
