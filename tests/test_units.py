import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.services.units import human_size, parse_size


@pytest.mark.parametrize("text,expected", [("0", 0), ("512", 512), ("4k", 4096), ("4K", 4096),
                                           ("1M", 1 << 20), ("1MiB", 1 << 20), ("2G", 2 << 30),
                                           (" 3 MB ", 3 << 20), (7, 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "-1", "1.5M", "12x", "M", "1 M B"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(bad)


def test_human_size():
    assert human_size(100) == "100 B"
    assert human_size(64 << 20) == "64.0 MiB"
    assert human_size(3 << 40) == "3.0 TiB"


@given(st.integers(min_value=0, max_value=1 << 60), st.sampled_from(["", "k", "M", "G"]))
def test_parse_size_scales(n, unit):
    factor = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    assert parse_size(f"{n}{unit}") == n * factor
