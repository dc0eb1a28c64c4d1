from __future__ import annotations

import pytest

from ptmserve.errors import InvalidConfig
from ptmserve.memory.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", 123),
        (123, 123),
        ("0", 0),
        ("512MiB", 512 << 20),
        ("512mib", 512 << 20),
        ("2GB", 2_000_000_000),
        ("2 GiB", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("64k", 64_000),
        ("10B", 10),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5", "1..2GB", "GB", -1, True])
def test_parse_size_rejects_and_quotes_the_value(text: object) -> None:
    with pytest.raises(InvalidConfig) as exc:
        parse_size(text)  # type: ignore[arg-type]
    assert repr(text) in exc.value.message


def test_format_size() -> None:
    assert format_size(512) == "512B"
    assert format_size(3 << 20) == "3.0MiB"
    assert format_size(5 << 30) == "5.0GiB"
