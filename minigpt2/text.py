"""Text as a terminal or a report shows it: a sample on one line with nothing hidden in it, a
count with its noun, a size, a duration.

Shared by the scripts' display (`console.py`) and the comparison's reports (`analysis/report.py`,
`analysis/htmlreport.py`), so a sample reads the same in the training table and in a report.
"""

from __future__ import annotations

import unicodedata


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def visible(text: str, newline: str = "↵") -> str:
    """A generated text made safe to show: line breaks as `newline`, and every other control or
    format character (a right-to-left override that would reverse the rest of the line, a Unicode
    line separator, a zero-width joiner) spelled out as \\uXXXX. Tabs stay."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(
        newline if c == "\n" else c if c == "\t" or unicodedata.category(c) not in HIDDEN else f"\\u{ord(c):04x}"
        for c in text
    )


HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}  # control, format, separators, surrogate, private, unassigned


def one_line(text: str) -> str:
    """A sample on one line (see `visible`)."""
    return visible(text)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
