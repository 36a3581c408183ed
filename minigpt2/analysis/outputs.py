"""compare.py's options and output files: refused before the work starts, written after it.

Kept out of the script so that compare.py stays a thin front end: parse, check, compare, print.
"""

from __future__ import annotations

from pathlib import Path

from minigpt2.analysis.compare import check_revision_applies, files_read
from minigpt2.analysis.report import check_new_file, cjk_font, missing_font_note, require_matplotlib
from minigpt2.errors import OptionError, OutputError


def check_request(args) -> None:
    """Refuse, before minutes of work, options that would be ignored or produce nothing, and output
    files that exist (without `--force`), cannot be written, are named twice, or are one of the
    inputs (never replaced, not even with `--force`). `args` are compare.py's parsed options."""
    if any(not prompt.strip() for prompt in args.prompt):
        raise OptionError("prompt", "is empty: give the text both models should continue")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise OptionError("plot", f"writes a PNG image: give a file name ending in .png (got '{args.plot}')")
    check_revision_applies([args.a, *args.b], args.revision)
    named = [(flag, path) for flag, path in (("--json", args.json), ("--plot", args.plot), ("--html", args.html))
             if path]  # fmt: skip
    for i, (flag, path) in enumerate(named):
        for other, same in named[i + 1 :]:
            if Path(path).resolve() == Path(same).resolve():
                raise OutputError(f"{flag} and {other} both name '{path}'; give each its own file")
    reads = files_read([args.a, *args.b], args.text, args.revision) if named else []
    for _, path in named:
        check_new_file(path, args.force, reads)
    if args.plot:
        require_matplotlib()


def write_outputs(result: dict, args, progress) -> list[str]:
    """Write the --json, --plot and --html files `args` ask for; the lines to print ("wrote ...").
    `progress` (compare.py's `PhaseProgress`) shows the plot being drawn and any note on fonts."""
    from minigpt2.analysis.htmlreport import write_html
    from minigpt2.analysis.report import write_json, write_plot, write_tradeoff_plot

    lines = []
    if args.json:
        lines.append(f"wrote {write_json(result, args.json, force=args.force)}")
    if args.plot:
        draw = write_tradeoff_plot if len(args.b) > 1 else write_plot
        progress("drawing the plot", 0, 1)
        try:
            written = draw(result, args.plot, force=args.force)
        finally:
            progress.finish()
        note = missing_font_note(result, cjk_font())
        if note:
            progress.note(f"note: {note}")
        lines.append(f"wrote {written}")
    if args.html:
        lines.append(f"wrote {write_html(result, args.html, force=args.force, top=args.top)}")
    return lines
