"""The comparison as one self-contained HTML page: `compare.py A B --html report.html`.

Everything the terminal report and the PNG plot hold, in a file that opens anywhere and can be
mailed or attached to an issue: no network, no scripts, no external files (the charts are inline
SVG, the styles inline CSS), readable on a phone (the layout narrows to one column, wide tables
scroll sideways inside their box). It presents the figures of `minigpt2.analysis.compare`'s result and the
tables of `minigpt2.analysis.report`, computing nothing of its own.

Sections (each an element with this id): `summary`, `curves` (learning curves of a run),
`samples` (what a run wrote at each evaluation), `prompts` (activation drift per block and the
continuations of A and B side by side), `heatmap` (layer x module change), `weights` (the most
changed tensors, per layer, per module kind), `behaviour` (loss and bits per character on each
text), `layers` (transplants and logit lens per text), `where` (each text's characters shaded
by B's gain or loss, and the passages gained and lost), `drift` (over the training steps),
`tradeoff` (several models), `text` (the terminal report).
"""

from __future__ import annotations

import colorsys
import html
import math
import os
from pathlib import Path

from minigpt2.analysis.report import (
    BEHAVIOUR_COLUMNS,
    KIND_COLUMNS,
    LAYER_COLUMNS,
    TENSOR_COLUMNS,
    behaviour_rows,
    check_new_file,
    heatmap_rows,
    layer_rows,
    pct,
    render,
    render_many,
    sample_prompts_of,
    samples_of,
    smoothed,
    tensor_rows,
    tradeoff_rows,
)
from minigpt2.files import write_text_atomically
from minigpt2.text import visible

# matplotlib's tab10, so the page's colours match the PNG's (and need no matplotlib).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # fmt: skip
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # the heatmap's scale

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",
"PingFang SC","Microsoft YaHei",sans-serif;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:12px}
h1{font-size:1.35em;margin:.4em 0}h2{font-size:1.15em;margin:0 0 .5em}h3{font-size:1em;margin:.9em 0 .3em}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 14px;margin:12px 0}
.note{color:#5a6272;font-size:.9em;margin:.2em 0 .6em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th{background:#f0f2f5;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}
th.text{text-align:left}td.text{white-space:pre-wrap;text-align:left;min-width:14em;max-width:60em}
.heat td{text-align:center;min-width:3.6em;color:#fff}.heat td:first-child{color:#1d2330;text-align:left}
.heat td.light{color:#111}.heat td.none{background:#fafafa}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.card{border:1px solid #e3e6eb;border-radius:6px;padding:8px 10px;background:#fcfcfd;min-width:0}
.card h3{margin-top:0}
.sample{white-space:pre-wrap;word-break:break-word}
.prompt{font-weight:600;color:#2a4d8f}
svg{width:100%;max-width:480px;height:auto;display:block}
svg text{font-size:14px;fill:#333}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:.82em;margin:4px 0 0}
.legend span{white-space:nowrap}.legend i{display:inline-block;width:14px;height:3px;vertical-align:middle;
margin-right:4px}
details pre{font-size:12px;overflow-x:auto;background:#f6f7f9;padding:8px;border-radius:6px}
@media (max-width:600px){body{font-size:14px}main{padding:6px}section{padding:10px 8px}}
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


# ----- pieces -----------------------------------------------------------------------------


def html_table(headers: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = ()) -> str:
    """A table in a box that scrolls sideways on a narrow screen; `text_columns` wrap (samples)."""
    head = "".join(f"<th{' class=text' if i in text_columns else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=text' if i in text_columns else ''}>{esc(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )  # fmt: skip
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers spanning [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not high > low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def tick_label(value: float) -> str:
    return f"{value:.4g}"


def line_chart(series: list[tuple[str, list, list]], *, xlabel: str, ylabel: str, categories=None, dots=False) -> str:
    """An SVG line chart with an HTML legend under it. `series`: (label, xs, ys); a None or NaN y
    breaks the line. `categories`: labels for x = 0, 1, ... (block names) instead of numbers."""
    width, height, left, right, top, bottom = 480, 270, 56, 12, 10, 44
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not points:
        return '<p class="note">(nothing to draw)</p>'
    xs_all, ys_all = [p[0] for p in points], [p[1] for p in points]
    xticks = list(range(len(categories))) if categories else nice_ticks(min(xs_all), max(xs_all))
    yticks = nice_ticks(min(0.0, min(ys_all)) if min(ys_all) >= 0 else min(ys_all), max(ys_all))
    x0, x1 = (xticks[0], xticks[-1]) if not categories else (-0.3, len(categories) - 0.7)
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x1 + 1)
    y0, y1 = yticks[0], yticks[-1]

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(ylabel)} against {esc(xlabel)}">']
    for y in yticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e6e8ec"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    every = max(1, math.ceil(len(xticks) / 12))
    for i, x in enumerate(xticks):
        if i % every == 0:
            label = categories[x] if categories else tick_label(x)
            parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{esc(label)}</text>')
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#888"/>'
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>'
        f'<text transform="translate(13 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
        f"{esc(ylabel)}</text>"
    )
    legend = []
    colours = series_colours(len(series))
    for i, (label, xs, ys) in enumerate(series):
        colour, dash = colours[i], ""
        path, pen = [], "M"
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                pen = "M"
                continue
            path.append(f"{pen}{sx(x):.1f},{sy(y):.1f}")
            pen = "L"
            if dots:
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}"/>')
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>')
        if label:
            legend.append(f'<span><i style="background:{colour}"></i>{esc(label)}</span>')
    parts.append("</svg>")
    return "".join(parts) + (f'<div class="legend">{"".join(legend)}</div>' if legend else "")


def series_colours(n: int) -> list[str]:
    """`n` colours no two alike: matplotlib's tab10 (as the PNG) for up to 10 series, else `n` hues
    spread around the colour wheel, alternately darker and lighter (a drift chart's 14 layers: tab10
    and dashes made wte and h.8 look alike)."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    out = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb(i / n, 0.38 if i % 2 else 0.52, 0.75)
        out.append(f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}")
    return out


def heat_colour(value: float, top: float) -> tuple[str, bool]:
    """(CSS colour of a heatmap cell on the viridis scale, whether it is light: dark text on it)."""
    t = 0.0 if top <= 0 else min(max(value / top, 0.0), 1.0)
    i = min(int(t * (len(VIRIDIS) - 1)), len(VIRIDIS) - 2)
    f = t * (len(VIRIDIS) - 1) - i
    rgb = [round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1])]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", t > 0.6


def shown_text(text: str) -> str:
    """A generated text for the page: its line breaks kept, hidden characters spelled out (`visible`)."""
    return visible(text, newline="\n")


def section(ident: str, title: str, body: str, note: str = "") -> str:
    note = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{ident}"><h2>{esc(title)}</h2>{note}{body}</section>'


# ----- the sections of one comparison -----------------------------------------------------


def _summary(result: dict) -> str:
    c = result["config"]
    rows = []
    for side in ("a", "b"):
        info = result[side]
        where = f" (training run; its checkpoint {info['checkpoint']})" if info["run"] else ""
        rows.append(f"<p><b>{side.upper()}</b>: {esc(info['source'])}{esc(where)}</p>")
    rows.append(
        f'<p class="note">architecture: {c["n_layer"]} layers, width {c["n_embd"]}, {c["n_head"]} heads, '
        f"vocabulary {c['vocab_size']}, context {c['n_positions']}</p>"
    )
    return section("summary", "What is compared", "".join(rows), "A is the reference (before), B the model after.")


def _curves(run: dict) -> str:
    curves = run.get("curves") or {}
    train, evals = curves.get("train") or [], curves.get("eval") or {}
    if not train and not evals:
        return ""
    cards = []
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        window, smooth = smoothed(losses)
        series = [("each step", steps, losses), (f"mean of {window} steps" if window > 1 else "loss", steps, smooth)]
        chart = line_chart(series, xlabel="step", ylabel="loss (nats per token)")
        cards.append(f'<div class="card"><h3>training loss</h3>{chart}</div>')
    if evals:
        series = [(name, [p["step"] for p in pts], [p["bpc"] for p in pts]) for name, pts in evals.items()]
        chart = line_chart(series, xlabel="step", ylabel="bits per character", dots=True)
        cards.append(f'<div class="card"><h3>evaluation: bits per character (lower is better)</h3>{chart}</div>')
    return section(
        f"curves-{run['side']}", f"Learning curves: run {run['path']}", f'<div class="grid">{"".join(cards)}</div>',
        curves.get("note") or "",
    )  # fmt: skip


def _samples(run: dict) -> str:
    drawn = (run.get("curves") or {}).get("samples") or []
    if not drawn:
        return ""
    last = drawn[-1]
    cards = []
    for number, prompt in enumerate(sample_prompts_of(drawn), 1):
        rows = [[f"step {step}", shown_text(text)] for step, text in samples_of(drawn, prompt)]
        cards.append(
            f'<div class="card"><h3>prompt {number}: <span class="prompt">{esc(prompt)}</span></h3>'
            f"{html_table(['', 'continuation'], rows, text_columns=(1,))}</div>"
        )
    note = (f"the same seed ({last['seed']}) and {last['max_new_tokens']} new tokens at every evaluation, so what "
            "changes from row to row is the model")  # fmt: skip
    return section(f"samples-{run['side']}", f"Samples while training: run {run['path']}", "".join(cards), note)


def _prompts(result: dict) -> str:
    acts = result["activations"]
    if not acts:
        return ""
    series = [
        (f"prompt {i}", list(range(len(a["blocks"]))), [100 * b["relative_diff"] for b in a["blocks"]])
        for i, a in enumerate(acts, 1)
    ]
    blocks = [b["block"] for b in acts[0]["blocks"]]
    parts = [
        '<div class="card"><h3>activation drift per block: ||hA-hB|| / ||hA|| (%)</h3>'
        + line_chart(series, xlabel="block output", ylabel="%", categories=blocks, dots=True)
        + "</div>"
    ]
    for i, a in enumerate(acts, 1):
        top = {side: ", ".join(f"'{t['text']}' {pct(t['prob'])}" for t in a[f"top5_{side}"]) for side in "ab"}
        body = [f"<h3>prompt {i}: <span class=prompt>{esc(a['prompt'])}</span></h3>",
                f'<p class="note">{a["tokens"]} tokens; next token: KL(A||B) = {a["kl_a_b"]:.4g} nats</p>']  # fmt: skip
        cells = []
        for side in ("a", "b"):
            text = a.get(f"continuation_{side}")
            shown = ""
            if text is not None:
                shown = f'<p class="sample"><span class="prompt">{esc(a["prompt"])}</span>{esc(shown_text(text))}</p>'

            cells.append(
                f'<div class="card"><h3>{side.upper()}</h3>{shown}'
                f'<p class="note">top-5 next: {esc(top[side])}</p></div>'
            )
        body.append(f'<div class="grid">{"".join(cells)}</div>')
        parts.append("".join(body))
    note = "continuations drawn with the same seed for A and B" if result.get("sample_tokens") else ""
    return section("prompts", "Prompts: A and B side by side", "".join(parts), note)


def _heatmap(result: dict) -> str:
    layers, kinds, values = heatmap_rows(result)
    top = max((v for row in values for v in row if v == v), default=0.0)
    head = "<th>layer</th>" + "".join(f"<th>{esc(k)}</th>" for k in kinds)
    rows = []
    for layer, row in zip(layers, values):
        cells = []
        for v in row:
            if v != v:
                cells.append('<td class="none"></td>')
            else:
                colour, light = heat_colour(v, top)
                cells.append(f'<td{" class=light" if light else ""} style="background:{colour}">{v:.2g}</td>')
        rows.append(f"<tr><td>{esc(layer)}</td>{''.join(cells)}</tr>")
    table = f'<table class="heat"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    body = f'<div class="scroll">{table}</div>'
    return section("heatmap", "Where the weights moved: relative change ||A-B|| / ||A|| (%)", body,
                   "a row per layer, a column per module kind; (all) pools the whole layer")  # fmt: skip


def _weights(result: dict, top: int) -> str:
    w = result["weights"]
    lora = w.get("lora")
    ranked = sorted(
        (t for t in w["tensors"] if not math.isinf(t["relative_change"])), key=lambda t: -t["relative_change"]
    )
    layers, kinds = layer_rows(w)
    body = (f"<h3>the {min(top, len(ranked))} most changed of {len(w['tensors'])} tensors</h3>"
            + html_table(TENSOR_COLUMNS, tensor_rows(ranked[:top], set(lora["adapted"]) if lora else set()))
            + "<h3>per layer (its tensors pooled)</h3>" + html_table(LAYER_COLUMNS, layers)
            + "<h3>per module kind (pooled over the layers)</h3>" + html_table(KIND_COLUMNS, kinds))  # fmt: skip
    note = ("rank90 = singular directions holding 90% of ||A-B||²; stable rank = ||A-B||_F² / ||A-B||_2²"
            + ("; * marks the LoRA-adapted tensors" if lora else ""))  # fmt: skip
    return section("weights", "Weights", body, note)


def _behaviour(result: dict) -> str:
    if not result["behaviour"]:
        return ""
    return section("behaviour", "Behaviour on text", html_table(BEHAVIOUR_COLUMNS, behaviour_rows(result)),
                   f"first {result['max_eval_tokens']} tokens at most; loss = nats per token; bpc = bits per "
                   "character, comparable across languages")  # fmt: skip


# ----- which units, at which depth, where in the text (minigpt2.analysis.causal) -------------


def share_bar(share: float, colour: str, top: float) -> str:
    """A share of the change as a bar in a table cell: 0 in the middle, +-`top` at the ends."""
    if not math.isfinite(share):
        return ""
    half = min(abs(share) / top, 1.0) * 50
    left = 50 if share >= 0 else 50 - half
    return (f'<div style="position:relative;height:10px;width:9em;background:#f0f2f5">'
            f'<div style="position:absolute;left:50%;top:0;bottom:0;border-left:1px solid #888"></div>'
            f'<div style="position:absolute;left:{left:.1f}%;width:{half:.1f}%;top:1px;bottom:1px;'
            f'background:{colour}"></div></div>')  # fmt: skip


def _layers(result: dict) -> str:
    """Per text: the transplants as a table with bars, and the logit lens as two curves."""
    parts = []
    for t in result["behaviour"]:
        if not t.get("layer_attribution"):
            continue
        base = t["transplant_base"]
        top = max([1.0, *(abs(s[k]) for s in t["shares"] for k in ("alone", "needed") if math.isfinite(s[k]))])
        rows = "".join(
            f"<tr><td>{esc(r['unit'])}</td><td>{r['bpc_a_with_b']:.4g}</td><td>{esc(pct(s['alone']))}</td>"
            f"<td>{share_bar(s['alone'], PALETTE[0], top)}</td><td>{r['bpc_b_with_a']:.4g}</td>"
            f"<td>{esc(pct(s['needed']))}</td><td>{share_bar(s['needed'], PALETTE[1], top)}</td></tr>"
            for r, s in zip(t["layer_attribution"], t["shares"])
        )
        head = "".join(f"<th>{h}</th>" for h in ("unit", "A with B's", "alone", "", "B with A's", "needed", ""))
        lens = t["logit_lens"]
        depths = ["emb", *(f"h.{i}" for i in range(len(lens["a"]) - 1))]
        xs = list(range(len(depths)))
        chart = line_chart([("A", xs, lens["a"]), ("B", xs, lens["b"])], xlabel="read out after",
                           ylabel="bits per character", categories=depths, dots=True)  # fmt: skip
        parts.append(
            f"<h3>{esc(Path(t['file']).name)}: bpc {base['a']:.4g} (A) &rarr; {base['b']:.4g} (B)</h3>"
            '<div class="grid">'
            f'<div class="card"><div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
            f'</table></div></div><div class="card"><h3>logit lens</h3>{chart}</div></div>'
        )
    note = (
        "alone: the share of the whole change (bpc A - bpc B) that A gets with B's unit; needed: the share B "
        "loses with A's unit put back. Over 100%: the unit does more than the whole change (others undo part "
        "of it); below 0: it works against it. The logit lens reads the prediction out after each block."
    )
    return section("layers", "Which units carry the change, at which depth", "".join(parts), note) if parts else ""


def shade(delta: float, top: float) -> str:
    """A character's background: green where B gained (fewer bits than A), red where it lost, its
    strength in 6 steps up to `top` bits (light enough to read the character on it)."""
    level = min(round(6 * abs(delta) / top), 6) if top > 0 else 0
    if level == 0:
        return ""
    rgb = "40,160,70" if delta < 0 else "215,50,40"
    return f"background:rgba({rgb},{0.08 * level:.2f})"


def _where(result: dict) -> str:
    """Per text: an excerpt with every character shaded by B's gain or loss on it, and the passages
    of the whole scored text B gained most and lost most on."""
    parts = []
    for t in result["behaviour"]:
        changes = t.get("changes")
        if not changes or not changes["excerpt"]["text"]:
            continue
        text, delta = changes["excerpt"]["text"], changes["excerpt"]["delta_bits"]
        magnitudes = sorted(abs(d) for d in delta)
        top = magnitudes[int(0.95 * (len(magnitudes) - 1))] or magnitudes[-1]  # a few extremes do not wash it out
        spans, run, style = [], [], None
        for ch, d in zip(text, delta):
            this = shade(d, top)
            if this != style and run:
                spans.append(f'<span style="{style}">{esc("".join(run))}</span>' if style else esc("".join(run)))
                run = []
            style = this
            run.append(ch)
        if run:
            spans.append(f'<span style="{style}">{esc("".join(run))}</span>' if style else esc("".join(run)))
        rows = [[f"{p['delta_bits']:+.1f}", " ".join(p["text"].split())]
                for key in ("gained", "lost") for p in changes["passages"][key]]  # fmt: skip
        parts.append(
            f"<h3>{esc(Path(t['file']).name)}</h3>"
            f'<div style="white-space:pre-wrap;line-height:1.9;word-break:break-word;max-height:24em;overflow-y:auto;'
            f'border:1px solid #eceef2;padding:6px">{"".join(spans)}</div>'
            + html_table(["bits B - A", "passage (gained most, then lost most)"], rows, text_columns=(1,))
        )
    note = ("each character shaded by B's loss minus A's on it: green where B predicts it better, red where "
            "worse (full strength: the 95th percentile of the excerpt's changes, in bits)")  # fmt: skip
    return section("where", "Where in the text B gained and lost", "".join(parts), note) if parts else ""


def _drift(run: dict) -> str:
    steps = run["steps"]
    if not steps:
        return ""
    cards = []
    for key, title in (
        ("weight_drift", "weights: relative change per layer since the start (%)"),
        ("activation_drift", "block outputs on the probe: relative difference since the start (%)"),
    ):
        layers = [layer for layer in run["layers"] if any(layer in s[key] for s in steps)]
        if not layers:
            continue
        series = [
            (
                layer,
                [s["step"] for s in steps],
                [None if s[key].get(layer) is None else 100 * s[key][layer] for s in steps],
            )
            for layer in layers
        ]
        chart = line_chart(series, xlabel="step", ylabel="%", dots=len(steps) < 30)
        cards.append(f'<div class="card"><h3>{esc(title)}</h3>{chart}</div>')
    probe = f"; probe: {run['probe']}" if run.get("probe") else ""
    return section(
        f"drift-{run['side']}",
        f"Drift over the steps: run {run['path']}",
        f'<div class="grid">{"".join(cards)}</div>',
        f"side {run['side']}{probe}",
    )


def _text(report: str) -> str:
    return section("text", "The terminal report", f"<details><summary>show</summary><pre>{esc(report)}</pre></details>")


def page(title: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1>{''.join(s for s in sections if s)}</main></body></html>\n")  # fmt: skip


def render_html(result: dict, top: int = 10) -> str:
    """The page for a `compare` result (or a `compare_many` one: the trade-off table and chart)."""
    if "models" in result:
        return _many(result)
    runs = result["runs"]
    sections = [_summary(result)]
    for run in runs:
        sections += [_curves(run), _samples(run)]
    sections += [_prompts(result), _heatmap(result), _weights(result, top), _behaviour(result)]
    sections += [_layers(result), _where(result)]
    sections += [_drift(run) for run in runs]
    sections.append(_text(render(result, top=top)))
    return page(f"minigpt2: {result['a']['source']} vs {result['b']['source']}", sections)


def _many(result: dict) -> str:
    headers, rows = tradeoff_rows(result)
    base = result["models"][0]["behaviour"]
    body = html_table(headers, rows)
    if len(result["texts"]) > 1:
        series = []
        for model in result["models"]:
            delta = [m["bits_per_char"] - a["bits_per_char"] for m, a in zip(model["behaviour"], base)]
            series.append((Path(model["source"]).name or model["source"], [delta[0]], [delta[1]]))
        names = [Path(t["file"]).name for t in result["texts"]]
        body += (
            '<div class="card">'
            + line_chart(
                series,
                xlabel=f"change in bpc on {names[0]} (left: learned)",
                ylabel=f"change on {names[1]} (up: forgotten)",
                dots=True,
            )
            + "</div>"
        )
    sections = [
        section(
            "tradeoff",
            "Several models against A",
            body,
            "bits per character on each text and the change from A (negative: better)",
        ),
        _text(render_many(result)),
    ]
    return page(f"minigpt2: several models against {result['a']['source']}", sections)


def write_html(result: dict, path: str | os.PathLike, force: bool = False, top: int = 10) -> Path:
    """The page, written atomically (an existing file only with `force`)."""
    path = check_new_file(path, force)
    write_text_atomically(path, render_html(result, top))
    return path
