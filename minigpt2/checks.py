"""Checking numbers at the boundary: the library's public functions and the scripts' arguments.

Why a module for something as plain as "is lr positive?": NaN passes every comparison-based
check (`nan < 0` and `nan <= 0` are both False), so `if lr <= 0: raise` lets `--lr nan` through
to train one step of garbage and then blame the learning rate. Every float here must first be
finite (`math.isfinite`), and then lie in an explicit range. Integers must be real ints, not
bools (`True` is an int in Python) nor floats nor strings read from a JSON file.

The library functions raise `OptionError(name, detail)`; the `arg_*` wrappers turn the same
checks into argparse `type=` functions, so a script refuses a bad value while parsing its
arguments, before any data or model is loaded. `ArgumentParser` prints argparse's errors as the
single `error: ...` line every minigpt2 script uses.
"""

from __future__ import annotations

import argparse
import math
import re

from .errors import OptionError


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def finite(name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, if it is a finite number in the range; else an `OptionError`.

    `low_open` / `high_open` exclude the bound itself: finite("lr", x, low=0, low_open=True)
    accepts every finite x > 0.
    """
    where = _range_text(low, high, low_open, high_open)
    wanted = "a finite number" + (f" {where}" if where else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"must be {wanted}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if (not math.isfinite(value)
            or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))):
        raise OptionError(name, f"must be {wanted}, got {value:g}")
    return value


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high]; else an `OptionError`."""
    where = _range_text(low, high, False, False)
    wanted = "an integer" + (f" {where}" if where else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be {wanted}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise OptionError(name, f"must be {wanted}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    return integer(name, value, low=1)


def non_negative_int(name: str, value) -> int:
    return integer(name, value, low=0)


# ----- argparse ---------------------------------------------------------------------------


def arg_float(**limits):
    """An argparse `type=` accepting a finite float within `limits` (the keywords of `finite`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            return finite("value", value, **limits)
        except OptionError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    parse.__name__ = "number"
    return parse


def arg_int(**limits):
    """An argparse `type=` accepting an integer within `limits` (the keywords of `integer`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        try:
            return integer("value", value, **limits)
        except OptionError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    parse.__name__ = "integer"
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line `error: ...` (exit status 2) that every
    minigpt2 error is, instead of a usage block followed by `prog: error: ...`.

    "argument --lr: must be ..." is shortened to "--lr must be ...", the wording `user_message`
    gives the library's own `OptionError`s."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+?)(/\S+)?: (must |is |has )", r"\1 \3", message)
        self.exit(2, f"error: {message}\n")
