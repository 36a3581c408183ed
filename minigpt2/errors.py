"""The exceptions minigpt2 raises for problems the user can fix, one type per kind.

Every message says what is wrong and what to do about it, in words fit for the user, but
without command-line flag names: the library does not know whether it was called from
`train.py`, a notebook or another program. The scripts catch `MiniGPT2Error`, turn it into one
`error: ...` line with `user_message` (which adds the flag name for an `OptionError`) and exit
non-zero, so a bad file or a typo never ends in a traceback. Anything else that escapes is a
bug in minigpt2.

    MiniGPT2Error            the base: catch this one
    ├── OptionError          a bad value of a named parameter (temperature=nan, lr=0, ...)
    ├── CheckpointError      a checkpoint that cannot be found, read, trusted or matched
    ├── DataError            a text file that cannot be used for training or evaluation
    └── OutputError          an output file or folder that cannot be written
"""

from __future__ import annotations

import re


class MiniGPT2Error(Exception):
    """A problem with the user's input (a checkpoint, a model name, a file, an option)."""


class OptionError(MiniGPT2Error, ValueError):
    """A bad value for the parameter `option` (its Python name: "lr", "top_p", "n_positions").

    `detail` reads after the name: "must be a finite number > 0, got nan". `str(e)` is the
    library's own wording, "lr must be ...". A front end renders it with its own name for the
    parameter through `user_message` ("--lr must be ..."). Also a `ValueError`, so code that
    validated with `except ValueError` keeps working.
    """

    def __init__(self, option: str, detail: str) -> None:
        self.option = option
        self.detail = detail
        super().__init__(f"{option} {detail}")


class CheckpointError(MiniGPT2Error):
    """A checkpoint that cannot be found, read, trusted (non-finite or integer weights, an
    impossible config.json) or matched to the model."""


class DataError(MiniGPT2Error):
    """A text file that cannot be used: missing, not a regular file, empty, binary, not UTF-8,
    or nothing left once the requested lines are dropped."""


class OutputError(MiniGPT2Error):
    """An output (a --json or --plot file, a checkpoint folder) that cannot be written: an
    existing file, a missing or read-only folder, a full disk."""


PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:='?([^'`]*)'?)?`")


def flag_name(option: str) -> str:
    """The conventional command-line spelling of a parameter: top_p -> --top-p."""
    return "--" + option.replace("_", "-")


def user_message(error: BaseException, flag_names: dict[str, str] | None = None) -> str:
    """The one line a script prints after "error: " for `error`.

    An `OptionError` is named the way the user typed it: `flag_names` maps the library's
    parameter names to the script's flags where they differ ({"n_positions": "--context"});
    any other name becomes `--name-with-dashes`. Other errors are shown as they are, on one line,
    with the parameters they name in backticks (`encoding_errors='replace'`) turned into flags
    (--encoding-errors replace) the same way.
    """

    def flag(m: re.Match) -> str:
        name = (flag_names or {}).get(m.group(1)) or flag_name(m.group(1))
        return name + (f" {m.group(2)}" if m.group(2) else "")

    if isinstance(error, OptionError):
        name = (flag_names or {}).get(error.option) or flag_name(error.option)
        return f"{name} {PARAMETER.sub(flag, error.detail)}"
    text = str(error).strip() or type(error).__name__

    # A message may name a parameter as Python spells it, in backticks: `seq_len`, `encoding_errors='replace'`.
    return PARAMETER.sub(flag, " ".join(text.splitlines()))


class Notice(UserWarning):
    """Something the user should know that is not an error (GPT-2's own tokenizer standing in for
    a checkpoint that has none): raised as a `warnings` category, since the library never prints.
    The scripts show each as one `note: ...` line on stderr (see `minigpt2.cli`)."""
