"""Numbers as people read them: rates as percentages with their interval, seconds as times.

Used by every command that prints for a person (``build``, ``demo``, ``status``); JSON
outputs keep the raw values.
"""

from __future__ import annotations

from typing import Any


def pct(x: float | None, *, digits: int = 1) -> str:
    """0.01725 -> '1.7%'; None -> 'n/a'. Small non-zero rates keep one significant digit."""
    if x is None:
        return "n/a"
    v = 100.0 * float(x)
    if 0 < abs(v) < 10 ** (-digits):
        return f"{v:.1g}%"
    return f"{v:.{digits}f}%"


def rate(interval: Any) -> str:
    """An ``Interval`` (value, low, high, level) -> '1.7% (95% interval 0.4-4.2%)'."""
    if interval is None or interval.value is None:
        return "n/a"
    text = pct(interval.value)
    if interval.low is not None and interval.high is not None:
        level = f"{100 * interval.level:.0f}%"
        text += f" ({level} interval {pct(interval.low)[:-1]}-{pct(interval.high)})"
    return text


def num(x: float | None, *, sig: int = 4) -> str:
    """A score or threshold with ``sig`` significant digits; None -> 'n/a'."""
    return "n/a" if x is None else f"{float(x):.{sig}g}"


def seconds(s: float | None) -> str:
    """12.34 -> '12.3 s'; 125 -> '2 min 5 s'; None -> 'n/a'."""
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    m, r = divmod(int(round(s)), 60)
    return f"{m} min {r} s"


def trade_off(t: Any) -> str:
    """The plain sentence of a ``ThresholdFile``: what its threshold costs and catches."""
    fpr, fnr = t.expected_fpr, t.expected_fnr
    parts = [f"threshold {num(t.value)} ({t.mode})"]
    if fpr is not None and fpr.value is not None:
        parts.append(f"rejects about {rate(fpr)} of good parts")
    if fnr is not None and fnr.value is not None:
        parts.append(f"misses about {rate(fnr)} of defective ones")
    return ": ".join(parts[:1]) + (": " + " and ".join(parts[1:]) if len(parts) > 1 else "")


def table(rows: list[list[str]], *, header: list[str]) -> str:
    """A left-aligned plain-text table."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
