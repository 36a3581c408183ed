"""Turning a `minigpt2.analysis.compare.compare` result into something to read: text, JSON, a plot.

The comparison itself lives in `minigpt2.analysis.compare` and returns a plain dict; this module only
presents it, so the figures in the terminal report, the JSON file and the plot are the same
numbers by construction.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import unicodedata
import warnings
from pathlib import Path

from minigpt2.errors import MiniGPT2Error, OutputError
from minigpt2.files import check_replaceable, write_atomically
from minigpt2.text import one_line

# ----- numbers and tables -----------------------------------------------------------------


def num(x, digits: int = 4) -> str:
    """A figure for a table: `digits` significant digits, "-" for a missing one, "inf" spelled out."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def pct(x) -> str:
    """A relative change as a percentage: 0.0213 -> "2.13%"."""
    if x is None or math.isinf(x) or math.isnan(x):
        return num(x)
    return f"{100 * x:.3g}%" if x else "0"


def cos(x) -> str:
    """A cosine close to 1 needs its digits after the point: 0.9998 and 0.99999998 differ a lot."""
    return "-" if x is None else f"{x:.8f}"


def display_width(text: str) -> int:
    """Columns a string takes in a terminal: East Asian wide characters (Chinese) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first `left` columns left-aligned (names), the rest right (figures)."""
    widths = [max(display_width(str(c)) for c in column) for column in zip(headers, *rows)]

    def cell(i: int, text: str, width: int) -> str:
        pad = " " * (width - display_width(text))
        return text + pad if i < left else pad + text

    def line(cells):
        return "  ".join(cell(i, str(c), w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def quoted(text: str, limit: int = 40) -> str:
    """A prompt for a heading: escaped like a JSON string, shortened when long."""
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[: limit - 4] + '..."'


def evenly(items: list, most: int) -> list:
    """At most `most` items spread evenly over `items`, always keeping the first and the last."""
    if len(items) <= most:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (most - 1)) for i in range(most)})
    return [items[i] for i in picks]


# ----- the terminal report ----------------------------------------------------------------


def render(result: dict, top: int = 10) -> str:
    """The whole comparison as a readable report: one titled group of aligned tables per part."""
    out: list[str] = []
    out += _header(result)
    out += _weights(result, top)
    for number, act in enumerate(result["activations"], 1):
        out += _activations(number, act)
    if result["behaviour"]:
        out += _behaviour(result)
    for t in result["behaviour"]:
        out += layer_sections(t, result["config"]["n_layer"])
    for run in result["runs"]:
        out += _run(run) + _run_samples(run)
    return "\n".join(out).rstrip() + "\n"


def _side(info: dict) -> str:
    if info["run"]:
        return f"{info['source']}  (training run; its checkpoint {info['checkpoint']})"
    return info["source"]


def _header(result: dict) -> list[str]:
    c = result["config"]
    return [
        f"A: {_side(result['a'])}",
        f"B: {_side(result['b'])}",
        f"architecture: {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads, "
        f"{_vocabularies(c['vocab_size'], (result.get('weights') or {}).get('new_rows'))}, context {c['n_positions']}",
        "",
    ]


TENSOR_COLUMNS = ["tensor", "shape", "rel.change", "rank90", "stable rank", "mean|d|", "max|d|", "std(d)", "row cos",
                  "row dist"]  # fmt: skip


def _weights(result: dict, top: int) -> list[str]:
    w = result["weights"]
    return _tensors(result, top) + _layers(w) + _new_rows(w) + [""]


def _tensors(result: dict, top: int) -> list[str]:
    """The most changed tensors, ranked, with the figures of a plain diff beside them."""
    tensors = result["weights"]["tensors"]
    # A tensor that is all zeros in A (a bias of a freshly initialised model) has an infinite
    # relative change; ranked first, those would push every informative row off the list.
    from_zero = [t for t in tensors if math.isinf(t["relative_change"])]
    ranked = sorted((t for t in tensors if not math.isinf(t["relative_change"])), key=lambda t: -t["relative_change"])
    out = [
        f"== Weights: the {min(top, len(tensors))} most changed of {len(tensors)} tensors, "
        "by relative change ||A-B||/||A|| ==",
        f"   on the {result['orientation']}.",
        "   rank90 = singular directions holding 90% of ||A-B||^2 (of min(shape)); "
        "stable rank = ||A-B||_F^2 / ||A-B||_2^2.",
        "   mean|d|, max|d|, std(d), row cos, row dist: the five numbers of a plain diff (d = A - B), for reference.",
    ]
    lora = result["weights"].get("lora")
    adapted = set(lora["adapted"]) if lora else set()
    if lora:
        out.append(
            f"   LoRA (r={lora['r']}, alpha={lora['alpha']}, {lora['checkpoint']}): * marks the "
            f"{len(adapted)} adapted tensors, whose update has rank <= {lora['r']}; the others were frozen."
        )
    out += table(TENSOR_COLUMNS, tensor_rows(ranked[:top], adapted))
    if from_zero:
        names = ", ".join(t["name"] for t in from_zero[:4]) + (
            f" and {len(from_zero) - 4} more" if len(from_zero) > 4 else ""
        )
        are = "tensors are" if len(from_zero) > 1 else "tensor is"
        out.append(f"{len(from_zero)} {are} all zeros in A, so the relative change is infinite (not ranked): {names}")
    return out


def tensor_rows(tensors: list[dict], adapted: set[str]) -> list[list[str]]:
    """The cells of the tensors table (`TENSOR_COLUMNS`), one row per tensor; * marks a LoRA-adapted one."""
    return [[t["name"] + (" *" if t["name"] in adapted else ""), "x".join(map(str, t["shape"])),
             pct(t["relative_change"]), "-" if t["rank_90"] is None else f"{t['rank_90']}/{min(t['shape'])}",
             num(t["stable_rank"], 3), num(t["mean_abs_diff"], 3), num(t["max_abs_diff"], 3), num(t["std_diff"], 3),
             cos(t["mean_row_cosine"]), num(t["mean_row_distance"], 3)]
            for t in tensors]  # fmt: skip


LAYER_COLUMNS = ["layer", "rel.change", "||A-B||", "||A||", "most changed module"]
KIND_COLUMNS = ["module", "rel.change", "||A-B||", "most changed in", "its rel.change"]


def layer_rows(w: dict) -> tuple[list[list[str]], list[list[str]]]:
    """(rows of the per-layer table, rows of the per-module-kind table): `LAYER_COLUMNS`, `KIND_COLUMNS`."""
    layers = [[r["layer"], pct(r["relative_change"]), num(r["norm_diff"]), num(r["norm_a"]),
               r["most_changed_kind"] if r["norm_diff"] else "-"] for r in w["layers"]]  # fmt: skip
    kinds = [[r["kind"], pct(r["relative_change"]), num(r["norm_diff"]),
              r["most_changed_layer"] if r["norm_diff"] else "-", pct(r["most_changed_layer_relative_change"])]
             for r in w["kinds"]]  # fmt: skip
    return layers, kinds


def _layers(w: dict) -> list[str]:
    """The change pooled per layer, and per module kind over the layers: where the model moved."""
    layers, kinds = layer_rows(w)
    return (["", "== Weights per layer (all its tensors pooled: ||A-B|| / ||A||) =="]
            + table(LAYER_COLUMNS, layers)
            + ["", "== Weights per module kind (pooled over the layers) =="]
            + table(KIND_COLUMNS, kinds))  # fmt: skip


def _new_rows(w: dict) -> list[str]:
    """A grown vocabulary (`--extend-vocab`): wte is compared on the shared rows, the rest summarised."""
    n = w.get("new_rows")
    if not n:
        return []
    return [f"{n['side']} has {n['count']} more token rows (a grown vocabulary), mean norm {num(n['mean_norm'])}; "
            "wte above compares the shared rows"]  # fmt: skip


def _activations(number: int, act: dict) -> list[str]:
    note = ", its last tokens (longer than the context)" if act["truncated"] else ""
    out = [
        f"== Activations, prompt {number}: {quoted(act['prompt'])} ({act['tokens']} tokens{note}): "
        "block outputs of A vs B =="
    ]
    rows = [[b["block"], cos(b["cosine"]), pct(b["relative_diff"])] for b in act["blocks"]]
    out += table(["block", "cosine (mean over tokens)", "rel.diff ||hA-hB||/||hA||"], rows)
    out.append(f"next token: KL(A||B) = {num(act['kl_a_b'])} nats")
    for side in ("a", "b"):
        shown = "  ".join(f"'{t['text']}' {pct(t['prob'])}" for t in act[f"top5_{side}"])
        out.append(f"  top-5 of {side.upper()}: {shown}")
    if any("\\x" in t["text"] for t in act["top5_a"] + act["top5_b"]):
        out.append("  ('\\xNN': a token that is part of a UTF-8 character, such as half of a Chinese character)")
    if "continuation_a" in act:
        out.append("continuations (the same seed for both):")
        out += [f"  {side}: {one_line(act['continuation_' + side.lower()])}" for side in ("A", "B")]
    return out + [""]


def _behaviour(result: dict) -> list[str]:
    windows = sorted({t[side]["window"] for t in result["behaviour"] for side in "ab"})
    out = [
        f"== Behaviour on text (the first {result['max_eval_tokens']:,} tokens at most, --max-eval-tokens, after "
        f"<|endoftext|>; non-overlapping windows of {' / '.join(map(str, windows))} tokens, --window) ==",
        "   loss = nats per token; bpc = bits per character of the characters those tokens spell, comparable "
        "across languages.",
    ]
    out += table(BEHAVIOUR_COLUMNS, behaviour_rows(result))
    if any(t.get("tokens_b", t["tokens"]) != t["tokens"] for t in result["behaviour"]):
        out.append(
            "   A and B read the text with different tokenizers (B's count in brackets): compare their bits per "
            "character; loss and perplexity are per token of each one's own."
        )
    return out + [""]


BEHAVIOUR_COLUMNS = ["text", "tokens", "chars", "loss A", "loss B", "B-A", "ppl A", "ppl B", "bpc A", "bpc B"]


def behaviour_rows(result: dict) -> list[list[str]]:
    """The cells of the behaviour table (`BEHAVIOUR_COLUMNS`), one row per text."""
    rows = []
    for t in result["behaviour"]:
        a, b = t["a"], t["b"]
        tokens = f"{t['tokens']}" + (
            f" of {t['tokens_in_file']}"
            if t["tokens_in_file"] is not None and t["capped"]
            else " (capped)"
            if t["capped"]
            else ""
        )
        if t.get("tokens_b", t["tokens"]) != t["tokens"]:
            tokens += f" (B: {t['tokens_b']})"
        chars = str(t["characters"]) + (f" (B: {b['characters']})" if b["characters"] != t["characters"] else "")
        rows.append(
            [
                Path(t["file"]).name,
                tokens,
                chars,
                num(a["loss"]),
                num(b["loss"]),
                f"{b['loss'] - a['loss']:+.4f}",
                num(a["perplexity"]),
                num(b["perplexity"]),
                num(a["bits_per_char"]),
                num(b["bits_per_char"]),
            ]
        )
    return rows


# ----- which units, at which depth, where in the text (minigpt2.analysis.causal) -------------


def layer_sections(t: dict, n_layer: int) -> list[str]:
    """The transplants, the logit lens and the passages gained and lost, for one text."""
    name, out = Path(t["file"]).name, []
    if t.get("transplants_skipped"):
        out += [f"== No transplants on {name}: {t['transplants_skipped']} ==", ""]
    if t.get("layer_attribution"):
        base = t["transplant_base"]
        out += [
            f"== Which units carry the change on {name}: transplants, 2 x ({n_layer} + 2) = "
            f"{2 * (n_layer + 2)} evaluations{_of_tokens(t)} ==",
            f"   the whole change: bpc {num(base['a'])} (A) -> {num(base['b'])} (B), {base['b'] - base['a']:+.4f}. "
            "alone: what A gains with B's unit, as a share of the whole change; needed: what B loses with A's "
            "unit put back. Over 100%: more than the whole change does (the other units undo part of it); below 0: "
            "the unit's change works against it.",
        ]
        rows = [[r["unit"], num(r["bpc_a_with_b"]), pct(s["alone"]), num(r["bpc_b_with_a"]), pct(s["needed"])]
                for r, s in zip(t["layer_attribution"], t["shares"])]  # fmt: skip
        out += table(["unit", "A with B's", "alone", "B with A's", "needed"], rows) + [""]
    if t.get("logit_lens"):
        lens = t["logit_lens"]
        out.append(f"== At which depth the prediction forms on {name}: logit lens, bpc read out after each block ==")
        depths = ["embedding", *(f"h.{i}" for i in range(len(lens["a"]) - 1))]
        rows = [[d, num(a), num(b), f"{b - a:+.4f}"] for d, a, b in zip(depths, lens["a"], lens["b"])]
        out += table(["after", "bpc A", "bpc B", "B-A"], rows) + [""]
    if t.get("changes"):
        out += passage_lines(name, t["changes"]["passages"])
    return out


def _of_tokens(t: dict) -> str:
    """ " of its first 1,024 tokens" where the sections read less of the text than its scores did."""
    cap = t.get("layer_tokens")
    scored = (t.get("a") or {}).get("tokens") or 0  # what the behaviour table scored, in A's tokens
    return f" of its first {cap:,} tokens" if cap is not None and cap < scored else ""


def passage_lines(name: str, found: dict) -> list[str]:
    """The passages of a text where B gained most and lost most, in bits (B - A)."""
    out = [f"== Where in {name} B gained and lost: bits B - A per passage (about a sentence) =="]
    for key, title in (("gained", "gained most"), ("lost", "lost most")):
        out.append(f"{title}:" + ("" if found[key] else " none"))
        for p in found[key]:
            text = " ".join(p["text"].split())
            shown = text if display_width(text) <= 60 else _cut(text, 57) + "..."
            out.append(f"  {p['delta_bits']:+9.1f}  {shown}")
    return out + [""]


def _cut(text: str, width: int) -> str:
    """The longest start of `text` that takes at most `width` terminal columns."""
    while display_width(text) > width:
        text = text[:-1]
    return text


def _vocabularies(vocab_a: int, new_rows: dict | None) -> str:
    """ "vocabulary 50,257", or each side's where one was grown: "vocabulary A 50,257, B 58,257"."""
    if not new_rows:
        return f"vocabulary {vocab_a:,}"
    shared = vocab_a - new_rows["count"] if new_rows["side"] == "A" else vocab_a
    sizes = {"A": shared, "B": shared, new_rows["side"]: shared + new_rows["count"]}
    return f"vocabulary A {sizes['A']:,}, B {sizes['B']:,} ({new_rows['count']:,} new rows in {new_rows['side']})"


def _run(run: dict) -> list[str]:
    steps = evenly(run["steps"], 8)
    heading = f"== Drift over steps: training run {run['path']} (side {run['side']}"
    heading += f", probe {quoted(run['probe'])}) ==" if run["probe"] is not None else ") =="
    out = [heading] + [f"note: {n}" for n in (run.get("note"), run.get("curves", {}).get("note")) if n]
    if not steps and not run.get("snapshots_asked", True):
        return []  # the run took no snapshots (no --snapshot-every): nothing to say, no empty section
    if not steps:
        return out + ["(snapshots.jsonl holds no snapshots)", ""]
    if len(steps) < len(run["steps"]):
        out.append(f"   {len(steps)} of {len(run['steps'])} snapshots shown; --json has them all.")
    headers = ["layer"] + [f"step {s['step']}" for s in steps]
    out.append(
        "weights: relative change of the layer since the start, "
        + (
            "all its tensors pooled (as in the per-layer table)"
            if run.get("pooled")
            else "the mean over its tensors (the start model was not found to pool them)"
        )
    )
    out += table(
        headers,
        [
            [layer] + [pct(s["weight_drift"].get(layer)) for s in steps]
            for layer in run["layers"]
            if any(layer in s["weight_drift"] for s in steps)
        ],
    )
    blocks = [layer for layer in run["layers"] if any(layer in s["activation_drift"] for s in steps)]
    if blocks:
        out.append("activations: relative difference of the block's output on the probe, vs the start")
        out += table(headers, [[block] + [pct(s["activation_drift"].get(block)) for s in steps] for block in blocks])
    return out + [""]


SHOWN_SAMPLE_STEPS = 12


def _run_samples(run: dict) -> list[str]:
    """The samples a run drew at its evaluations, prompt by prompt, step by step: before and after."""
    drawn = run.get("curves", {}).get("samples") or []
    if not drawn:
        return []
    shown = evenly(drawn, SHOWN_SAMPLE_STEPS)
    first = drawn[-1]
    out = [
        f"== Samples while training: run {run['path']} (side {run['side']}; seed {first['seed']}, "
        f"{first['max_new_tokens']} new tokens, the same draw at every evaluation) =="
    ]
    if len(shown) < len(drawn):
        out.append(f"   {len(shown)} of {len(drawn)} evaluations shown; --json and --html have them all.")
    for number, prompt in enumerate(sample_prompts_of(drawn), 1):
        out.append(f"prompt {number}: {quoted(prompt, 60)}")
        rows = [[f"step {step}", one_line(text)] for step, text in samples_of(shown, prompt)]
        out += ["  " + line for line in table(["", "continuation"], rows, left=2)[2:]]
    return out + [""]


def samples_of(drawn: list[dict], prompt: str) -> list[tuple[int, str]]:
    """(step, continuation) of one prompt at each evaluation that sampled it."""
    return [(d["step"], s["text"]) for d in drawn for s in d["samples"] if s["prompt"] == prompt]


def sample_prompts_of(drawn: list[dict]) -> list[str]:
    """Every prompt sampled during a run, in the order first seen (a resumed run may add some)."""
    return list(dict.fromkeys(s["prompt"] for d in drawn for s in d["samples"]))


# ----- files ------------------------------------------------------------------------------


def check_new_file(path: str | os.PathLike, force: bool, reads: list[Path] = ()) -> Path:
    """Refuse to replace an existing file unless forced, a file the same command reads (`reads`)
    even when forced, and an output that cannot be written (a missing or read-only folder, a full
    disk), before any work is done: a temporary file is created in the folder and removed again."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"'{path}' is a directory; give a file name")
    check_replaceable(path)
    if path.exists() and any(_same_file(path, other) for other in reads):
        raise OutputError(
            f"'{path}' is one of this command's inputs; an output never replaces an input, even with --force: "
            "choose another name"
        )
    if path.exists() and not force:
        raise OutputError(f"'{path}' already exists; choose another name or pass --force to replace it")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputError(f"cannot write '{path}': '{path.parent}' {what}")
    try:  # a file with no name (O_TMPFILE): nothing is left behind, whenever a signal comes
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e} (in '{path.parent}')") from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def finite(value):
    """The result with every infinite or NaN float replaced by None: strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(result: dict) -> str:
    return json.dumps(finite(result), ensure_ascii=False, indent=1, allow_nan=False) + "\n"


def write_json(result: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """Every figure of the comparison as JSON (infinities as null), written atomically."""
    path = check_new_file(path, force)
    text = to_json(result)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def require_matplotlib():
    """matplotlib, or a `MiniGPT2Error` saying how to install it (it is an optional extra)."""
    try:
        import matplotlib
    except ImportError:
        raise MiniGPT2Error(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or install minigpt2 with its 'plot' extra: pip install -e \".[plot]\")"
        ) from None
    return matplotlib


def write_plot(result: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """A PNG of what a person looks at first, two panels a row: for a training run its learning
    curves (training loss, and each eval set in bits per character); the weights heatmap (every
    layer, the embeddings and final LayerNorm included); the activation drift per block (with
    --prompt); what it cost and gained: bits per character of A and B on each --text, or else on
    the run's own eval sets at its first and last evaluation; and how the weights and block
    outputs drifted over the steps. Panels with nothing to show are left out; an odd one out
    takes a whole row."""
    path = check_new_file(path, force)
    run = result["runs"][0] if result["runs"] else None
    curves = (run or {}).get("curves", {})
    panels = []  # functions (fig, ax, font) -> None, in reading order
    if curves.get("train") or curves.get("eval"):
        panels += [lambda fig, ax, font: _plot_train_loss(ax, run), lambda fig, ax, font: _plot_eval(ax, run, font)]
    heatmap = lambda fig, ax, font: _plot_heatmap(fig, ax, result)  # noqa: E731
    panels.append(heatmap)
    if result["activations"]:
        panels.append(lambda fig, ax, font: _plot_activations(ax, result, font))
    cost = cost_bars(result)
    if cost is not None:
        panels.append(lambda fig, ax, font: _plot_cost(ax, cost, font))
    for number, t in enumerate(result["behaviour"], 1):  # per text: which units, at which depth
        if t.get("layer_attribution"):
            panels += [lambda fig, ax, font, t=t, n=number: _plot_transplants(ax, t, n, font),
                       lambda fig, ax, font, t=t, n=number: _plot_lens(ax, t, n, font)]  # fmt: skip
    if run and run["steps"]:
        panels += [
            lambda fig, ax, font: _plot_steps(ax, run, "weight_drift", "weights: relative change per layer"),
            lambda fig, ax, font: _plot_steps(ax, run, "activation_drift", "block outputs on the probe: rel. diff"),
        ]
    rows = math.ceil(len(panels) / 2)
    with png_figure(path, rect=(0, 0, 1, 0.98), axes=False, figsize=(13, 5 * rows)) as (fig, _, font):
        grid = fig.add_gridspec(rows, 2)
        slot = 0  # the heatmap always starts a row; it takes the whole row when the panels do not pair up
        for draw in panels:
            row, col = divmod(slot, 2)
            wide = draw is heatmap and len(panels) % 2 == 1
            draw(fig, fig.add_subplot(grid[row, :] if wide else grid[row, col]), font)
            slot += 2 if wide else 1
        fig.suptitle(f"A = {result['a']['source']}   vs   B = {result['b']['source']}", fontsize=11)
    return path


def cost_bars(result: dict) -> dict | None:
    """What the plot's cost panel shows: bits per character of A and B on each --text, else on the
    run's eval sets at its first and last evaluation (from log.jsonl, measured as the training
    went); None when there is neither."""
    if result["behaviour"]:
        return {
            "title": "bits per character on each --text (lower is better)",
            "names": [Path(t["file"]).name for t in result["behaviour"]],
            "bars": {"A": [t["a"]["bits_per_char"] for t in result["behaviour"]],
                     "B": [t["b"]["bits_per_char"] for t in result["behaviour"]]},
        }  # fmt: skip
    run = next((r for r in result["runs"] if r.get("curves", {}).get("eval")), None)
    if run is None:
        return None
    sets = {name: points for name, points in run["curves"]["eval"].items() if points}
    first = min(points[0]["step"] for points in sets.values())
    last = max(points[-1]["step"] for points in sets.values())
    bars = {}
    for step in dict.fromkeys([first, last]):
        at = [next((p["bpc"] for p in points if p["step"] == step), math.nan) for points in sets.values()]
        bars[f"step {step}"] = at
    return {
        "title": f"run {run['side']}: bits per character on its eval sets (lower is better)",
        "names": list(sets),
        "bars": bars,
    }


def text_label(name: str, number: int, font: str | None, what: str = "text") -> str:
    """A name as a plot label: itself where it can be drawn, else a number (a Chinese name without
    a CJK font would be a row of empty boxes; `missing_font_note` says how to get one)."""
    return name if name.isascii() or font else f"{what} {number}"


def missing_font_note(result: dict, font: str | None) -> str | None:
    """One line for stderr when the plot had to number names it could not draw because no CJK font
    is installed (`font`, from `cjk_font()`, is None), saying how to get one; else None."""
    names = [t["file"] for t in result.get("behaviour", []) + result.get("texts", [])]
    names += [a["prompt"] for a in result.get("activations", [])]
    names += [n for r in result.get("runs", []) for n in r.get("curves", {}).get("eval", {})]
    if all(Path(n).name.isascii() for n in names):
        return None
    if font is not None:
        return f"the plot draws its Chinese names with the font '{font}'"
    return (
        "no installed font draws Chinese characters (matplotlib's 'Last Resort' font only draws boxes), so "
        "the plot numbers the names it cannot draw ('text 1', 'eval set 2'); install one and draw it again "
        "(Debian/Ubuntu: sudo apt-get install fonts-noto-cjk; Fedora: google-noto-sans-cjk-fonts; macOS and "
        "Windows have one). A font installed elsewhere than the usual folders: add it with "
        "matplotlib.font_manager.fontManager.addfont(PATH), or delete matplotlib's font list "
        "(fontlist-*.json in matplotlib.get_cachedir()) so that it is built again"
    )


@contextlib.contextmanager
def png_figure(path: Path, rect=(0, 0, 1, 1), axes: bool = True, **subplots):
    """(figure, axes, CJK font or None) for the block to draw in (`axes=False`: none, the block adds
    its own; `subplots` then only sizes the figure); then the figure is laid out
    (within `rect`), written to `path` atomically as a PNG, and closed, also when drawing fails.

    matplotlib runs without a display (Agg), and every text falls back to a CJK font where one
    is installed (`cjk_fallback`)."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit needed
    from matplotlib import pyplot as plt

    font = cjk_font()
    with cjk_fallback(matplotlib, font):  # for every text of the figure, until it is saved
        fig, axes = plt.subplots(**subplots) if axes else (plt.figure(**subplots), None)
        try:
            yield fig, axes, font
            with warnings.catch_warnings():  # without a CJK font, Chinese in a path shows as boxes
                warnings.filterwarnings("ignore", message="Glyph .* missing from font")
                fig.tight_layout(rect=rect)
                write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        finally:
            plt.close(fig)


CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "PingFang SC",
    "Heiti SC",
    "Microsoft YaHei",
    "SimHei",
    "Noto Sans CJK JP",
    "AR PL UMing CN",
)


CJK_PROBE = (0x4E2D, 0x56FD, 0x6587)  # 中 国 文: a font that draws Chinese has a glyph of its own for each
FONT_FOLDERS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
                "/System/Library/Fonts", "/Library/Fonts", "~/Library/Fonts", "C:/Windows/Fonts")  # fmt: skip


def draws_chinese(path: str | Path) -> bool:
    """The font file has real Chinese glyphs: 中, 国 and 文 map to three different glyphs. A font
    that only claims them (matplotlib's "Last Resort High-Efficiency" maps every character of a
    block to one placeholder box) does not count."""
    from matplotlib import ft2font

    try:
        charmap = ft2font.FT2Font(str(path)).get_charmap()
    except (OSError, RuntimeError, ValueError):
        return False
    glyphs = [charmap.get(c) for c in CJK_PROBE]
    return all(glyphs) and len(set(glyphs)) == len(glyphs)


def cjk_font(folders: tuple[str, ...] = FONT_FOLDERS) -> str | None:
    """An installed font that really draws Chinese (`draws_chinese`), or None: a well-known one by
    name first, else any in matplotlib's font list, else (a font installed since matplotlib cached
    its list) one found in the usual font folders, added to that list with the public `addfont`."""
    from matplotlib import font_manager

    fonts = font_manager.fontManager.ttflist
    by_rank = sorted(fonts, key=lambda f: CJK_FONTS.index(f.name) if f.name in CJK_FONTS else len(CJK_FONTS))
    for f in by_rank:
        if draws_chinese(f.fname):
            return f.name
    known = {f.fname for f in fonts}
    for folder in folders:
        found = sorted(Path(folder).expanduser().glob("**/*"))[:5000] if Path(folder).expanduser().is_dir() else []
        for path in sorted(found, key=_regular_first):  # a Bold file first made matplotlib warn at each label
            if path.suffix.lower() in (".ttf", ".otf", ".ttc") and str(path) not in known and draws_chinese(path):
                font_manager.fontManager.addfont(str(path))
                return font_manager.FontProperties(fname=str(path)).get_name()
    return None


def _regular_first(path: Path) -> tuple[int, str]:
    """Font files in the order to try them: a regular weight first (NotoSansCJK-Regular before -Bold)."""
    name = path.stem.lower()
    weighted = any(w in name for w in ("bold", "black", "heavy", "light", "thin", "medium", "semi", "demi"))
    return (0 if "regular" in name else 2 if weighted else 1, str(path))


def cjk_fallback(matplotlib, font: str | None):
    """Text drawn inside this context falls back to `font` for the glyphs matplotlib's own font
    lacks (Chinese), so every label, title and legend shows them; nothing changes without one."""
    return matplotlib.rc_context({"font.family": ["DejaVu Sans", font]}) if font else contextlib.nullcontext()


def prompt_label(number: int, prompt: str, font: str | None) -> str:
    """The legend entry of a prompt: its text, shortened, where it can be drawn; else its number
    (a Chinese prompt without a CJK font would be a row of empty boxes)."""
    if prompt.isascii() or font is not None:
        return f"prompt {number}: {quoted(prompt, 28)}"
    return f"prompt {number} (install a CJK font, e.g. fonts-noto-cjk, to see its text)"


def _plot_train_loss(ax, run: dict) -> None:
    train = run["curves"]["train"]
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="0.75", linewidth=0.8, label="each step")
        window, smooth = smoothed(losses)
        ax.plot(steps, smooth, color="tab:blue", label=f"mean of {window} steps" if window > 1 else "loss")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training step logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"run {run['side']}: training loss (nats per token)", fontsize=10)
    _step_axis(ax, [r["step"] for r in train])


def _plot_eval(ax, run: dict, font: str | None) -> None:
    evals = run["curves"]["eval"]
    for number, ((name, points), colour) in enumerate(zip(evals.items(), _colours(len(evals))), 1):
        ax.plot([p["step"] for p in points], [p["bpc"] for p in points], marker="o", color=colour,
                label=text_label(name, number, font, "eval set"))  # fmt: skip
    if evals:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluations in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"run {run['side']}: evaluation, bits per character (lower is better)", fontsize=10)
    _step_axis(ax, [p["step"] for points in evals.values() for p in points])


def _step_axis(ax, steps: list[int]) -> None:
    """An x-axis of whole steps; a run with one step logged (stopped early) gets a step either side
    instead of matplotlib's -0.045..0.045 around it."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps and min(steps) == max(steps):
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.grid(alpha=0.3)


def _plot_cost(ax, cost: dict, font: str | None) -> None:
    """Grouped bars: one group per text, one bar per model (or step), its value written on it."""
    names = [text_label(n, i, font) for i, n in enumerate(cost["names"], 1)]
    if len(cost["bars"]) == 2:  # the change, under each name: bars from 0 hide a small one
        (before, first), (after, last) = cost["bars"].items()
        names = [f"{n}\n{after} - {before}: {b - a:+.3f}" for n, a, b in zip(names, first, last)]
    width = 0.8 / len(cost["bars"])
    for k, ((label, values), colour) in enumerate(zip(cost["bars"].items(), _colours(len(cost["bars"])))):
        xs = [i + (k - (len(cost["bars"]) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, color=colour, label=label)
        ax.bar_label(bars, labels=[num(v, 3) for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("bits per character")
    ax.set_title(cost["title"], fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _plot_transplants(ax, t: dict, number: int, font: str | None) -> None:
    """Per unit, two bars: the share of the whole change its change brings on its own (A with B's
    unit) and the share B loses without it (B with A's unit put back)."""
    units = [s["unit"] for s in t["shares"]]
    for k, (key, label, colour) in enumerate((("alone", "A with B's unit", "tab:blue"),
                                              ("needed", "B with A's unit put back", "tab:orange"))):  # fmt: skip
        values = [100 * s[key] if math.isfinite(s[key]) else 0.0 for s in t["shares"]]
        ax.bar([i + (k - 0.5) * 0.4 for i in range(len(units))], values, 0.4, color=colour, label=label)
    step = max(1, len(units) // 16)
    ax.set_xticks(range(0, len(units), step), units[::step], fontsize=8, rotation=45)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(0, color="black", linewidth=0.8)
    base = t["transplant_base"]
    name = text_label(Path(t["file"]).name, number, font)
    ax.set_title(f"{name}: share of the change (bpc {num(base['a'], 3)} -> {num(base['b'], 3)}) per unit", fontsize=10)
    ax.set_ylabel("% of bpc A - bpc B")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _plot_lens(ax, t: dict, number: int, font: str | None) -> None:
    """The logit lens: bits per character read out after the embedding and after each block."""
    depths = ["emb", *(f"h.{i}" for i in range(len(t["logit_lens"]["a"]) - 1))]
    for side, colour in (("a", "tab:blue"), ("b", "tab:orange")):
        ax.plot(range(len(depths)), t["logit_lens"][side], marker="o", color=colour, label=side.upper())
    step = max(1, len(depths) // 16)
    ax.set_xticks(range(0, len(depths), step), depths[::step], fontsize=8)
    ax.set_title(f"{text_label(Path(t['file']).name, number, font)}: logit lens", fontsize=10)
    ax.set_xlabel("read out after")
    ax.set_ylabel("bits per character")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def smoothed(values: list[float]) -> tuple[int, list[float]]:
    """(window, running mean over the last `window` values): a noisy training loss made readable,
    the window a thirtieth of the curve."""
    window = max(1, len(values) // 30)
    return window, [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                    for i in range(len(values))]  # fmt: skip


def _colours(n: int) -> list:
    """n colours that can be told apart: tab10, then tab20 for more."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def heatmap_rows(result: dict) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column labels, values in %) of the weights heatmap: a row per block with a
    column per module kind, plus rows for the token and position embeddings and the final
    LayerNorm, and a last column with each row's pooled change (the only cell those three have)."""
    heat = result["weights"]["heatmap"]
    pooled = {r["layer"]: r["relative_change"] for r in result["weights"]["layers"]}
    kinds = list(heat["kinds"]) + ["(all)"]
    rows, values = [], []
    for layer in ["wte", "wpe", *heat["layers"], "ln_f"]:
        if layer in heat["layers"]:
            cells = list(heat["relative_change"][heat["layers"].index(layer)])
        else:
            cells = [None] * len(heat["kinds"])
        rows.append(layer)
        values.append(
            [100 * v if v is not None and math.isfinite(v) else float("nan") for v in [*cells, pooled.get(layer)]]
        )
    return rows, kinds, values


def _plot_heatmap(fig, ax, result: dict) -> None:
    layers, kinds, values = heatmap_rows(result)
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    step = max(1, len(layers) // 24)
    ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=8)
    ax.set_title("relative weight change ||A-B||/||A|| (%)", fontsize=10)
    if len(layers) <= 20:
        top = max((v for row in values for v in row if v == v), default=0)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(
                        j,
                        i,
                        f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if v > 0.6 * top else "white",
                    )
    fig.colorbar(image, ax=ax, fraction=0.046)


def _plot_activations(ax, result: dict, font: str | None) -> None:
    ax.set_title("activation drift per block: ||hA-hB||/||hA|| (%)", fontsize=10)
    for (number, act), colour in zip(enumerate(result["activations"], 1), _colours(len(result["activations"]))):
        ys = [100 * b["relative_diff"] if math.isfinite(b["relative_diff"]) else float("nan") for b in act["blocks"]]
        ax.plot(range(len(ys)), ys, marker="o", color=colour, label=prompt_label(number, act["prompt"], font))
    blocks = [b["block"] for b in result["activations"][0]["blocks"]]
    step = max(1, len(blocks) // 16)
    ax.set_xticks(range(0, len(blocks), step), blocks[::step], fontsize=8)
    ax.set_xlabel("block output")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_steps(ax, run: dict, key: str, title: str) -> None:
    steps = [s["step"] for s in run["steps"]]
    layers = [layer for layer in run["layers"] if any(layer in s[key] for s in run["steps"])]
    styles = ("-", "--", ":", "-.")
    for i, (layer, colour) in enumerate(zip(layers, _colours(len(layers)))):
        ys = [100 * s[key][layer] if s[key].get(layer) is not None else float("nan") for s in run["steps"]]
        ax.plot(
            steps,
            ys,
            color=colour,
            linestyle=styles[i // 10 % len(styles)],
            label=layer,
            marker="." if len(steps) < 30 else None,
        )
    ax.set_title(f"run {run['side']}: {title} since the start (%)", fontsize=10)
    _step_axis(ax, steps)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, ncol=2 if len(layers) > 8 else 1)


# ----- several models: the trade-off table and plot ---------------------------------------


def render_many(result: dict) -> str:
    """The trade-off of several models against A as one table: weights moved, bits per character on
    every text and its change from A (negative: better)."""
    headers, rows = tradeoff_rows(result)
    windows = " / ".join(map(str, sorted({s["window"] for m in result["models"] for s in m["behaviour"]})))
    out = [
        f"A: {result['a']['source']}",
        f"== Several models against A: bits per character on the first {result['max_eval_tokens']:,} tokens "
        f"(of A's tokenizer) of each text, in windows of {windows} tokens ==",
        "   weights moved = ||W - W_A|| / ||W_A|| over all tensors; max rank90 = the largest number of singular "
        "directions holding 90% of a matrix's update.",
    ]
    return "\n".join(out + table(headers, rows)) + "\n"


def tradeoff_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the several-models table: one row per model, A first."""
    names = [Path(t["file"]).name for t in result["texts"]]
    headers = ["model", "weights moved", "max rank90", *[f"bpc {n}" for n in names], *[f"vs A {n}" for n in names]]
    base = result["models"][0]["behaviour"]
    rows = []
    for model in result["models"]:
        w = model["weights"]
        rank = "-" if not w or w["max_rank_90"] is None else str(w["max_rank_90"])
        if w and w["lora_r"]:
            rank += f" (LoRA r={w['lora_r']})"
        bpc = [score["bits_per_char"] for score in model["behaviour"]]
        rows.append(
            [
                model["source"],
                pct(w["relative_change"]) if w else "(A)",
                rank,
                *[num(b) for b in bpc],
                *[f"{b - a['bits_per_char']:+.3f}" for b, a in zip(bpc, base)],
            ]
        )
    return headers, rows


def write_tradeoff_plot(result: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """A PNG: each model as a point, its change in bits per character on the first text (learned,
    to the left is better) against the second (forgotten, up is worse)."""
    path = check_new_file(path, force)
    texts = [Path(t["file"]).name for t in result["texts"]]
    base = result["models"][0]["behaviour"]
    with png_figure(path, figsize=(7, 5.5)) as (fig, ax, font):
        for model, colour in zip(result["models"], _colours(len(result["models"]))):
            delta = [m["bits_per_char"] - a["bits_per_char"] for m, a in zip(model["behaviour"], base)]
            x, y = delta[0], delta[1] if len(delta) > 1 else 0.0
            ax.scatter([x], [y], color=colour, s=60, zorder=3)
            name = "A" if model is result["models"][0] else Path(model["source"]).name or model["source"]
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.axvline(0, color="0.6", linewidth=0.8)
        label = [text_label(t, i, font) for i, t in enumerate(texts, 1)]
        ax.set_xlabel(f"change in bits per character on {label[0]} (learned: left is better)")
        ax.set_ylabel(f"change on {label[1]} (forgotten: up is worse)" if len(texts) > 1 else "")
        ax.set_title(f"against A = {result['a']['source']}", fontsize=10)
        ax.grid(alpha=0.3)
    return path
