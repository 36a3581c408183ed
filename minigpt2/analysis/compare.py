"""What fine-tuning changed in a GPT-2, where, and what it cost.

A common first attempt at "did fine-tuning change the model?" takes one weight matrix before and
after, computes five numbers — mean |A - B|, max |A - B|, the standard deviation of A - B, the mean
row-wise cosine similarity and the mean row-wise Euclidean distance — sees a cosine of 0.9998 and
concludes that the model "did not really learn much". Those numbers cannot say *which* layers
moved, whether a small change is *structured* (a few directions, as fine-tuning updates usually
are) or noise, what the change *does* to the model's computation, or how the model now fares on
the new text versus the old. This module answers those four questions:

1. **Weights** (`compare_weights`): every tensor of two checkpoints, streamed one at a time from
   their safetensors files, with the five numbers above plus the ones that answer the question:
   the relative change ||A - B|| / ||A|| (a cosine of 0.9998 is a relative change of about 2%,
   which for a 768-wide matrix is a large, deliberate move) and, for matrices, the *structure* of
   the update D = A - B: its stable rank ||D||_F^2 / ||D||_2^2 and how many singular directions
   hold 90% of ||D||_F^2. A low-rank update is a learned change, not noise.
2. **Activations** (`compare_activations`): forward hooks on every block record the hidden states
   of both models on a prompt; where they start to differ shows which layer's change matters.
   At the output, the KL divergence of the next-token distributions and each model's top-5.
3. **Behaviour** (`score_model`, by `minigpt2.model.evaluate`'s protocol, which the trainer's log shares):
   loss, perplexity and bits per character of each model on a text file — the new data (did it
   learn?) and the old (did it forget?).
4. **Training runs** (`read_run`, `run_drift`): how each layer's drift grew over the steps, from
   the snapshots the trainer wrote.

`compare` does all four and returns one plain dict (JSON-ready, every figure in it);
`minigpt2.analysis.report` turns that dict into a terminal report and a plot.

Orientation. Metrics are computed on the tensors *as the official checkpoint stores them*. The
four Conv1D weights (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are stored (in, out),
the transpose of minigpt2's `nn.Linear` (out, in) — see `minigpt2.io.weights`. Whole-tensor figures
(relative change, stable rank, ...) do not depend on orientation, but the row-wise cosine and
distance do: for those four weights a "row" is one *input* feature's outgoing weights.

Memory. Weights are never held as two full models: one tensor of A and the same tensor of B are
read, compared in float64 and dropped. Activations and behaviour need real forward passes, so
model A is loaded, run on every prompt and text, and freed before B is loaded: peak memory is one
model plus its small recorded outputs, so two `gpt2-xl` checkpoints compare on a 24 GB machine.

Precision. Every metric is computed in float64 from the stored values, and the degenerate cases
are defined rather than left to 0/0: identical checkpoints give exactly 0 differences, cosine 1,
stable rank 0 and rank 0, never NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from minigpt2.analysis import DEFAULT_LAYER_TOKENS, DEFAULT_MAX_EVAL_TOKENS
from minigpt2.analysis.causal import Progress, layer_sections, text_changes
from minigpt2.analysis.runlog import read_records, skipped_note, snapshot_shape
from minigpt2.checks import MAX_NEW_TOKENS, integer, positive_int
from minigpt2.device import resolve_device
from minigpt2.errors import CheckpointError, MiniGPT2Error, OptionError
from minigpt2.files import read_text_file
from minigpt2.generation import SAMPLE_SEED, SAMPLE_TOKENS
from minigpt2.generation.sampling import draw_samples, encode_prompt
from minigpt2.generation.utf8 import Utf8Guard
from minigpt2.io.adapter import adapted_tensors
from minigpt2.io.runs import LOG, RUN_JSON, SNAPSHOTS, RunFolder
from minigpt2.io.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_fingerprint
from minigpt2.io.weights import (
    MASK_BUFFERS,
    PREFIX,
    checkpoint_config,
    checkpoint_files,
    get_tensor,
    load_model,
    local_path,
    match_keys,
    official_shapes,
    open_safetensors,
    read_checkpoint_config,
    read_header,
)
from minigpt2.model.config import GPTConfig
from minigpt2.model.evaluate import (
    Score,
    char_counts,
    check_enough_text,
    count_characters,
    same_text_stream,
    score_text,
    text_stream,
)
from minigpt2.model.snapshots import capture_block_outputs, hidden_drift, run_drift, tensor_kind

ORIENTATION = (
    "tensors as the official checkpoint stores them: the Conv1D weights attn.c_attn, attn.c_proj, "
    "mlp.c_fc and mlp.c_proj are (in, out), so their row-wise cosine and distance are per input feature"
)
BLOCK_KINDS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
ENERGY = 0.9  # "rank for 90% energy": singular directions holding this share of ||A - B||_F^2


# ----- one pair of tensors ----------------------------------------------------------------


CHUNK_ELEMENTS = 1 << 22  # float64 entries per chunk: 32 MB, so wte's diff never exists whole


def _chunk_sums(rows_a: torch.Tensor, rows_b: torch.Tensor, tall: bool) -> dict:
    """`tensor_metrics`' running sums over chunks of rows, in float64: |D|'s sum and max, the row
    cosines' and distances' sums, ||A||² and ||D||², D's count, mean and sum of squared deviations
    (chunks combined with Chan's formula) and, for a tall matrix, the Gram matrix DᵀD."""
    n_rows, n_cols = rows_a.shape
    gram = torch.zeros(n_cols, n_cols, dtype=torch.float64) if tall else None
    count, mean, m2 = 0, 0.0, 0.0  # running count, mean and sum of squared deviations of D
    abs_sum = abs_max = cos_sum = dist_sum = sq_a = sq_d = 0.0
    step = max(1, CHUNK_ELEMENTS // n_cols)
    for i in range(0, n_rows, step):
        ca = rows_a[i : i + step].to(torch.float64)  # (r, cols)
        cb = rows_b[i : i + step].to(torch.float64)
        cd = ca - cb
        row_dist = torch.linalg.vector_norm(cd, dim=1)  # (r,)
        row_a = torch.linalg.vector_norm(ca, dim=1)  # (r,)
        cosine = row_cosine(ca, cb, row_a, torch.linalg.vector_norm(cb, dim=1))  # (r,)
        cosine = torch.where(row_dist == 0, torch.ones_like(cosine), cosine.clamp(-1.0, 1.0))
        cos_sum += cosine.sum().item()
        dist_sum += row_dist.sum().item()
        sq_d += (row_dist * row_dist).sum().item()
        sq_a += (row_a * row_a).sum().item()
        abs_sum += torch.linalg.vector_norm(cd, ord=1).item()  # sum |d|, without a temporary |D|
        abs_max = max(abs_max, torch.linalg.vector_norm(cd, ord=math.inf).item())
        n = cd.numel()
        var, chunk_mean = (v.item() for v in torch.var_mean(cd, correction=0))
        delta = chunk_mean - mean
        m2 += var * n + delta * delta * count * n / (count + n)
        mean += delta * n / (count + n)
        count += n
        if tall:
            gram += cd.T @ cd  # (cols, cols)
        del ca, cb, cd
    return {"count": count, "m2": m2, "abs_sum": abs_sum, "abs_max": abs_max, "cos_sum": cos_sum,
            "dist_sum": dist_sum, "sq_a": sq_a, "sq_d": sq_d, "gram": gram}  # fmt: skip


def tensor_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | int | None]:
    """Every figure for one tensor, A (the reference) against B, in float64.

    The five numbers of the motivating experiment, exactly as it computed them (on D = A - B):
    `mean_abs_diff` = mean |D|, `max_abs_diff` = max |D|, `std_diff` = D.std() (PyTorch's
    default, with Bessel's n - 1), `mean_row_cosine` = mean of F.cosine_similarity(A, B, dim=1)
    (as `row_cosine` computes it), `mean_row_distance` = mean of torch.norm(A - B, dim=1). A 1-D
    tensor (a bias, a LayerNorm scale) counts as a single row.

    Then what answers "how much did it move": `relative_change` = ||D||_F / ||A||_F (infinite
    when A is all zeros and B is not, 0 when both are equal), and for matrices `stable_rank` and
    `rank_90` (see `update_structure`).

    Rows that are exactly equal have cosine 1 even when they are zero; a zero row against a
    non-zero one has cosine 0 (PyTorch's convention). So identical tensors give cosine 1 exactly,
    not 1 ± rounding.

    The rows are processed in chunks of about 4M entries: the float64 copies of the (50257, 768)
    token embedding and its difference would otherwise take 1.2 GB on top of the model. Each
    chunk adds to running sums (the standard deviation combines chunks with Chan's formula, as
    exact as a two-pass computation) and, for a tall matrix, to the Gram matrix DᵀD.
    """
    rows_a = a.detach() if a.dim() == 2 else a.detach().reshape(1, -1)  # (rows, cols)
    rows_b = b.detach() if b.dim() == 2 else b.detach().reshape(1, -1)
    n_rows, n_cols = rows_a.shape
    tall = a.dim() == 2 and n_rows >= n_cols
    sums = _chunk_sums(rows_a, rows_b, tall)
    count, m2, sq_a, sq_d, gram = sums["count"], sums["m2"], sums["sq_a"], sums["sq_d"], sums["gram"]
    norm_d, norm_a = math.sqrt(sq_d), math.sqrt(sq_a)
    relative = 0.0 if norm_d == 0.0 else (math.inf if norm_a == 0.0 else norm_d / norm_a)
    out: dict[str, float | int | None] = {
        "mean_abs_diff": sums["abs_sum"] / count,
        "max_abs_diff": sums["abs_max"],
        "std_diff": math.sqrt(m2 / (count - 1)) if count > 1 else 0.0,
        "mean_row_cosine": sums["cos_sum"] / n_rows,
        "mean_row_distance": sums["dist_sum"] / n_rows,
        "relative_change": relative,
        "norm_a": norm_a,
        "norm_diff": norm_d,
        "stable_rank": None,
        "rank_90": None,
    }
    if a.dim() == 2:
        if not tall:  # a wide matrix (in < out, like c_fc): DDᵀ is the small Gram, and D is small
            d = rows_a.to(torch.float64) - rows_b.to(torch.float64)
            gram = d @ d.T  # (rows, rows)
        out.update(update_structure(gram, sq_d))
    return out


def row_cosine(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, as `torch.nn.functional.cosine_similarity(a, b, dim=1)` defines
    it (each norm clamped at eps = 1e-8), reusing row norms that are computed anyway: one pass
    for the dot products instead of F.cosine_similarity's normalised copies of both inputs."""
    dot = torch.einsum("ij,ij->i", a, b)  # (rows,)
    return dot / (norm_a.clamp_min(1e-8) * norm_b.clamp_min(1e-8))


def update_structure(gram: torch.Tensor, energy: float) -> dict[str, float | int]:
    """How many directions a matrix update D really uses, from its Gram matrix.

    - `stable_rank` = ||D||_F^2 / ||D||_2^2 = sum(s_i^2) / max(s_i^2): 1 for a rank-1 update, the
      full rank for white noise, and never thrown off by tiny singular values the way the
      ordinary rank is.
    - `rank_90` = the smallest k whose top-k singular values hold 90% of ||D||_F^2.
    Both are 0 for D = 0. `energy` is ||D||_F^2, summed from D itself.

    The squared singular values s_i^2 of D are the eigenvalues of its Gram matrix DᵀD (or DDᵀ,
    whichever is smaller): for the (50257, 768) token embedding that is a 768 x 768 symmetric
    eigenproblem instead of an SVD of the whole matrix, several times faster. In float64 the
    eigenvalues are accurate to about 1e-16 of the largest, far below the 10% energy threshold.

    The eigensolver runs on one thread: MKL's multithreaded `syevd` on 768 x 768 took 2-10 s
    instead of 0.05 s on a busy 2-core machine (threads waiting for each other), so the thread
    count is lowered for this call and restored after it.
    """
    if energy == 0.0:
        return {"stable_rank": 0.0, "rank_90": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s2 = torch.linalg.eigvalsh(gram / energy).clamp(min=0.0).flip(0)  # s_i^2 / ||D||^2, largest first
    finally:
        torch.set_num_threads(threads)
    top = s2[0].item()
    # The tolerance keeps an exact rank-r update (energy split so the top r hold 100%) at rank r
    # despite rounding in the last place of the cumulative sum.
    reached = torch.cumsum(s2, 0) >= ENERGY * (1 - 1e-12)
    rank = int(torch.nonzero(reached)[0].item()) + 1 if reached.any() else int(s2.numel())
    return {"stable_rank": 1.0 / top if top > 0 else 0.0, "rank_90": rank}


# ----- checkpoints: shapes, names, streaming ----------------------------------------------


def _architecture_mismatch(config_a: GPTConfig, config_b: GPTConfig, both_have_config: bool) -> list[str]:
    fields = [("vocab_size", "vocab"), ("n_positions", "context"), ("n_layer", "layers"), ("n_embd", "width")]
    if both_have_config:  # a bare .safetensors file only *guesses* its head count (width / 64)
        fields.append(("n_head", "heads"))
    return [
        f"{label} {getattr(config_a, field)} vs {getattr(config_b, field)}"
        for field, label in fields
        if getattr(config_a, field) != getattr(config_b, field)
    ]


def compare_weights(a_source: str, b_source: str, *, revision: str | None = None, progress: Progress = None) -> dict:
    """Every tensor of A against the same tensor of B, streamed from the two safetensors files.

    Both checkpoints are first checked to have the same architecture (vocabulary, context, layer
    count, width) and every tensor a GPT-2 of that shape needs; all the problems found, on either
    side, go into one `CheckpointError`. Then tensors are read one pair at a time, so memory holds
    a few tensors, never a second model. `lm_head` is not compared: it is tied to `wte`.

    Returns {"config", "tensors": [per tensor: name, layer, kind, shape, and `tensor_metrics`],
    "layers", "kinds", "heatmap"} — see `summarise`. `progress` hears of every tensor (see `Progress`).
    """
    files = {side: checkpoint_files(src, revision) for side, src in (("A", a_source), ("B", b_source))}
    stored, configs = {}, {}
    for side, (config_path, weights_path) in files.items():
        with open_safetensors(weights_path) as f:  # the header only: names, shapes
            stored[side] = read_header(f, weights_path)
        configs[side] = checkpoint_config(config_path, stored[side], weights_path)

    # A grown vocabulary (vocab.py) adds rows after the shared ones: compare those, summarise the rest.
    shared_vocab = min(configs["A"].vocab_size, configs["B"].vocab_size)
    mismatch = _architecture_mismatch(
        dataclasses.replace(configs["A"], vocab_size=shared_vocab),
        dataclasses.replace(configs["B"], vocab_size=shared_vocab),
        both_have_config=all(config is not None for config, _ in files.values()),
    )
    if mismatch:
        raise CheckpointError(
            f"A and B have different architectures ({'; '.join(mismatch)}): A = {a_source}, B = {b_source}. "
            "Weights can only be compared between checkpoints of the same shape."
        )
    expected = official_shapes(dataclasses.replace(configs["A"], vocab_size=shared_vocab))
    keys, problems = {}, []
    for side, (_, weights_path) in files.items():
        try:
            keys[side] = match_keys(stored[side], official_shapes(configs[side]), weights_path)
        except CheckpointError as e:
            problems.append(f"{side}: {e}")
    if problems:
        raise CheckpointError(" / ".join(problems))

    tensors, new_rows = [], None
    for i, (name, shape) in enumerate(expected.items()):
        _tell(progress, "comparing the weights", i, len(expected), "tensors")
        a = _read_tensor(files["A"][1], keys["A"][name])
        b = _read_tensor(files["B"][1], keys["B"][name])
        if name == "wte.weight" and a.shape != b.shape:
            extra = (a if len(a) > len(b) else b)[shared_vocab:]  # (new rows, C)
            new_rows = {
                "side": "A" if len(a) > len(b) else "B",
                "count": len(extra),
                "mean_norm": torch.linalg.vector_norm(extra.float(), dim=1).mean().item(),
            }
            a, b = a[:shared_vocab], b[:shared_vocab]
        layer, kind = tensor_kind(name)
        tensors.append({"name": name, "layer": layer, "kind": kind, "shape": list(shape), **tensor_metrics(a, b)})
        del a, b
    _tell(progress, "comparing the weights", len(expected), len(expected), "tensors")
    result = {"config": _config_dict(configs["A"]), "tensors": tensors, **summarise(tensors, configs["A"].n_layer)}
    return result | ({"new_rows": new_rows} if new_rows is not None else {})


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file, opening and closing the file around it.

    safetensors memory-maps the file, and every page read stays resident (and counted in the
    process's memory) until the map is closed. Reopening per tensor (the header is a few KB of
    JSON) keeps at most one tensor's pages mapped, instead of both checkpoints whole.
    """
    with open_safetensors(path) as f:
        return get_tensor(f, key, path)


def _config_dict(config: GPTConfig) -> dict:
    return {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")}


def _pooled(rows: list[dict]) -> dict:
    """Relative change of several tensors taken together: sqrt(sum ||D||^2) / sqrt(sum ||A||^2)."""
    norm_d = math.sqrt(sum(r["norm_diff"] ** 2 for r in rows))
    norm_a = math.sqrt(sum(r["norm_a"] ** 2 for r in rows))
    relative = 0.0 if norm_d == 0 else (math.inf if norm_a == 0 else norm_d / norm_a)
    return {"relative_change": relative, "norm_diff": norm_d, "norm_a": norm_a}


def summarise(tensors: list[dict], n_layer: int) -> dict:
    """Per-layer, per-module-kind and (layer x kind) summaries of the per-tensor figures.

    A module's or layer's relative change pools its tensors (weights and biases together):
    ||all of D|| / ||all of A||, the same figure as if they were one long vector. Averaging the
    per-tensor ratios instead would let a tiny LayerNorm bias weigh as much as a 2.4M-entry
    matrix.
    """
    by_layer: dict[str, list[dict]] = {}
    by_kind: dict[str, list[dict]] = {}
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for t in tensors:
        by_layer.setdefault(t["layer"], []).append(t)
        by_kind.setdefault(t["kind"], []).append(t)
        by_cell.setdefault((t["layer"], t["kind"]), []).append(t)

    layers = []
    for layer, rows in by_layer.items():
        cells = {
            kind: _pooled(by_cell[(layer, kind)])["relative_change"] for kind in dict.fromkeys(r["kind"] for r in rows)
        }
        top_kind = max(cells, key=lambda k: cells[k])
        layers.append({"layer": layer, **_pooled(rows), "most_changed_kind": top_kind})
    kinds = []
    for kind, rows in by_kind.items():
        per_layer = {r["layer"]: _pooled(by_cell[(r["layer"], kind)])["relative_change"] for r in rows}
        top_layer = max(per_layer, key=lambda k: per_layer[k])
        kinds.append(
            {
                "kind": kind,
                **_pooled(rows),
                "most_changed_layer": top_layer,
                "most_changed_layer_relative_change": per_layer[top_layer],
            }
        )
    heat_layers = [f"h.{i}" for i in range(n_layer)]
    heatmap = {
        "layers": heat_layers,
        "kinds": list(BLOCK_KINDS),
        "relative_change": [
            [_pooled(by_cell[(layer, kind)])["relative_change"] for kind in BLOCK_KINDS] for layer in heat_layers
        ],
    }
    return {"layers": layers, "kinds": kinds, "heatmap": heatmap}


# ----- activations ------------------------------------------------------------------------


@torch.inference_mode()
def block_outputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run `ids` (1, T) through `model`, recording every block's output with forward hooks
    (`snapshots.capture_block_outputs`, which always removes them again).

    Returns ([h.0 output, ..., h.{N-1} output], each (T, C) float64 on the CPU; last-position
    logits (V,) float64).
    """
    with capture_block_outputs(model) as captured:
        logits = model(ids)  # (1, T, V)
    hiddens = [captured[f"h.{i}"][0].to("cpu", torch.float64) for i in range(len(model.h))]
    return hiddens, logits[0, -1].to("cpu", torch.float64)


def kl_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """KL(A || B) in nats of the two next-token distributions: how surprised B is by what A
    expects. 0 for identical logits (clamped: rounding can give -1e-17). NaN stays NaN:
    `max(0.0, nan)` is 0.0, which would report broken logits as identical."""
    log_a = torch.log_softmax(logits_a.to(torch.float64), -1)
    log_b = torch.log_softmax(logits_b.to(torch.float64), -1)
    kl = (log_a.exp() * (log_a - log_b)).sum().item()
    return kl if math.isnan(kl) else max(0.0, kl)


def _shared_vocabulary(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit vectors cut to the ids both models have (a grown vocabulary adds ids at the end),
    so the KL compares next-token distributions over the tokens where the vocabularies agree."""
    n = min(logits_a.size(-1), logits_b.size(-1))
    return logits_a[..., :n], logits_b[..., :n]


def token_text(enc, token: int) -> str:
    """A token's text, safe to print. Byte-level BPE tokens are byte strings and need not be whole
    UTF-8 characters (a Chinese character is often split over two tokens); such bytes are shown
    escaped, `\\xe5\\xa4`, instead of as a misleading replacement character. Control characters
    and spaces are made visible by repr-style escaping."""
    raw = enc.decode_single_token_bytes(token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)
    return json.dumps(text, ensure_ascii=False)[1:-1]


def top_tokens(logits: torch.Tensor, enc, k: int = 5) -> list[dict]:
    probs = torch.softmax(logits.to(torch.float64), -1)
    p, ids = probs.topk(k)
    return [{"id": int(i), "text": token_text(enc, int(i)), "prob": float(q)} for q, i in zip(p, ids)]


def record_prompts(model, enc, prompts: list[str], device) -> list[dict]:
    """One model's side of `compare_activations`: block outputs and last logits per prompt."""
    records = []
    for prompt in prompts:
        ids, truncated = encode_prompt(enc, prompt, model.config.n_positions)
        hiddens, logits = block_outputs(model, torch.tensor([ids], device=device))
        records.append({"ids": ids, "truncated": truncated, "hiddens": hiddens, "logits": logits})
    return records


def compare_activations(prompts: list[str], records_a: list[dict], records_b: list[dict], enc_a, enc_b=None) -> list:
    """Per prompt: the drift of every block's output, KL(A || B) and both top-5 next tokens, each
    model's spelled by its own tokenizer (`enc_b`, A's by default): a grown vocabulary's new ids
    mean nothing to A's."""
    results = []
    for prompt, ra, rb in zip(prompts, records_a, records_b):
        blocks = [
            {"block": f"h.{i}", **hidden_drift(ha, hb)} for i, (ha, hb) in enumerate(zip(ra["hiddens"], rb["hiddens"]))
        ]
        results.append(
            {
                "prompt": prompt,
                "tokens": len(ra["ids"]),
                "truncated": ra["truncated"],
                "blocks": blocks,
                "kl_a_b": kl_divergence(*_shared_vocabulary(ra["logits"], rb["logits"])),
                "top5_a": top_tokens(ra["logits"], enc_a),
                "top5_b": top_tokens(rb["logits"], enc_b or enc_a),
            }
        )
    return results


# ----- behaviour on text ------------------------------------------------------------------


def score_dict(score: Score) -> dict:
    """A `Score` as the figures of a JSON report: loss, perplexity, bits per character, and the
    protocol they were measured with (tokens, window, characters)."""
    return {
        "loss": score.loss,
        "perplexity": score.perplexity,
        "bits_per_char": score.bits_per_char,
        "nats": score.nats,
        "tokens": score.tokens,
        "characters": score.characters,
        "window": score.window,
    }


def prepare_texts(paths: list[str], enc_a, enc_b, max_tokens: int) -> list[dict]:
    """Read and tokenize every --text file up front, so a bad file fails before any model runs.

    Each side reads the text with its own tokenizer (a grown vocabulary spends fewer tokens on
    it): the cap of `max_tokens` is applied to A's tokens, and B gets the same stretch of text, so
    bits per character compare the two on the same characters. Each side's stream starts with
    its <|endoftext|> (see `minigpt2.model.evaluate`).
    """
    same = enc_b is enc_a or tokenizer_fingerprint(enc_a) == tokenizer_fingerprint(enc_b)
    texts = []
    for path in paths:
        text = read_text_file(path, "text file")
        stream, total = text_stream(enc_a, text, max_tokens)
        ids = stream[1:]
        check_enough_text(f"text file '{path}'", text, len(ids) if total is None else total)
        stream_b = stream if same else same_text_stream(ids, enc_a, enc_b)
        texts.append(
            {
                "file": str(path),
                "ids": {"A": stream, "B": stream_b},
                "tokens": len(ids),
                "tokens_b": len(stream_b) - 1,
                "characters": count_characters(enc_a, ids),
                "tokens_in_file": total,
                "capped": total is None or total > len(ids),
            }
        )
    return texts


# ----- training runs ----------------------------------------------------------------------


def run_start(run: RunFolder) -> str:
    """The model a run started from: run.json's "model", else its first saved step (for a run
    trained from a random initialisation, if it saved one)."""
    info = run.read_info() or {}
    if info.get("model"):
        return str(info["model"])
    steps = run.step_checkpoints()
    if not steps or steps[0] == run.model_checkpoint():
        raise MiniGPT2Error(
            f"training run '{run.path}' started from a random initialisation that was not saved; "
            "give the model to compare with as a second argument"
        )
    return str(steps[0])


def tensor_norms(source: str, revision: str | None = None) -> dict[str, float]:
    """||W|| of every tensor of a checkpoint (official names), streamed one tensor at a time."""
    _, weights_path = checkpoint_files(source, revision)
    with open_safetensors(weights_path) as f:
        keys = list(f.keys())
    norms = {}
    for key in keys:
        name = key.removeprefix(PREFIX)
        if not MASK_BUFFERS.fullmatch(name) and name != "lm_head.weight":
            norms[name] = torch.linalg.vector_norm(_read_tensor(weights_path, key).to(torch.float64)).item()
    return norms


def run_curves(run: RunFolder) -> dict:
    """The run's learning curves from log.jsonl: training loss per step, and per eval set its loss and
    bits per character at each evaluation (what a person looks at first); and the samples drawn at
    each evaluation (`train.py --sample-prompt`), step by step."""
    train, evals, samples = [], {}, []
    records, skipped = read_records(run.path / LOG)  # each checked: a damaged line costs itself, not the report
    for r in records:
        if r.get("type") == "train":
            train.append({"step": r["step"], "tokens": r.get("tokens"), "loss": r["loss"]})
        elif r.get("type") == "eval":
            evals.setdefault(r["set"], []).append(
                {"step": r["step"], "tokens": r.get("tokens"), "loss": r["loss"], "bpc": r.get("bpc")}
            )
        elif r.get("type") == "samples":
            samples = [s for s in samples if s["step"] < r["step"]]  # a resumed run drew these steps again
            samples.append({k: r.get(k) for k in ("step", "tokens", "seed", "max_new_tokens", "samples")})
    return {"train": train, "eval": evals, "samples": samples, "note": skipped_note(LOG, skipped)}


# ----- the whole comparison ---------------------------------------------------------------


def side_tokenizer(checkpoint: str, revision: str | None = None, loaded: dict | None = None):
    """A checkpoint's own tokenizer (GPT-2's only for one without tokenizer files and with GPT-2's
    vocabulary; see `load_tokenizer`), read before any model is loaded, so a mismatch fails first.
    `loaded`: the tokenizers read for the other sides (most comparisons have one on every side)."""
    vocab_size = read_checkpoint_config(checkpoint, revision).vocab_size
    return load_tokenizer(checkpoint, revision=revision, vocab_size=vocab_size, loaded=loaded)


def resolve_side(source: str) -> dict:
    """What one command-line argument stands for: a model source, or a run and its checkpoint."""
    if RunFolder.is_run(source):
        checkpoint = RunFolder(source).model_checkpoint()
        return {"source": source, "checkpoint": str(checkpoint), "run": str(source)}
    return {"source": source, "checkpoint": source, "run": None}


def files_read(sources: list[str], texts: list[str], revision: str | None = None) -> list[Path]:
    """The files a comparison of `sources` on `texts` reads, as far as they exist (so that no output
    of the same command can replace one): each --text file; each checkpoint folder's files
    (weights, config, tokenizer, adapter), or a .safetensors file and its config.json; a run's own
    files (run.json, log.jsonl, snapshots.jsonl) and its starting model's. A source that cannot be
    resolved lists nothing: the comparison itself fails on it with its own message."""
    found = [Path(t) for t in texts]
    checkpoints = []
    for source in sources:
        side = resolve_side_or_none(source)
        if side is None:
            continue
        checkpoints.append(side["checkpoint"])
        if side["run"]:
            run = RunFolder(side["run"])
            found += [run.path / name for name in (RUN_JSON, LOG, SNAPSHOTS)]
            try:
                checkpoints.append(run_start(run))
            except MiniGPT2Error:
                pass
    for checkpoint in checkpoints:
        try:
            config, weights = checkpoint_files(checkpoint, revision)
        except (MiniGPT2Error, OSError):
            continue
        found += [p for p in (config, weights) if p is not None]
        if Path(checkpoint).is_dir() or local_path(checkpoint) is None:  # a folder (or the hub's): all of it
            found += [p for p in Path(weights).parent.rglob("*") if p.is_file()]
    return [p for p in dict.fromkeys(found) if p.exists()]


def check_revision_applies(sources: list[str], revision: str | None) -> None:
    """`revision` picks a version of a hub model: where no model named comes from the hub (a run
    counts by the model it started from), it would be ignored without a word, so it is refused."""

    def from_hub(source: str) -> bool:
        if RunFolder.is_run(source):
            try:
                source = run_start(RunFolder(source))
            except MiniGPT2Error:
                return False
        return local_path(source) is None

    if revision is not None and not any(from_hub(s) for s in sources):
        named = ", ".join(f"'{s}'" for s in sources)
        raise OptionError(
            "revision",
            f"{revision} picks a version of a model from the Hugging Face hub, and {named} "
            f"{'is' if len(sources) == 1 else 'are'} local: drop --revision",
        )


def resolve_side_or_none(source: str) -> dict | None:
    try:
        return resolve_side(source)
    except (MiniGPT2Error, OSError):
        return None


def run_record(side: str, path: str, revision: str | None, progress: Progress = None) -> dict:
    """A training run's drift over steps (pooled with its start model's norms when that can be read)
    and its learning curves, for one side of a comparison."""
    run = RunFolder(path)
    _tell(progress, f"reading the snapshots of {path}", 0, 1)
    try:  # the starting model's norms turn the snapshots' ratios into pooled per-layer figures
        norms = tensor_norms(run_start(run), revision)
    except MiniGPT2Error:
        norms = None  # a start that cannot be read (not cached, not saved): plain means
    snapshots, skipped = read_records(run.path / SNAPSHOTS, snapshot_shape)
    snapshots = sorted(({"weights": {}, "activations": {}} | {k: v for k, v in s.items() if v is not None}
                        for s in snapshots), key=lambda s: s["step"])  # fmt: skip
    record = {"side": side, "path": path, **run_drift(snapshots, norms), "curves": run_curves(run),
              "note": skipped_note(SNAPSHOTS, skipped), "snapshots_asked": (run.path / SNAPSHOTS).exists()}  # fmt: skip
    _tell(progress, f"reading the snapshots of {path}", 1, 1)
    return record


def _tell(progress: Progress, task: str, done: int, total: int, unit: str = "") -> None:
    if progress is not None:
        progress(task, done, total, unit)


def score_model(
    model, streams: list[list[int]], chars, names: list[str], who: str, window, device, progress, token_nats=None
) -> list:
    """One model's scores on several texts (`minigpt2.model.evaluate`), telling `progress` of each
    pass; `token_nats` (a list per text) receives each text's per-token losses."""
    scores = []
    for i, (stream, name) in enumerate(zip(streams, names)):
        task = f"scoring {who} on {name}"
        _tell(progress, task, 0, 1, "passes")
        tell = None if progress is None else (lambda done, total, task=task: progress(task, done, total, "passes"))
        nats = None if token_nats is None else token_nats[i]
        score = score_text(model, stream, chars, window=window, device=device, progress=tell, token_nats=nats)
        scores.append(score_dict(score))
    return scores


def check_window(window: int | None, model) -> int:
    """The evaluation window: `window`, or the model's context; never longer than the context."""
    if window is None:
        return model.config.n_positions
    positive_int("window", window)
    if window > model.config.n_positions:
        raise OptionError(
            "window", f"is {window}, longer than the model's context of {model.config.n_positions} tokens"
        )
    return window


def _forward_passes(
    sides, enc, prompts, prepared, device, revision, quantize, window, progress, sample_tokens
) -> tuple[list, list]:
    """(activations per prompt, behaviour per text): each model loaded in turn and freed before the
    next, so memory holds one model at a time. With `sample_tokens`, each prompt's activations also
    hold each model's continuation of it (`sampling.draw_samples`: the same seed for A and B)."""
    recorded, scores, continued, nats = {}, {}, {}, {}
    names = [Path(t["file"]).name for t in prepared]
    per_tokenizer = {}  # characters per token and the UTF-8 guard: made once where both sides share a tokenizer
    drawing = bool(sample_tokens and prompts)  # each model continues each prompt
    for side, info in sides.items():
        _tell(progress, f"loading {side} ({info['source']})", 0, 1)
        model = load_model(info["checkpoint"], device=device, revision=revision, quantize=quantize)
        # Prompts go in as A's tokens on both sides (a grown vocabulary keeps A's ids), so the two
        # models' block outputs are compared on the same input; texts in each side's own tokens.
        if prompts:
            _tell(progress, f"running {side} on the prompts", 0, len(prompts), "prompts")
        recorded[side] = record_prompts(model, enc["A"], list(prompts), device)
        key = (id(enc[side]), model.config.vocab_size)
        if key not in per_tokenizer:
            guard = None
            if drawing:
                guard = Utf8Guard.for_tokenizer(enc[side], model.config.vocab_size, model.wte.weight.device)
            per_tokenizer[key] = char_counts(enc[side]), guard
        chars, guard = per_tokenizer[key]
        streams, nats[side] = [t["ids"][side] for t in prepared], [[] for _ in prepared]
        scores[side] = score_model(
            model, streams, chars, names, side, check_window(window, model), device, progress, nats[side]
        )
        continued[side] = draw_samples(model, enc[side], list(prompts), sample_tokens, guard=guard) if drawing else []
        del model
    activations = compare_activations(list(prompts), recorded["A"], recorded["B"], enc["A"], enc["B"])
    for act, sample_a, sample_b in zip(activations, continued["A"], continued["B"]):
        act["continuation_a"], act["continuation_b"] = sample_a["text"], sample_b["text"]
    behaviour = [{k: v for k, v in t.items() if k != "ids"} | {"a": sa, "b": sb}
                 for t, sa, sb in zip(prepared, scores["A"], scores["B"])]  # fmt: skip
    for t, text, na, nb in zip(behaviour, prepared, nats["A"], nats["B"]):  # where in the text B gained and lost
        t["changes"] = text_changes(enc["A"], text["ids"]["A"], na, enc["B"], text["ids"]["B"], nb)
    return activations, behaviour


def resolve_sides(a: str, b: str | None) -> tuple[dict, dict]:
    """What A and B stand for (see `resolve_side`); with `b` None, `a` is a run compared from its start."""
    if b is not None:
        return resolve_side(a), resolve_side(b)
    if not RunFolder.is_run(a):
        raise MiniGPT2Error(f"'{a}' is not a training run directory: give two models to compare")
    start = run_start(RunFolder(a))
    return {"source": start, "checkpoint": start, "run": None}, resolve_side(a)


def side_tokenizers(side_a: dict, side_b: dict, texts, revision, max_eval_tokens: int):
    """({"A", "B"}: each side's tokenizer, the --text files read and tokenized) where there are prompts
    or texts (`texts` not None), read first: a bad file fails before minutes of work. Else (None, None),
    and the tokenizer files a side has are still read: files that are there must be sound."""
    loaded = {}  # one read where both sides have the same tokenizer files
    if texts is None:
        for side in (side_a, side_b):
            folder = Path(side["checkpoint"])
            if folder.is_dir() and any((folder / name).exists() for name in TOKENIZER_FILES):
                side_tokenizer(side["checkpoint"], revision, loaded)
        return None, None
    enc = {k: side_tokenizer(side["checkpoint"], revision, loaded) for k, side in (("A", side_a), ("B", side_b))}
    return enc, prepare_texts(list(texts), enc["A"], enc["B"], max_eval_tokens)


def compare(
    a: str,
    b: str | None = None,
    *,
    prompts: list[str] = (),
    texts: list[str] = (),
    device: str | torch.device = "cpu",
    max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS,
    revision: str | None = None,
    quantize: str | None = None,
    sample_tokens: int = SAMPLE_TOKENS,
    window: int | None = None,
    layers: bool = True,
    layer_tokens: int | None = DEFAULT_LAYER_TOKENS,
    progress: Progress = None,
) -> dict:
    """Compare checkpoint A (the reference, e.g. before fine-tuning) with B (e.g. after).

    `a` and `b` are anything `load_model` takes, or training run directories (standing for their
    final checkpoint, and adding the run's drift over steps). With `b` omitted, `a` must be a run,
    compared from the model it started from to its final checkpoint.

    Returns a JSON-ready dict: {"a", "b" (what each side resolved to), "orientation", "config",
    "weights" (see `compare_weights`), "activations" (per prompt, see `compare_activations`),
    "behaviour" (per text: A's and B's loss, perplexity, bits per character), "runs" (drift over
    steps per run given), "max_eval_tokens"}. Infinite values (a relative change from an all-zero
    tensor) are kept as `math.inf`; `minigpt2.analysis.report.to_json` writes them as null.

    `sample_tokens` > 0: each prompt is also continued by A and by B, that many new tokens drawn
    with the same seed (`minigpt2.generation.sampling.draw_samples`), in "continuation_a" / "continuation_b".

    `quantize="int8"` runs the prompts and texts through int8 weight-only models (see
    `minigpt2.model.quantize`): what int8 decoding would score. Whole texts are bound by arithmetic, not
    by reading weights, so on a CPU this is not faster. The weights are always compared as stored.

    Texts are scored by `minigpt2.model.evaluate`'s protocol: the first `max_eval_tokens` tokens, in
    windows of `window` tokens (default: each model's context). `progress` hears of every phase
    (see `Progress`). Per text also where B gained and lost ("changes") and, with `layers`, the
    transplants and the logit lens ("layer_attribution", "logit_lens": `minigpt2.analysis.causal`) on
    its first `layer_tokens` tokens (None: as many as are scored).
    """
    positive_int("max_eval_tokens", max_eval_tokens)  # the evaluation cap, in tokens
    integer("sample_tokens", sample_tokens, low=0, high=MAX_NEW_TOKENS)
    if layer_tokens is not None:
        positive_int("layer_tokens", layer_tokens)
    side_a, side_b = resolve_sides(a, b)
    device = resolve_device(device)
    enc, prepared = side_tokenizers(side_a, side_b, texts if (prompts or texts) else None, revision, max_eval_tokens)
    weights = compare_weights(side_a["checkpoint"], side_b["checkpoint"], revision=revision, progress=progress)
    # A LoRA run's checkpoint has adapter/ beside its merged weights: mark the adapted tensors.
    names = [t["name"] for t in weights["tensors"]]
    weights["lora"] = adapted_tensors(side_b["checkpoint"], names) or adapted_tensors(side_a["checkpoint"], names)
    sides = {"A": side_a, "B": side_b}
    runs = [run_record(side, info["run"], revision, progress) for side, info in sides.items() if info["run"]]
    activations, behaviour = [], []
    if enc is not None:
        activations, behaviour = _forward_passes(sides, enc, prompts, prepared, device, revision, quantize, window,
                                                 progress, sample_tokens)  # fmt: skip
    if layers and prepared:  # which units carry the change, at which depth (causal.layer_sections)
        found = layer_sections(side_a["checkpoint"], side_b["checkpoint"], prepared, enc, window=window, device=device,
                               revision=revision, max_tokens=layer_tokens, progress=progress)  # fmt: skip
        for text, sections in zip(behaviour, found):
            text.update(sections)
    return {"a": side_a, "b": side_b, "orientation": ORIENTATION, "config": weights.pop("config"), "weights": weights,
            "activations": activations, "behaviour": behaviour, "max_eval_tokens": max_eval_tokens, "runs": runs,
            "sample_tokens": sample_tokens, "sample_seed": SAMPLE_SEED}  # fmt: skip


def compare_many(
    a: str,
    others: list[str],
    *,
    texts: list[str],
    device: str | torch.device = "cpu",
    max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS,
    revision: str | None = None,
    quantize: str | None = None,
    window: int | None = None,
    progress: Progress = None,
) -> dict:
    """A against several models at once, for a trade-off: e.g. the base, a full fine-tune and LoRA
    fine-tunes of two ranks, on the new language's text and on the old one's.

    Per model: how far its weights moved from A (all tensors pooled, and the largest update rank
    among the matrices, with the LoRA rank if it is an adapted checkpoint) and its loss and bits
    per character on every text, each model reading the same characters with its own tokenizer.
    Returns {"a", "models": [{"source", "checkpoint", "weights", "behaviour": [per text]}], "texts",
    "max_eval_tokens"}; `minigpt2.analysis.report.render_many` and `write_tradeoff_plot` present it.
    """
    positive_int("max_eval_tokens", max_eval_tokens)
    if not texts:
        raise MiniGPT2Error("comparing several models needs at least one text to evaluate them on")
    sides = [resolve_side(source) for source in [a, *others]]
    device = resolve_device(device)
    loaded = {}
    encs = [side_tokenizer(side["checkpoint"], revision, loaded) for side in sides]
    prepared = [prepare_texts(list(texts), encs[0], enc, max_eval_tokens) for enc in encs]
    models = []
    for side, enc, side_texts in zip(sides, encs, prepared):
        weights = None
        if side is not sides[0]:
            found = compare_weights(sides[0]["checkpoint"], side["checkpoint"], revision=revision, progress=progress)
            matrices = [t["rank_90"] for t in found["tensors"] if t["rank_90"] is not None]
            lora = adapted_tensors(side["checkpoint"], [t["name"] for t in found["tensors"]])
            weights = {
                **_pooled(found["tensors"]),
                "max_rank_90": max(matrices, default=None),
                "lora_r": lora["r"] if lora else None,
            }
        _tell(progress, f"loading {side['source']}", 0, 1)
        model = load_model(side["checkpoint"], device=device, revision=revision, quantize=quantize)
        streams = [t["ids"]["B"] for t in side_texts]
        names = [Path(t["file"]).name for t in side_texts]
        scores = score_model(
            model, streams, char_counts(enc), names, side["source"], check_window(window, model), device, progress
        )
        del model
        models.append({**side, "weights": weights, "behaviour": scores})
    return {
        "a": sides[0],
        "models": models,
        "max_eval_tokens": max_eval_tokens,
        "texts": [{k: v for k, v in t.items() if k != "ids"} for t in prepared[0]],
    }
