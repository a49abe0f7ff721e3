"""Sizes as administrators type and read them: "512", "4k", "1M", "2GiB" <-> bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str | None = None) -> int:
    """Bytes from "1048576", "1M", "1MiB", "4k". Binary units, as losetup and dd use them.
    `what`: the field's name as the screen labels it, said first in the error."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{what + ': ' if what else ''}not a size: {text!r} "
                         "(use bytes or a suffix: 512, 4K, 1M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def exact_size(n: int) -> str:
    """A size in a refusal, where the exact figure matters: "1 MiB", "1.5 MiB (1572864 bytes)"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            if n % (1 << shift) == 0:
                return f"{n >> shift} {unit}"
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def human_size(n: int) -> str:
    """"64.0 MiB"; exact byte counts under 1 KiB (for tables and rates)."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b|bit)(?:/s|ps)?\s*$", re.IGNORECASE)


def parse_rate(text: str | int) -> int:
    """Bytes per second from "20MiB/s", "20M", "100Mbit/s", "500kbit" (bits: decimal, as
    network links are sold; bytes: binary, as sizes are elsewhere)."""
    if isinstance(text, int):
        return text
    m = _RATE.match(text)
    if m is None:
        try:
            return parse_size(text.strip().removesuffix("/s"))
        except ValueError:
            raise ValueError(f"not a rate: {text!r} (e.g. 20MiB/s or 100Mbit/s)") from None
    value, prefix, unit = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    if unit == "bit":
        return int(value * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[prefix] / 8)
    return int(value * _UNITS[prefix])


def cap_shown(text: str | None) -> str | None:
    """A configured bandwidth cap as it is listed: 0 (as rsync's --bwlimit=0) is no cap,
    "unlimited"; None (none configured) stays None."""
    try:
        return "unlimited" if text is not None and parse_rate(text) == 0 else text
    except ValueError:
        return text


def shown(text: str) -> str:
    """`text` safe for one line of a terminal or a table cell: control characters (a newline is
    legal in a path) become visible escapes (\\n, \\t, \\xNN), nothing else changes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
