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


def test_a_verify_difference_is_said_in_words(monkeypatch):
    """fs verify's differences on the screen and in the CLI: local times to the nanosecond,
    a checksum shortened, a side without the file as "none", a control character escaped;
    --json keeps the raw values (the daemon's own)."""
    from app.services.entries import describe_difference
    monkeypatch.setenv("TZ", "UTC")
    import time
    time.tzset()
    try:
        assert describe_difference({"path": "f7", "what": "mtime", "source": 1796414723965680987,
                                    "target": 1796414723965680000}) == \
            "f7: mtime (source 2026-12-04 20:05:23.965680987, target 2026-12-04 20:05:23.965680000)"
    finally:
        monkeypatch.undo()
        time.tzset()
    assert describe_difference({"path": "f7", "what": "content", "source": "70b0" * 16,
                                "target": "ebf2" * 16}) == \
        "f7: content (source sha256 70b070b070b070b0…, target sha256 ebf2ebf2ebf2ebf2…)"
    assert describe_difference({"path": "f9", "what": "missing at target", "source": "-rw-r--r--",
                                "target": None}) == "f9: missing at target (source -rw-r--r--, target none)"
    assert describe_difference({"path": "a\nb", "what": "mode", "source": "0o644",
                                "target": "0o600"}) == "a\\nb: mode (source 0o644, target 0o600)"
