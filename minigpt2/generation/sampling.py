"""From text prompts to text samples: batching, streaming, stop strings, and what came out.

`generate_text` wraps the token loop of `minigpt2.generation.generate` for people: it tokenizes the prompts,
runs all samples of all prompts as one left-padded batch, turns tokens back into text as they
arrive (only whole characters), stops at `<|endoftext|>` or a stop string, and reports speed
and the share of Chinese/Japanese/Korean characters in each sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt2.generation import SAMPLE_SEED, SAMPLE_TOKENS
from minigpt2.generation.generate import GREEDY, Sampling, generate_tokens
from minigpt2.generation.utf8 import Utf8Guard, Utf8Stream
from minigpt2.model.gpt import GPT

# Code point ranges counted as CJK: ideographs (with extensions and compatibility forms),
# CJK punctuation, kana, Hangul, and full-width forms such as "，" and "！".
CJK_RANGES = (
    (0x2E80, 0x2FDF),  # radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3100, 0x31BF),  # bopomofo
    (0x3400, 0x4DBF),  # ideographs, extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0xFE30, 0xFE4F),  # compatibility forms
    (0xFF00, 0xFFEF),  # half-width and full-width forms
    (0x20000, 0x3134F),  # ideographs, extensions B-G
)


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def cjk_share(text: str) -> float:
    """Share of CJK characters among the non-whitespace characters of `text` (0 if none)."""
    chars = [c for c in text if not c.isspace()]
    return sum(map(is_cjk, chars)) / len(chars) if chars else 0.0


@dataclass
class Sample:
    """One generated continuation."""

    prompt: str
    text: str  # the continuation only, without the prompt
    tokens: list[int] = field(default_factory=list)  # generated ids, without <|endoftext|>
    finish_reason: str = "length"  # "length", "endoftext" or "stop"
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def cjk_share(self) -> float:
        return cjk_share(self.text)

    def record(self) -> dict:
        """The sample as JSON-ready figures (sample.py --json)."""
        return {
            "text": self.text,
            "tokens": len(self.tokens),
            "finish_reason": self.finish_reason,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "cjk_share": round(self.cjk_share, 4),
        }

    def summary(self) -> str:
        """The line sample.py prints after the sample: length, speed, CJK share, why it ended."""
        speed = f"{self.tokens_per_second:.1f} tok/s"
        return f"{len(self.tokens)} tokens · {speed} · CJK {self.cjk_share:.0%} · {self.finish_reason}"


class _Row:
    """The text side of one sequence: decoding, stop strings, what was already shown."""

    def __init__(self, prompt: str, stops: Sequence[str]) -> None:
        self.sample = Sample(prompt=prompt, text="")
        self.stream = Utf8Stream()
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars that may start a stop string
        self.shown = 0
        self.done = False

    def push(self, token: int, data: bytes | None) -> str:
        """Add a token (None bytes: <|endoftext|>); return the text that is now safe to show."""
        if data is None:
            return self.finish("endoftext")
        self.sample.tokens.append(token)
        self.sample.text += self.stream.push(data)
        start = max(0, self.shown - self.hold)  # a stop string can only begin after what was shown minus the hold
        hits = [i for i in (self.sample.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.sample.text = self.sample.text[: min(hits)]
            return self.finish("stop")
        safe = len(self.sample.text) - self.hold
        return self._show(safe)

    def finish(self, reason: str) -> str:
        if reason == "length":
            self.sample.text += self.stream.flush()
        self.sample.finish_reason = reason
        self.done = True
        return self._show(len(self.sample.text))

    def _show(self, end: int) -> str:
        piece = self.sample.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece


@dataclass
class Sampler:
    """A model ready to sample from: loaded, checked against its tokenizer, laid out for decoding."""

    source: str
    model: GPT
    enc: object  # tiktoken.Encoding
    guard: Utf8Guard | None
    inferred_config: bool  # a bare .safetensors file: its shape was inferred from the tensors
    checkpoint: Path | None = None  # for a training run's directory: the checkpoint loaded from it

    def notes(self) -> list[str]:
        """What the user should know about where the model came from (sample.py prints them)."""
        notes = []
        if self.checkpoint is not None:
            final = self.checkpoint.name == "final"
            which = "its final checkpoint" if final else "its newest checkpoint (no final one yet)"
            notes.append(f"'{self.source}' is a training run: sampling {which}, {self.checkpoint.name}")
        if self.inferred_config:
            shape = f"{self.model.config.n_layer} layers, {self.model.config.n_head} heads of 64"
            notes.append(f"note: '{self.source}' has no config.json; its shape was inferred from the tensors ({shape})")
        return notes

    def record(self, prompt: str, index: int, sample: Sample, **extra) -> dict:
        """Sample `index` of `prompt` as one JSON-ready record (sample.py --json): which model, then
        the sample's figures, then `extra` (the seed, the device)."""
        checkpoint = {"checkpoint": str(self.checkpoint)} if self.checkpoint is not None else {}
        return {"model": self.source, **checkpoint, "prompt": prompt, "sample": index, **sample.record(), **extra}


def load_for_sampling(
    source: str,
    prompts: Sequence[str],
    num_samples: int,
    *,
    device,
    dtype,
    quantize: str | None = None,
    utf8_guard: bool = True,
) -> Sampler:
    """Load `source` for `generate_text`, refusing what would fail later: a vocabulary smaller than
    the tokenizer's, or a batch (prompts x `num_samples`) whose KV cache cannot fit in memory."""
    from minigpt2.checks import check_decode_memory, check_vocab_fits
    from minigpt2.generation.generate import prepare_for_decoding
    from minigpt2.io.tokenizer import load_tokenizer
    from minigpt2.io.weights import open_model, run_checkpoint

    checkpoint = run_checkpoint(source)
    loaded = open_model(source, device=device, dtype=dtype, quantize=quantize)
    model = loaded.model
    enc = load_tokenizer(source, vocab_size=model.config.vocab_size)
    check_vocab_fits(model.config, enc, model_name=f"model '{source}'", tokenizer_name="its tokenizer")
    longest = max(len(enc.encode_ordinary(p)) for p in prompts) + 1
    check_decode_memory(model.config, num_samples, longest, dtype.itemsize, device)
    model = prepare_for_decoding(model)
    guard = Utf8Guard.for_tokenizer(enc, model.config.vocab_size, device) if utf8_guard else None
    return Sampler(source, model, enc, guard, loaded.config_inferred, checkpoint)


def encode_prompt(enc, prompt: str, n_ctx: int) -> tuple[list[int], bool]:
    """Token ids of a prompt: `<|endoftext|>` if empty, the last `n_ctx` if too long (then True)."""
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]
    return ids[-n_ctx:], len(ids) > n_ctx


def generate_text(
    model: GPT,
    enc,
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    stop_at_endoftext: bool = True,
    utf8_guard: bool | Utf8Guard = True,
    seed: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Sample]:
    """Continue each prompt `num_samples` times; samples are returned prompt by prompt.

    The default `sampling` is greedy, as for `generate` and `generate_tokens` (and transformers'
    generate): pass e.g. `Sampling(top_k=50)`, what sample.py uses, to draw.

    All samples run as one batch. `on_text(i, piece)` is called with new text of sample i as
    soon as it is whole characters (and cannot be the start of a stop string). With the UTF-8
    guard on (the default; pass a prebuilt `Utf8Guard` to reuse one), no sample ever contains
    U+FFFD or a dangling partial character. `seed` makes the samples reproducible on a device.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be 0 or more")
    device = model.wte.weight.device
    n_ctx = model.config.n_positions
    rows = [_Row(p, stop) for p in prompts for _ in range(num_samples)]
    ids = [encode_prompt(enc, p, n_ctx)[0] for p in prompts for _ in range(num_samples)]
    guard = Utf8Guard.for_tokenizer(enc, model.config.vocab_size, device) if utf8_guard is True else utf8_guard
    generator = _generator(device, seed)

    def emit(i: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(i, piece)

    start = time.perf_counter()
    steps = generate_tokens(
        model,
        ids,
        max_new_tokens,
        sampling,
        generator=generator,
        guard=guard or None,
        eot_id=enc.eot_token if stop_at_endoftext else None,
        use_cache=use_cache,
        compile=compile,
    )
    for tokens in steps:
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.done:
                continue
            data = None if (stop_at_endoftext and token == enc.eot_token) else _bytes(enc, token)
            emit(i, row.push(token, data))
            row.sample.seconds = time.perf_counter() - start
        if all(row.done for row in rows):
            break
    for i, row in enumerate(rows):
        if not row.done:
            emit(i, row.finish("length"))
            row.sample.seconds = time.perf_counter() - start
    return [row.sample for row in rows]


def _generator(device, seed: int | None) -> torch.Generator:
    """The draws' random numbers: from `seed` (the same samples on the same device), else fresh ones."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _bytes(enc, token: int) -> bytes:
    try:
        return enc.decode_single_token_bytes(token)
    except KeyError:  # an id the tokenizer does not have (only possible without the guard)
        return b""


SAMPLING = Sampling(top_k=50)  # what sample.py draws with by default; the watching samples use it too


def draw_samples(
    model: GPT,
    enc,
    prompts: Sequence[str],
    max_new_tokens: int = SAMPLE_TOKENS,
    *,
    seed: int = SAMPLE_SEED,
    guard: Utf8Guard | bool = True,
    on_text=None,
) -> list[dict]:
    """One continuation of each prompt, drawn with `seed` (top-k 50, as sample.py), whole UTF-8
    characters only: [{"prompt", "text", "tokens", "finish_reason"}]. Dropout is off while it
    draws; the model's training mode is restored after. The draw has its own generator, so the
    global random state (dropout, batches) is untouched: a run with samples trains exactly as one
    without."""
    was_training = model.training
    model.eval()
    try:
        samples = generate_text(model, enc, list(prompts), max_new_tokens, SAMPLING, seed=seed, utf8_guard=guard,
                                on_text=on_text)  # fmt: skip
    finally:
        model.train(was_training)
    return [
        {"prompt": s.prompt, "text": s.text, "tokens": len(s.tokens), "finish_reason": s.finish_reason} for s in samples
    ]
