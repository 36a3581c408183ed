"""Loss, perplexity and bits per character of a model on a text: one protocol, used everywhere.

The trainer's evaluations, compare.py's `--text`, `--extend-vocab`'s before/after figures and the
benchmarks all score text here, so the same checkpoint on the same text gives the same number
wherever it is measured. (Before, three code paths cut the text and counted its characters
differently: a training log said 15.019 bits per character where compare.py said 15.11 for the
same checkpoint and text.)

The protocol
------------
A text is scored as GPT-2 saw documents in training: the stream `<|endoftext|> t1 t2 ... tn`.
A training run's token files already have that form (EOT before each document, see data.py);
compare.py builds it from a text file (`text_stream`).

- **What is predicted**: the first N tokens after the leading EOT, each exactly once (N = the cap:
  `--eval-tokens` in training, `--max-eval-tokens` in compare.py; or all of them).
- **Windows**: those N tokens are cut into consecutive, non-overlapping windows of L tokens from the
  start of the stream: window w reads stream[wL : wL + L] and predicts stream[wL + 1 : wL + L + 1].
  The last window is shorter when L does not divide N. L is training's `--seq-len` (the length
  the model trains at) and, in compare.py, the model's context unless `--window` says otherwise.
- **Characters**: exactly those the predicted tokens spell: per token, the UTF-8 bytes that start a
  character (a Chinese character split over two tokens counts once, with the token holding its
  first byte); special tokens such as EOT spell none.
- loss = nats / N (per token), perplexity = e^loss, bits per character = nats / (ln 2 x characters).

Why this protocol:
- Deterministic windows from the start, never sampled ones: the same tokens at every evaluation, so
  a change between two steps (or between training's log and compare.py) is the model's, not the
  sample's.
- Characters of the tokens evaluated, not the whole file's tokens-per-character ratio: the first
  N tokens of a book (a preface, a table of contents) need not spend tokens per character as
  the whole book does, and bits per character must be the cost of exactly the text scored.
- Non-overlapping windows instead of a sliding one: every token costs one position of one forward
  pass. A token early in a window sees little context, so the loss is a little above what the
  model reaches with its full context; a sliding window would remove that at L times the cost.
  Figures are therefore comparable between evaluations with the same L, and every figure printed
  or logged says its L (`Score.protocol`).
- EOT first: the first token is predicted too, as at the start of any document.

Several ranks (torchrun) split the windows' batches between them and add up their sums; a sharded
model's forward pass is a collective, so there each rank runs the same number of passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from minigpt2.errors import DataError

Span = tuple[int, int]  # (stream index of a window's first input, tokens predicted)
BATCH_TOKENS = 1024  # positions per forward pass when the caller has no batch size of its own
# The least text a figure is computed from: a loss or bits per character over fewer tokens says
# nothing about a model (and a text that short is most likely the wrong file).
MIN_SCORED_TOKENS = 8


def check_enough_text(what: str, text: str | None, tokens: int, *, training: bool = False) -> None:
    """Refuse a text to score (or, `training`, to train on) that is only whitespace or has fewer
    than MIN_SCORED_TOKENS tokens, naming it (`what`: "text file 'x.txt'")."""
    if text is not None and not text.strip():
        raise DataError(f"{what} holds only blank lines and spaces: nothing to score; give a file with text in it")
    if tokens < MIN_SCORED_TOKENS:
        raise DataError(
            f"{what} is only {tokens} token(s) long: too little to {'learn from' if training else 'measure anything'}; "
            f"give a text of at least {MIN_SCORED_TOKENS} tokens (a sentence)"
        )


@dataclass(frozen=True)
class Score:
    """What one evaluation measured: total nats over `tokens` predicted tokens that spell
    `characters` characters, in windows of `window` tokens."""

    nats: float
    tokens: int
    characters: int
    window: int

    @property
    def loss(self) -> float:
        """Nats per token (NaN when nothing was scored)."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(self.nats, self.characters)

    def protocol(self) -> str:
        """How it was measured, for every line that shows the figures."""
        return f"{self.tokens:,} tokens in windows of {self.window}, {self.characters:,} characters"


def perplexity(loss_nats_per_token: float) -> float:
    """e^loss: the number of equally likely tokens the model is as unsure as. Infinity where that
    overflows (a loss above ~709 nats); NaN stays NaN, so a broken model never looks fine."""
    return math.inf if loss_nats_per_token >= 709 else math.exp(loss_nats_per_token)


def bits_per_char(nats: float, characters: int) -> float:
    """Total nats over a text -> bits per character of that text: nats / (ln 2 x characters).

    Unlike loss or perplexity (per token), it does not depend on how the tokenizer splits text
    (GPT-2 spends ~0.25 tokens on an English character, over 2 on a Chinese one), so it compares
    models with different tokenizers, and Chinese with English. NaN when no character was scored.
    """
    return nats / (math.log(2) * characters) if characters else math.nan


CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8's 0b10xxxxxx bytes: inside a character, never its start


def char_counts(enc) -> np.ndarray:
    """(n_vocab,) int64: how many characters each token id spells, i.e. the bytes of the token
    that start a UTF-8 character (all but the 0b10xxxxxx continuation bytes). Summed over a
    text's tokens this is exactly its length; special tokens (EOT) and unused ids count 0."""
    counts = np.zeros(enc.n_vocab, dtype=np.int64)
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    for i in range(enc.n_vocab):
        if i in special:
            continue
        try:
            raw = enc.decode_single_token_bytes(i)
        except KeyError:  # an id between the merges and the special tokens
            continue
        counts[i] = len(raw.translate(None, CONTINUATION))  # the bytes that start a character
    return counts


def count_characters(enc, ids: Sequence[int]) -> int:
    """Characters of the text these tokens spell (see `char_counts`)."""
    return len(enc.decode_bytes(list(ids)).translate(None, CONTINUATION))


def text_stream(enc, text: str, max_tokens: int | None = None) -> tuple[list[int], int | None]:
    """The scoring stream of a text, [EOT, t1, ..., tN] for its first `max_tokens` tokens, and the
    text's total token count when it is known (None when only a prefix was tokenized).

    Line ends are normalised to "\\n" first, as the trainer's data preparation reads its files, so
    a file with CRLF line ends gives the tokens it trained on. A prefix of 8 characters per wanted
    token is tokenized first (no GPT-2 token is that long on ordinary prose); only if that yields
    too few tokens is the whole text tokenized. The tokens of a prefix equal the whole text's
    except near the cut, which lies far beyond the tokens kept.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if max_tokens is not None and len(text) > 8 * max_tokens:
        ids = enc.encode_ordinary(text[: 8 * max_tokens])
        if len(ids) > max_tokens + 64:
            return [enc.eot_token, *ids[:max_tokens]], None
    ids = enc.encode_ordinary(text)
    return [enc.eot_token, *(ids if max_tokens is None else ids[:max_tokens])], len(ids)


def same_text_stream(ids: list[int], enc, other) -> list[int]:
    """The scoring stream, in `other`'s tokens, of the characters `enc`'s token ids spell (an EOT
    first): two tokenizers scored on the same stretch of text. A trailing partial character is dropped."""
    return [other.eot_token, *other.encode_ordinary(enc.decode(ids).rstrip("\ufffd"))]


def spans(stream_len: int, window: int, max_tokens: int | None = None) -> list[Span]:
    """The protocol's windows over a stream of `stream_len` tokens (EOT first): consecutive,
    non-overlapping, from the start, predicting the first `max_tokens` tokens after the EOT (all
    of them when None); the last window is shorter when `window` does not divide that count."""
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    predicted = max(stream_len - 1, 0)
    if max_tokens is not None:
        predicted = min(predicted, max_tokens)
    return [(s, min(window, predicted - s)) for s in range(0, predicted, window)]


def batches(windows: list[Span], batch_size: int) -> list[list[Span]]:
    """Windows grouped for forward passes: `batch_size` full windows at a time (one tensor), a
    shorter last window on its own."""
    full = [w for w in windows if w[1] == windows[0][1]]
    short = [[w] for w in windows[len(full) :]]
    return [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + short


@torch.no_grad()
def score_stream(
    model,
    stream,
    chars: np.ndarray,
    *,
    window: int,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable | None = None,
    dist=None,
    sharded: bool = False,
    stop: Callable[[], bool] | None = None,
    token_nats: list[float] | None = None,
) -> Iterator[tuple[int, int]]:
    """Score `model` on `stream` (EOT, then the text's tokens: a list, an array or a token file's
    memory map) by the protocol above. A generator: it yields (batches done, batches in all) after
    every forward pass, for a progress bar, and returns the `Score` — or None when `stop()` became
    true between two passes (a partial evaluation is never reported).

    `chars` is `char_counts` of the tokenizer that made the stream. `batch_size` windows go in one
    forward pass (default: about 1,024 positions). `autocast` is a context-manager factory for
    mixed precision; the cross-entropy is always summed in float32. `dist` (a `distributed.Dist`)
    splits the batches over its ranks and adds up their sums. `token_nats` (one process only): a
    list that receives each predicted token's loss in nats, in the stream's order.
    """
    if token_nats is not None and dist is not None and dist.enabled:
        raise ValueError("token_nats needs the whole evaluation on one process")
    windows = spans(len(stream), window, max_tokens)
    groups = batches(windows, batch_size or max(1, BATCH_TOKENS // window)) if windows else []
    rank, ranks = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    nats, tokens, characters = 0.0, 0, 0
    rounds = math.ceil(len(groups) / ranks)
    for j in range(rounds):
        stopping = stop is not None and stop()
        if dist is not None and dist.enabled:
            stopping = dist.any(stopping)
        if stopping:
            return None
        index = j * ranks + rank
        # A sharded forward is a collective: a rank with no batch left runs a spare one on batch 0
        # and counts nothing.
        if index < len(groups) or sharded:
            group = groups[index % len(groups)]
            rows = np.stack([np.asarray(stream[s : s + n + 1], dtype=np.int64) for s, n in group])  # (B, n + 1)
            data = torch.from_numpy(rows).to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(data[:, :-1])  # (B, n, V)
            if index < len(groups) and token_nats is not None:
                per_token = F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten(), reduction="none")
                nats += per_token.sum().item()
                token_nats.extend(per_token.tolist())
            elif index < len(groups):
                nats += F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten(), reduction="sum").item()
            if index < len(groups):
                tokens += rows[:, 1:].size
                characters += int(chars[rows[:, 1:]].sum())
        yield j + 1, rounds
    if dist is not None and dist.enabled:
        nats, tokens, characters = dist.sum(nats, tokens, characters)
    return Score(nats=nats, tokens=int(tokens), characters=int(characters), window=window)


def score_text(
    model, stream, chars: np.ndarray, *, window: int | None = None, device="cpu", progress=None, token_nats=None
) -> Score:
    """`score_stream` run to its end on one process, in windows of the model's context by default;
    `progress(done, total)` is called after every forward pass; `token_nats`: see `score_stream`."""
    window = window or model.config.n_positions
    run = score_stream(model, stream, chars, window=window, device=device, token_nats=token_nats)
    while True:
        try:
            done, total = next(run)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)
