"""Tests for routemqd.topics: every MQTT rule and manifest error, plus property tests
against an independent, deliberately naive reference matcher."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routemqd.topics import (
    TopicError,
    TopicPattern,
    compile_pattern,
    filter_matches,
    filters_overlap,
    shared_filter,
    validate_group,
    validate_topic_name,
)

# --------------------------------------------------------------------------------------------
# Reference model: straightforward recursion over levels, written from the MQTT spec text.
# --------------------------------------------------------------------------------------------


def ref_valid_topic(topic: str) -> bool:
    return (
        topic != ""
        and "+" not in topic
        and "#" not in topic
        and "\0" not in topic
        and len(topic.encode("utf-8")) <= 65535
    )


def _ref_levels(filter_levels: list[str], topic_levels: list[str]) -> bool:
    if not filter_levels:
        return not topic_levels
    head = filter_levels[0]
    if head == "#":
        return True
    if not topic_levels:
        return False
    if head in ("+", topic_levels[0]):
        return _ref_levels(filter_levels[1:], topic_levels[1:])
    return False


def ref_matches(filter: str, topic: str) -> bool:
    if not ref_valid_topic(topic):
        return False
    levels = filter.split("/")
    if levels[0] in ("+", "#") and topic.startswith("$"):
        return False
    return _ref_levels(levels, topic.split("/"))


def ref_witness(a: str, b: str) -> str | None:
    """Search for a topic matching both filters.

    At each level the only candidates are the literals the filters pin there, or "x" when
    neither pins one: any topic matching both can be rewritten into that shape, so the
    search is complete for the short filters generated here.
    """
    a_levels, b_levels = a.split("/"), b.split("/")
    longest = max(len(a_levels), len(b_levels)) + 1
    for count in range(1, longest + 1):
        choices: list[list[str]] = []
        for index in range(count):
            pinned = {
                levels[index]
                for levels in (a_levels, b_levels)
                if index < len(levels) and levels[index] not in ("+", "#")
            }
            choices.append(sorted(pinned) or ["x"])
        for combo in itertools.product(*choices):
            topic = "/".join(combo)
            if ref_matches(a, topic) and ref_matches(b, topic):
                return topic
    return None


# --------------------------------------------------------------------------------------------
# Example tests: patterns and params
# --------------------------------------------------------------------------------------------


def test_compile_basic_pattern() -> None:
    compiled = compile_pattern("sensors/{device_id}/data")
    assert compiled.pattern == "sensors/{device_id}/data"
    assert compiled.filter == "sensors/+/data"
    assert compiled.params == ("device_id",)
    assert compiled.match("sensors/abc/data") == {"device_id": "abc"}
    assert compiled.matches("sensors/abc/data")
    assert compiled.match("sensors/abc/other") is None
    assert not compiled.matches("sensors/abc")


def test_params_in_order_and_anonymous_wildcards_give_no_params() -> None:
    compiled = compile_pattern("site/{site}/+/{device}/#")
    assert compiled.filter == "site/+/+/+/#"
    assert compiled.params == ("site", "device")
    assert compiled.match("site/s1/zone/d7/x/y") == {"site": "s1", "device": "d7"}
    assert compiled.match("site/s1/zone/d7") == {"site": "s1", "device": "d7"}


def test_pattern_without_params_matches_with_empty_dict() -> None:
    compiled = compile_pattern("a/b")
    assert compiled.params == ()
    assert compiled.match("a/b") == {}
    assert compiled.match("a/c") is None


@pytest.mark.parametrize(
    ("pattern", "same", "different"),
    [
        ("a.b/c", "a.b/c", "aXb/c"),
        ("a$", "a$", "a"),
        ("(x)/y", "(x)/y", "x/y"),
        ("*", "*", "anything"),
        ("a\\b", "a\\b", "ab"),
        ("[ab]/^c", "[ab]/^c", "a/c"),
        ("x|y", "x|y", "x"),
    ],
)
def test_regex_characters_are_literal(pattern: str, same: str, different: str) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.filter == pattern
    assert compiled.matches(same)
    assert not compiled.matches(different)


def test_param_value_may_contain_special_characters() -> None:
    compiled = compile_pattern("d/{id}")
    assert compiled.match("d/.*$(\\") == {"id": ".*$(\\"}


def test_empty_levels_are_literal_levels() -> None:
    assert compile_pattern("a//b").matches("a//b")
    assert not compile_pattern("a//b").matches("a/b")
    assert compile_pattern("/a").matches("/a")
    assert not compile_pattern("/a").matches("a")
    assert compile_pattern("a/").matches("a/")
    assert not compile_pattern("a/").matches("a")
    assert compile_pattern("/").matches("/")


def test_plus_matches_an_empty_level() -> None:
    compiled = compile_pattern("a/{x}/b")
    assert compiled.match("a//b") == {"x": ""}
    assert filter_matches("a/+", "a/")
    assert filter_matches("+/+", "/")
    assert filter_matches("+/a", "/a")
    assert not filter_matches("a/+", "a")
    assert not filter_matches("a/+", "a/b/c")


def test_hash_matches_parent_and_any_depth() -> None:
    assert filter_matches("a/#", "a")
    assert filter_matches("a/#", "a/")
    assert filter_matches("a/#", "a/b/c")
    assert not filter_matches("a/#", "ab")
    assert not filter_matches("a/#", "b/a")
    assert filter_matches("#", "x")
    assert filter_matches("#", "/")
    assert filter_matches("a/+/#", "a/b")
    assert not filter_matches("a/+/#", "a")


def test_wildcard_first_level_does_not_match_dollar_topics() -> None:
    assert not filter_matches("#", "$SYS/broker/load")
    assert not filter_matches("+/broker/load", "$SYS/broker/load")
    assert not filter_matches("+", "$x")
    assert not compile_pattern("{first}/x").matches("$a/x")
    assert filter_matches("$SYS/#", "$SYS/broker/load")
    assert filter_matches("$SYS/#", "$SYS")
    assert filter_matches("$SYS/+/load", "$SYS/broker/load")
    assert filter_matches("a/+", "a/$b")
    assert filter_matches("#", "a$")


def test_literal_dollar_pattern_is_allowed() -> None:
    compiled = compile_pattern("$SYS/broker/{stat}")
    assert compiled.filter == "$SYS/broker/+"
    assert compiled.match("$SYS/broker/uptime") == {"stat": "uptime"}


def test_dollar_share_without_slash_is_an_ordinary_level() -> None:
    assert compile_pattern("$share").filter == "$share"
    assert compile_pattern("$shared/x").filter == "$shared/x"


def test_invalid_topic_names_never_match() -> None:
    compiled = compile_pattern("#")
    assert compiled.match("") is None
    assert compiled.match("a/+") is None
    assert compiled.match("a/#") is None
    assert compiled.match("a\0b") is None
    assert compiled.match("a" * 65536) is None
    assert compiled.match("a" * 65535) == {}
    assert not filter_matches("+", "")


def test_unicode_levels() -> None:
    compiled = compile_pattern("température/{room}")
    assert compiled.match("température/salon") == {"room": "salon"}


# --------------------------------------------------------------------------------------------
# Example tests: errors
# --------------------------------------------------------------------------------------------


def assert_error(pattern: str, *fragments: str) -> TopicError:
    with pytest.raises(TopicError) as info:
        compile_pattern(pattern)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "line" not in message
    return info.value


def test_topic_error_is_value_error() -> None:
    assert issubclass(TopicError, ValueError)


@pytest.mark.parametrize("pattern", ["sensor-{id}", "a/{id}x/b", "x{a}y", "{a}{b}", "{a}/x{b}"])
def test_param_must_be_whole_level(pattern: str) -> None:
    assert_error(pattern, "param must be a whole level")


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("a/{id", "unbalanced"),
        ("a/id}", "unbalanced"),
        ("{", "unbalanced"),
        ("}", "unbalanced"),
        ("a/}id{", "unbalanced"),
        ("{{id}}", "nested"),
    ],
)
def test_unbalanced_braces(pattern: str, fragment: str) -> None:
    assert_error(pattern, fragment)


@pytest.mark.parametrize("pattern", ["a/{1x}", "a/{a-b}", "a/{a b}", "{é}", "{a.b}", "{+}", "{#}"])
def test_invalid_param_name(pattern: str) -> None:
    assert_error(pattern, "invalid param name")


def test_valid_param_names() -> None:
    assert compile_pattern("{_}/{A1}/{snake_case_9}").params == ("_", "A1", "snake_case_9")


def test_empty_param_name() -> None:
    assert_error("a/{}", "empty param name")


def test_duplicate_param_name() -> None:
    assert_error("{id}/x/{id}", "{id}", "more than once")


@pytest.mark.parametrize("pattern", ["a+/b", "a/+b", "a/b+c", "++"])
def test_plus_must_be_whole_level(pattern: str) -> None:
    assert_error(pattern, "'+' must be a whole level")


@pytest.mark.parametrize("pattern", ["a#", "a/b#", "##"])
def test_hash_must_be_whole_level(pattern: str) -> None:
    assert_error(pattern, "'#' must be a whole level")


@pytest.mark.parametrize("pattern", ["#/a", "a/#/b", "a/#/#", "#/"])
def test_hash_must_be_last(pattern: str) -> None:
    assert_error(pattern, "'#' must be the last level")


@pytest.mark.parametrize("pattern", ["$share/g/a", "$queue/a", "$share/g/{id}"])
def test_shared_prefix_in_pattern_points_at_route_options(pattern: str) -> None:
    assert_error(pattern, "shared: true", "group:")


def test_empty_pattern() -> None:
    assert_error("", "empty")


def test_nul_in_pattern() -> None:
    assert_error("a\0b", "NUL")


def test_pattern_length_limit_counts_utf8_bytes() -> None:
    assert compile_pattern("a" * 65535).filter == "a" * 65535
    assert_error("a" * 65536, "65536 bytes", "65535")
    assert_error("é" * 32768, "65536 bytes")
    assert compile_pattern("é" * 32767 + "a").pattern == "é" * 32767 + "a"


def test_lone_surrogate_is_rejected() -> None:
    assert_error("a/\ud800", "UTF-8")


def test_direct_construction_is_cross_checked() -> None:
    assert TopicPattern("a/{x}", "a/+", ("x",)) == compile_pattern("a/{x}")
    with pytest.raises(TopicError, match="compile_pattern"):
        TopicPattern("a/{x}", "a/b", ("x",))
    with pytest.raises(TopicError, match="compile_pattern"):
        TopicPattern("a/{x}", "a/+", ())


def test_compiled_patterns_are_hashable_values() -> None:
    assert hash(compile_pattern("a/{x}")) == hash(compile_pattern("a/{x}"))
    assert compile_pattern("a/{x}") != compile_pattern("a/{y}")


# --------------------------------------------------------------------------------------------
# Example tests: filters, groups, topic names, overlap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter", "fragment"),
    [
        ("", "empty"),
        ("a/#/b", "'#' must be the last level"),
        ("a+", "'+' must be a whole level"),
        ("a\0", "NUL"),
        ("$share/g/a", "$share/"),
        ("$queue/a", "$queue/"),
    ],
)
def test_filter_matches_rejects_invalid_filters(filter: str, fragment: str) -> None:
    with pytest.raises(TopicError, match=None) as info:
        filter_matches(filter, "a")
    assert fragment in str(info.value)


def test_braces_are_plain_characters_in_filters() -> None:
    assert filter_matches("a/{x}", "a/{x}")
    assert not filter_matches("a/{x}", "a/b")


@pytest.mark.parametrize("group", ["g", "workers-1", "$x", "a.b"])
def test_validate_group_accepts(group: str) -> None:
    assert validate_group(group) == group


@pytest.mark.parametrize(
    ("group", "fragment"),
    [("", "empty"), ("a/b", "'/'"), ("a+", "'+'"), ("#", "'#'"), ("a\0", "NUL")],
)
def test_validate_group_rejects(group: str, fragment: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_group(group)
    assert fragment in str(info.value)


def test_shared_filter() -> None:
    assert shared_filter("workers", "sensors/+/data") == "$share/workers/sensors/+/data"
    assert shared_filter("g", "#") == "$share/g/#"
    with pytest.raises(TopicError, match="'/'"):
        shared_filter("a/b", "x")
    with pytest.raises(TopicError, match="last level"):
        shared_filter("g", "#/x")
    with pytest.raises(TopicError, match="65535"):
        shared_filter("g", "a" * 65530)


@pytest.mark.parametrize("topic", ["dead/letters", "$SYS/x", "/", "a//b", "é"])
def test_validate_topic_name_accepts(topic: str) -> None:
    assert validate_topic_name(topic) == topic


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("", "empty"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("a+b", "wildcard"),
        ("a\0b", "NUL"),
        ("a" * 65536, "65535"),
        ("é" * 32768, "65535"),
    ],
)
def test_validate_topic_name_rejects(topic: str, fragment: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic_name(topic)
    assert fragment in str(info.value)


def test_validate_topic_name_length_boundary() -> None:
    assert validate_topic_name("a" * 65535) == "a" * 65535


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a/+", "+/b", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "#", True),
        ("+", "#", True),
        ("+", "+", True),
        ("a/b", "a/c", False),
        ("+", "+/+", False),
        ("a/+", "a", False),
        ("#", "$SYS/x", False),
        ("+/#", "$SYS/#", False),
        ("+", "$x", False),
        ("$SYS/#", "$SYS/+", True),
        ("$SYS/#", "$SYS", True),
        ("a/+", "a/$x", True),
        ("+", "/#", False),
        ("#", "/#", True),
        ("/#", "+/+", True),
        ("a//b", "a/+/b", True),
        ("a//b", "a/b", False),
    ],
)
def test_filters_overlap_examples(a: str, b: str, expected: bool) -> None:
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected


def test_filters_overlap_respects_topic_length_limit() -> None:
    long_a, long_b = "A" * 40000, "B" * 40000
    assert filters_overlap(f"{long_a}/+", "+/B")
    assert not filters_overlap(f"{long_a}/+", f"+/{long_b}")


def test_filters_overlap_rejects_invalid_filters() -> None:
    with pytest.raises(TopicError):
        filters_overlap("a/#/b", "a")
    with pytest.raises(TopicError):
        filters_overlap("a", "")


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------

ALPHABET = "ab$.(*\\é"
literal_levels = st.one_of(
    st.text(alphabet=ALPHABET, max_size=3),
    st.sampled_from(["", "$SYS", "a", "b"]),
)


@st.composite
def filter_levels(draw: st.DrawFn) -> list[str]:
    """Filter levels ending in an optional '#'; the empty filter is invalid so never drawn."""
    levels = draw(
        st.lists(st.one_of(literal_levels, st.just("+")), min_size=0, max_size=4),
    )
    if draw(st.booleans()):
        levels.append("#")
    if levels in ([], [""]):
        levels = ["+"]
    return levels


filters = filter_levels().map("/".join)


@st.composite
def topic_near(draw: st.DrawFn, filter: str) -> str:
    """A topic shaped like `filter`, so that a good share of draws actually match it."""
    levels: list[str] = []
    for level in filter.split("/"):
        if level == "#":
            levels.extend(draw(st.lists(literal_levels, max_size=2)))
        elif level == "+" or draw(st.integers(0, 4)) == 0:
            levels.append(draw(literal_levels))
        else:
            levels.append(level)
    change = draw(st.integers(0, 5))
    if change == 0 and levels:
        levels.pop()
    elif change == 1:
        levels.append(draw(literal_levels))
    return "/".join(levels)


any_topics = st.lists(literal_levels, min_size=1, max_size=5).map("/".join)


@st.composite
def filter_and_topic(draw: st.DrawFn) -> tuple[str, str]:
    filter = draw(filters)
    topic = draw(st.one_of(topic_near(filter), any_topics))
    return filter, topic


@settings(max_examples=400, deadline=None)
@given(filter_and_topic())
def test_filter_matches_agrees_with_reference(case: tuple[str, str]) -> None:
    filter, topic = case
    assert filter_matches(filter, topic) is ref_matches(filter, topic)


@st.composite
def pattern_and_topic(draw: st.DrawFn) -> tuple[list[str], str]:
    levels = draw(filter_levels())
    names = iter(f"p{index}" for index in itertools.count())
    pattern_levels = [
        f"{{{next(names)}}}" if level == "+" and draw(st.booleans()) else level for level in levels
    ]
    filter = "/".join(levels)
    topic = draw(st.one_of(topic_near(filter), any_topics))
    return pattern_levels, topic


@settings(max_examples=400, deadline=None)
@given(pattern_and_topic())
def test_compiled_pattern_match_agrees_with_reference(case: tuple[list[str], str]) -> None:
    pattern_levels, topic = case
    pattern = "/".join(pattern_levels)
    expected_filter = "/".join("+" if level.startswith("{") else level for level in pattern_levels)
    compiled = compile_pattern(pattern)
    assert compiled.filter == expected_filter
    names = tuple(level[1:-1] for level in pattern_levels if level.startswith("{"))
    assert compiled.params == names

    if ref_matches(expected_filter, topic):
        topic_levels = topic.split("/")
        expected = {
            level[1:-1]: topic_levels[index]
            for index, level in enumerate(pattern_levels)
            if level.startswith("{")
        }
        assert compiled.match(topic) == expected
        assert compiled.matches(topic)
    else:
        assert compiled.match(topic) is None
        assert not compiled.matches(topic)


@st.composite
def filter_pair_and_topic(draw: st.DrawFn) -> tuple[str, str, str]:
    a = draw(filters)
    # Half the time derive b from a so that overlapping pairs are common.
    b = draw(st.one_of(filters, topic_near(a).filter(lambda t: t != "")))
    topic = draw(st.one_of(topic_near(a), topic_near(b), any_topics))
    return a, b, topic


@settings(max_examples=400, deadline=None)
@given(filter_pair_and_topic())
def test_filters_overlap_agrees_with_reference(case: tuple[str, str, str]) -> None:
    a, b, topic = case
    overlap = filters_overlap(a, b)
    assert overlap is filters_overlap(b, a)
    if ref_matches(a, topic) and ref_matches(b, topic):
        assert overlap
    witness = ref_witness(a, b)
    if overlap:
        assert witness is not None
        assert ref_matches(a, witness)
        assert ref_matches(b, witness)
    else:
        assert witness is None
