"""Tests for routemqd.units: sizes, durations and how sizes are shown."""

from __future__ import annotations

import math

import pytest

from routemqd.units import UnitError, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (4096, 4096),
        ("0", 0),
        ("123", 123),
        ("10B", 10),
        ("1k", 1000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("512MB", 512 * 10**6),
        ("512mb", 512 * 10**6),
        ("512M", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("64mib", 64 * 2**20),
        ("1GB", 10**9),
        ("1GiB", 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2TiB", 2 * 2**40),
        ("3TB", 3 * 10**12),
        (" 256 MiB ", 256 * 2**20),
        ("0.5KiB", 512),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    result = parse_size(value)
    assert result == expected
    assert isinstance(result, int)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        "-1",
        "-1MB",
        1.5,
        float("nan"),
        float("inf"),
        "nan",
        "inf",
        "",
        "MB",
        "512 potatoes",
        "1.5.2GB",
        "1e6",
        "1GBB",
        "0x10",
        None,
        [512],
        "9" * 400 + "MB",
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(UnitError):
        parse_size(value)


def test_parse_size_error_lists_units() -> None:
    with pytest.raises(UnitError, match="KiB, MB, MiB") as info:
        parse_size("512 potatoes")
    assert "'512 potatoes'" in str(info.value)


def test_parse_size_negative_message() -> None:
    with pytest.raises(UnitError, match="cannot be negative"):
        parse_size(-5)


def test_unit_error_is_a_value_error() -> None:
    assert issubclass(UnitError, ValueError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("2.5", 2.5),
        ("30s", 30.0),
        ("30S", 30.0),
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(value: object, expected: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(expected)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        -0.5,
        "-1s",
        float("nan"),
        float("inf"),
        float("-inf"),
        "nan",
        "soon",
        "",
        "s",
        "1d",
        "1 week",
        "10us",
        None,
        {"s": 1},
        10**400,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(UnitError):
        parse_duration(value)


def test_parse_duration_huge_string_is_rejected_not_infinite() -> None:
    with pytest.raises(UnitError, match="finite"):
        parse_duration("9" * 400 + "s")


def test_parse_duration_error_names_units() -> None:
    with pytest.raises(UnitError, match=r"ms, s, m, h"):
        parse_duration("soon")


def test_parse_duration_results_are_finite() -> None:
    assert math.isfinite(parse_duration("99999h"))


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (2**20 - 1, "1024.0KiB"),
        (2**20, "1.0MiB"),
        (512 * 2**20, "512.0MiB"),
        (3 * 2**29, "1.5GiB"),
        (2**40, "1024.0GiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("written", "shown"),
    [("1KiB", "1.0KiB"), ("512MiB", "512.0MiB"), ("2GiB", "2.0GiB"), ("1.5GiB", "1.5GiB")],
)
def test_format_size_of_parsed_binary_units(written: str, shown: str) -> None:
    assert format_size(parse_size(written)) == shown
