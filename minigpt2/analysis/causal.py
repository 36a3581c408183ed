"""Which part of a change does the work: transplants, the logit lens, and where in the text.

The weight and activation figures of `minigpt2.analysis.compare` say how much each part of a
fine-tuned model moved. They cannot say which part of the change *does the work*: is the new
language carried by the embedding or by the blocks, by the first layers or the last, and where
in a text did the model get better or worse? Three measurements answer that, each scored with
the one evaluation of `minigpt2.model.evaluate` (bits per character, same windows, same
characters), so every figure here compares with compare.py's behaviour table and a training log:

1. **Transplants** (`layer_attribution`), the activation patching of interpretability done on
   weights. The units are `embedding` (wte and wpe together), each block `h.0` ... `h.{L-1}` and
   `ln_f`. For each unit u: A with B's u (what u's change does on its own), and B with A's u put
   back (what B loses without u's change): 2 x (L + 2) evaluations of the text. GPT-2's output
   layer *is* wte (tied weights), so moving the embedding moves the output layer with it.
2. **The logit lens** (`logit_lens`): the residual stream after the embedding and after each
   block, read out through `ln_f` and the (tied) output layer as if the model ended there: one
   bits-per-character figure per depth, L + 1 of them, the last the model's own.
3. **Where in the text** (`text_changes`, `passages`): each token's loss under A and under B,
   spread over the characters it spells, so the two compare character by character even when
   they tokenize differently; summed per passage (about a sentence), the passages B gained most
   on and those it lost most on.

Rules:
- **Shapes**: layers, width, heads and context must agree; anything else is refused in one line.
- **A grown vocabulary** (B has more rows, `--extend-vocab`): the transplants run in B's
  tokenizer. A given B's embedding takes B's rows, all of them. A itself has no rows for B's new
  tokens, so in B's tokenizer it is scored as *A with B's new rows appended* (its old rows are
  its own): what A would do had it learned nothing but the new tokens' vectors. B given A's
  embedding is exactly that: B's new rows, A's old ones. The whole gain (A -> B) of the shares
  is then measured from that extended A, one more evaluation. B with fewer rows than A is refused.
- **LoRA**: an adapted model is compared through its merged weights (base + (alpha / r) B A), as
  its checkpoint stores them.
- **int8** (`quantize_model`): a quantized model is dequantized (int8 x scale per row) and its
  output layer tied to wte again; compare.py runs these sections on the float weights as stored,
  whatever `--quantize` says (the behaviour table is the place for int8's figures).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minigpt2.errors import CheckpointError
from minigpt2.io.weights import empty_model
from minigpt2.model.evaluate import Score, char_counts, same_text_stream, score_text, text_stream
from minigpt2.model.snapshots import official_tensors

Progress = Callable[[str, int, int, str], None] | None
"""`progress(task, done, total, unit)`: told when a phase starts (done = 0) and as it goes on, so
that a script can show what is being done and how far it is (compare's phases too). The package
never prints."""


def units(n_layer: int) -> list[str]:
    """The transplant units, input to output: embedding (wte + wpe), h.0 ... h.{n_layer-1}, ln_f."""
    return ["embedding", *(f"h.{i}" for i in range(n_layer)), "ln_f"]


def unit_of(name: str) -> str:
    """The unit a parameter belongs to: `wte.weight` -> embedding, `h.3.mlp.c_fc.bias` -> h.3."""
    if name.startswith(("wte.", "wpe.")):
        return "embedding"
    if name.startswith("h."):
        return ".".join(name.split(".")[:2])
    return name.split(".")[0]


def plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """float32 CPU copies of a model's weights under minigpt2's parameter names, lm_head left out
    (it is wte). A LoRA model gives its merged weights; an int8 model its dequantized ones."""
    from minigpt2.model.quantize import Int8Linear

    tensors = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in official_tensors(model).items()}
    for module_name, module in model.named_modules():
        if isinstance(module, Int8Linear) and not module_name.endswith("lm_head"):
            weight = module.weight.float() * module.scale.float()[:, None]  # (out, in): int8 x its row's scale
            tensors[f"{module_name.removeprefix('_orig_mod.')}.weight"] = weight.cpu()
            tensors.pop(f"{module_name.removeprefix('_orig_mod.')}.scale", None)
    return tensors


def check_transplantable(config_a, config_b) -> None:
    """Refuse, in one line, two models whose units cannot be swapped."""
    fields = [("n_layer", "layers"), ("n_embd", "width"), ("n_head", "heads"), ("n_positions", "context")]
    differ = [f"{label} {getattr(config_a, f)} vs {getattr(config_b, f)}" for f, label in fields
              if getattr(config_a, f) != getattr(config_b, f)]  # fmt: skip
    if differ:
        raise CheckpointError(f"A and B have different shapes ({'; '.join(differ)}): no unit can be transplanted")
    if config_b.vocab_size < config_a.vocab_size:
        raise CheckpointError(
            f"B has fewer vocabulary rows than A ({config_b.vocab_size} vs {config_a.vocab_size}): transplants "
            "run in B's tokenizer and need all of A's tokens in it; give the grown model as B"
        )


@contextlib.contextmanager
def transplanted(model: nn.Module, donor: dict[str, torch.Tensor], chosen: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the `with`, `model` holds `donor`'s tensors for the `chosen` units; its own are put
    back in a `finally`. wte is also the output layer (tied), so `embedding` moves both."""
    params = dict(model.named_parameters())
    names = [name for name in params if unit_of(name) in chosen]
    saved = {name: params[name].detach().clone() for name in names}
    try:
        with torch.no_grad():
            for name in names:
                params[name].copy_(donor[name])
        yield model
    finally:
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved[name])


class Transplanter:
    """A working model of B's shape that can be made A or B and given the other's units.

    Holds float32 copies of both models' weights on the CPU and one working model on `device`:
    about three times one model's memory (1.5 GB for GPT-2 small). A is extended by B's new
    vocabulary rows when B's vocabulary grew (see the module docstring)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, device="cpu") -> None:
        check_transplantable(model_a.config, model_b.config)
        self.tensors = {"a": plain_tensors(model_a), "b": plain_tensors(model_b)}
        wte_a, wte_b = self.tensors["a"]["wte.weight"], self.tensors["b"]["wte.weight"]
        self.grown = len(wte_b) - len(wte_a)  # new rows of B
        if self.grown:
            self.tensors["a"]["wte.weight"] = torch.cat([wte_a, wte_b[len(wte_a) :]])  # (V_b, C)
        self.model = empty_model(model_b.config, device).eval()
        self.holds: str | None = None
        self.units = units(model_b.config.n_layer)

    def become(self, base: str) -> nn.Module:
        """The working model, holding all of `base`'s weights ("a" or "b")."""
        if self.holds != base:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    param.copy_(self.tensors[base][name])
            self.holds = base
        return self.model

    def score(self, base: str, given: Sequence[str], stream, chars, *, window=None, device="cpu", progress=None):
        """The `Score` of `base` ("a" or "b") with the other model's `given` units, on `stream`
        (B's tokens; `chars`: B's `char_counts`)."""
        donor = self.tensors["b" if base == "a" else "a"]
        with transplanted(self.become(base), donor, given) as model:
            return score_text(model, stream, chars, window=window, device=device, progress=progress)


def as_stream(tokens, chars=None, enc=None, max_tokens: int | None = None):
    """(scoring stream, characters per token id) from what a notebook has: a text and its tokenizer
    (`enc`: the stream is `<|endoftext|>` + its first `max_tokens` tokens, as compare.py builds it),
    or token ids already (a list or a 1-D tensor, `<|endoftext|>` first) with `chars` or `enc`."""
    if isinstance(tokens, str):
        if enc is None:
            raise ValueError("a text needs its tokenizer: pass enc=")
        tokens = text_stream(enc, tokens, max_tokens)[0]
    elif isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist()
    if chars is None:
        if enc is None:
            raise ValueError("bits per character need the characters each token spells: pass chars= or enc=")
        chars = char_counts(enc)
    return tokens, chars


def layer_attribution(
    model_a, model_b, stream, chars=None, *, enc=None, window=None, device="cpu", progress: Progress = None,
    name: str = "the text",
) -> list[dict]:  # fmt: skip
    """Per unit: {"unit", "bpc_a_with_b": A given B's unit, "bpc_b_with_a": B given A's unit back},
    on `stream` in B's tokens (`chars` = `char_counts` of B's tokenizer; or a text and `enc`, B's
    tokenizer: see `as_stream`): 2 x (L + 2) evaluations, `progress` told after each forward pass.
    `model_a` may also be a `Transplanter` (then `model_b` is None), to reuse its copies."""
    stream, chars = as_stream(stream, chars, enc)
    lab = model_a if isinstance(model_a, Transplanter) else Transplanter(model_a, model_b, device)
    n = 2 * len(lab.units)
    task = f"transplants on {name}: 2 x ({len(lab.units) - 2} + 2) = {n} evaluations"
    rows = [{"unit": unit} for unit in lab.units]
    for j, (base, key) in enumerate((("a", "bpc_a_with_b"), ("b", "bpc_b_with_a"))):  # A's first: one copy each
        for i, (unit, row) in enumerate(zip(lab.units, rows)):
            tell = _sub_progress(progress, task, j * len(rows) + i, n)
            row[key] = lab.score(base, [unit], stream, chars, window=window, device=device, progress=tell).bits_per_char
    return rows


def _sub_progress(progress: Progress, task: str, k: int, n: int):
    """Progress of evaluation k of n, as a fraction of all their passes (in thousandths)."""
    if progress is None:
        return None
    progress(task, 1000 * k // n, 1000, "")
    return lambda done, total: progress(task, (1000 * k + 1000 * done // total) // n, 1000, "")


def shares(rows: list[dict], bpc_a: float, bpc_b: float) -> list[dict]:
    """Each unit's transplants as shares of the whole gain G = bpc_a - bpc_b: `alone` = (bpc_a -
    bpc_a_with_b) / G, what u's change does on its own; `needed` = (bpc_b_with_a - bpc_b) / G, what
    B loses without it. NaN when A and B score the same (no gain to share)."""
    gain = bpc_a - bpc_b
    out = []
    for r in rows:
        alone = (bpc_a - r["bpc_a_with_b"]) / gain if gain else math.nan
        needed = (r["bpc_b_with_a"] - bpc_b) / gain if gain else math.nan
        out.append({"unit": r["unit"], "alone": alone, "needed": needed})
    return out


class ReadOut(nn.Module):
    """`model` read out after its first `depth` blocks: embedding, blocks 0 .. depth-1, then
    `ln_f` and the tied output layer, as if the model ended there (the logit lens). At depth
    n_layer it computes exactly the model's forward pass."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model, self.depth, self.config = model, depth, model.config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.model
        positions = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = m.drop(m.wte(idx) + m.wpe(positions))  # (B, T, C)
        for i, block in enumerate(m.h[: self.depth]):
            x = block(x, i)  # (B, T, C)
        return m.lm_head(m.ln_f(x))  # (B, T, vocab_size)


def logit_lens(
    model, stream, chars=None, *, enc=None, window=None, device="cpu", progress: Progress = None, name=""
) -> list[float]:
    """Bits per character of predicting the next token from the residual stream after the
    embedding (depth 0) and after each block (depth 1 .. L), through ln_f and the output layer:
    L + 1 evaluations by the one protocol; the last is the model's own bits per character.
    `stream` and `chars`: token ids and `char_counts`, or a text and `enc` (see `as_stream`)."""
    stream, chars = as_stream(stream, chars, enc)
    depths = model.config.n_layer + 1
    task = f"logit lens{' of ' + name if name else ''}: {depths} read-outs"
    curve = []
    for depth in range(depths):
        tell = _sub_progress(progress, task, depth, depths)
        score = score_text(ReadOut(model, depth), stream, chars, window=window, device=device, progress=tell)
        curve.append(score.bits_per_char)
    return curve


# ----- where in the text ------------------------------------------------------------------


def char_nats(enc, stream, token_nats: Sequence[float]) -> tuple[str, np.ndarray]:
    """The text the predicted tokens spell and each character's share of their loss (nats): a
    token's loss is spread evenly over its bytes, and a character gets its bytes' shares, so a
    Chinese character split over two tokens gets part of each. Sums to the total loss."""
    pieces = [enc.decode_single_token_bytes(int(t)) for t in stream[1 : 1 + len(token_nats)]]
    per_byte = np.concatenate([np.full(len(p), n / max(len(p), 1)) for p, n in zip(pieces, token_nats)])
    raw = b"".join(pieces)
    starts = np.frombuffer(raw, dtype=np.uint8) & 0xC0 != 0x80  # bytes that start a character
    index = np.cumsum(starts) - 1  # each byte's character
    nats = np.bincount(index[index >= 0], weights=per_byte[index >= 0], minlength=int(starts.sum()))
    text = raw.decode("utf-8", errors="replace")
    n = min(len(text), len(nats))
    return text[:n], nats[:n]


PASSAGE_ENDS = set("。！？!?；;\n")
SHORTEST_PASSAGE, LONGEST_PASSAGE = 8, 80  # characters: a sentence end closes a passage of at least 8; none, at 80


def passages(text: str, delta: np.ndarray, count: int = 10) -> dict:
    """The text cut into passages of about a sentence (8 to 80 characters); the `count` with the largest total gain of B
    over A (`delta` = B's bits minus A's per character: negative is a gain) and the `count` with
    the largest loss: {"gained": [...], "lost": [...]}, each {"start", "text", "delta_bits",
    "characters"}."""
    cuts, start = [], 0
    for i, ch in enumerate(text):
        length = i + 1 - start
        sentence = ch in PASSAGE_ENDS or (ch == "." and text[i + 1 : i + 2] in (" ", "\n", ""))
        if (sentence and length >= SHORTEST_PASSAGE) or length >= LONGEST_PASSAGE or i == len(text) - 1:
            cuts.append((start, i + 1))
            start = i + 1
    found = [
        {"start": s, "text": text[s:e].strip(), "delta_bits": float(delta[s:e].sum()), "characters": e - s}
        for s, e in cuts
        if text[s:e].strip()
    ]
    ranked = sorted(found, key=lambda p: p["delta_bits"])
    return {
        "gained": [p for p in ranked[:count] if p["delta_bits"] < 0],
        "lost": [p for p in reversed(ranked[-count:]) if p["delta_bits"] > 0],
    }


EXCERPT_CHARS = 1500  # characters of each text shaded in the HTML report


def text_changes(enc_a, stream_a, nats_a, enc_b, stream_b, nats_b, count: int = 10) -> dict:
    """Where in the text B gained and lost: per character, B's loss minus A's in bits (each side
    read with its own tokenizer, compared on the characters both scored); the passages (see
    `passages`) and an excerpt of the first EXCERPT_CHARS characters with their per-character
    change, for shading: {"passages", "excerpt": {"text", "delta_bits"}}."""
    text, per_a = char_nats(enc_a, stream_a, nats_a)
    text_b, per_b = char_nats(enc_b, stream_b, nats_b)
    n = min(len(per_a), len(per_b))
    delta = (per_b[:n] - per_a[:n]) / math.log(2)  # bits per character
    text = text[:n]
    shown = delta[:EXCERPT_CHARS]
    return {
        "passages": passages(text, delta, count),
        "excerpt": {"text": text[:EXCERPT_CHARS], "delta_bits": [round(float(d), 4) for d in shown]},
    }


def score_with_tokens(model, stream, chars, *, window=None, device="cpu", progress=None) -> tuple[Score, list[float]]:
    """`score_text` that also returns each predicted token's loss in nats, in the stream's order."""
    nats: list[float] = []
    return score_text(model, stream, chars, window=window, device=device, progress=progress, token_nats=nats), nats


# ----- compare.py's sections --------------------------------------------------------------


def evaluations(n_layer: int, grown: bool = False) -> int:
    """What the transplants cost per text: 2 x (L + 2) evaluations (one more for a grown
    vocabulary: A extended, the gain's starting point); the lens adds 2 x (L + 1) read-outs."""
    return 2 * (n_layer + 2) + int(grown)


def layer_sections(
    checkpoint_a, checkpoint_b, texts: list[dict], enc: dict, *, window=None, device="cpu", revision=None,
    max_tokens: int | None = None, progress: Progress = None,
) -> list[dict]:  # fmt: skip
    """compare.py's transplants and logit lens, per text of `texts` (`compare.prepare_texts`': its
    "file" and "ids" = {"A": the scoring stream in A's tokens, "B": in B's}; `enc` = {"A", "B"}:
    each side's tokenizer). With `max_tokens`, each text is cut to its first `max_tokens` tokens of A
    and the same characters in B's tokens (`first_tokens`): these sections cost ~63 evaluations a text.

    Both models are loaded in float32 (an int8 `--quantize` does not apply here). Per text:
    {"layer_attribution": see `layer_attribution`, "logit_lens": {"a": [L + 1], "b": [L + 1]},
    "transplant_base": {"a", "b"}: the bits per character the shares are measured between, and
    "shares": see `shares`}."""
    from minigpt2.io.weights import load_model

    if progress is not None:
        progress("loading A and B for the transplants", 0, 1, "")
    model_a = load_model(checkpoint_a, device=device, revision=revision)
    model_b = load_model(checkpoint_b, device=device, revision=revision)
    try:
        lab, skipped = Transplanter(model_a, model_b, device), None
    except CheckpointError as e:  # B with fewer vocabulary rows than A: the lens still runs
        lab, skipped = None, str(e)
    chars = {"a": char_counts(enc["A"]), "b": char_counts(enc["B"])}
    found = []
    for t in texts:
        ids_a, ids_b = first_tokens(t["ids"]["A"], t["ids"]["B"], enc, max_tokens)
        text = {"name": Path(t["file"]).name, "a": ids_a, "b": ids_b}
        common = dict(window=window, device=device, progress=progress)
        lens = {
            "a": logit_lens(model_a, text["a"], chars["a"], name=f"A on {text['name']}", **common),
            "b": logit_lens(model_b, text["b"], chars["b"], name=f"B on {text['name']}", **common),
        }
        if lab is None:
            found.append({"layer_attribution": [], "logit_lens": lens, "transplants_skipped": skipped})
            continue
        base_a = lens["a"][-1]
        if lab.grown:  # the gain starts from A extended by B's new rows, in B's tokens
            base_a = lab.score("a", [], text["b"], chars["b"], window=window, device=device).bits_per_char
        rows = layer_attribution(lab, None, text["b"], chars["b"], name=text["name"], **common)
        base = {"a": base_a, "b": lens["b"][-1]}
        found.append({"layer_attribution": rows, "logit_lens": lens, "transplant_base": base,
                      "shares": shares(rows, base["a"], base["b"])})  # fmt: skip
    for record in found:
        record["layer_tokens"] = max_tokens
    return found


def first_tokens(stream_a: list[int], stream_b: list[int], enc: dict, max_tokens: int | None):
    """The two sides' scoring streams (each `<|endoftext|>` first) cut to A's first `max_tokens`
    tokens, B's stream read from the same characters (as `compare.prepare_texts` does)."""
    if max_tokens is None or len(stream_a) <= max_tokens + 1:
        return stream_a, stream_b
    cut = stream_a[: max_tokens + 1]
    if stream_b is stream_a or enc["B"] is enc["A"]:
        return cut, cut
    return cut, same_text_stream(cut[1:], enc["A"], enc["B"])


def where_changed(model_a, model_b, text: str, enc_a, enc_b=None, *, max_tokens=None, window=None, device="cpu"):
    """`text_changes` of two models on a text, each reading it with its own tokenizer (`enc_b`:
    A's by default), scored by the one protocol: {"passages": {"gained", "lost"}, "excerpt"}."""
    enc_b = enc_b or enc_a
    stream_a, chars_a = as_stream(text, None, enc_a, max_tokens)
    spelled = enc_a.decode(stream_a[1:]).rstrip("\ufffd")  # B reads the same characters
    stream_b, chars_b = as_stream(spelled, None, enc_b)
    _, nats_a = score_with_tokens(model_a, stream_a, chars_a, window=window, device=device)
    _, nats_b = score_with_tokens(model_b, stream_b, chars_b, window=window, device=device)
    return text_changes(enc_a, stream_a, nats_a, enc_b, stream_b, nats_b)
