"""Text generation: prefill the prompt once, then decode one token at a time from a KV cache.

Small functions in the style of gpt-fast. The model knows nothing about sampling, and the
sampler nothing about the model:

    prefill           run the (left-padded) prompts through the model, filling the KV cache
    EagerDecoding     the decode step against a growing cache (the default; a CPU's compiled step)
    StaticDecoding    the fixed-shape decode step (compiled once, CUDA graphs on a GPU)
    sample_next       turn last-position logits into the next token ids
    generate_tokens   the loop: prefill, then pick / decode until done (with utf8.Utf8Guard: whole
                      characters only)

The state of a generation lives in three places, each with one owner:

    the KV cache (`model/kvcache.py`)   keys and values, which slots hold real tokens, each
                                        sequence's next position id
    `Decoder`                           the model side: the windows of text in the model's view
                                        (a sliding window past the context), the cache, the step
    `Picker`                            the choosing side: the repetition penalty's record of each
                                        text's tokens, the UTF-8 guard's state, the generator

The model is called with `cache=cache.append(n)`, the only way to obtain cache slots, so nothing
can be written to the wrong slot or read unwritten.

Batches hold prompts of different lengths by padding them on the *left*: every sequence's
newest token then sits in the same cache slot, so one decode step serves them all. Each
sequence's position ids start at 0 at its first real token, and an attention mask hides the
padding, so a padded sequence computes exactly what it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minigpt2.checks import finite
from minigpt2.errors import MiniGPT2Error, OptionError
from minigpt2.generation.utf8 import ACCEPT, Utf8Guard
from minigpt2.model.gpt import GPT
from minigpt2.model.kvcache import CacheSlots, KVCache

# ----- choosing the next token ------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token.

    greedy: always the most likely token (deterministic; the other settings are ignored
        except the repetition penalty).
    temperature: divides the logits; < 1 sharpens the distribution, > 1 flattens it; 0 is greedy.
    top_k: sample only among the k most likely tokens (None or 0: all).
    top_p: nucleus sampling: only among the most likely tokens whose probabilities add up to p.
    repetition_penalty: > 1 makes tokens already in the text less likely (the CTRL paper's rule:
        positive logits are divided by it, negative ones multiplied).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # NaN passes every `< 0` test and then samples garbage; inf divides the logits into NaN.
        # So: finite first, then the range. A temperature below MIN_TEMPERATURE (other than 0)
        # overflows float32 logits into inf, which softmax turns into NaN: 0 is the greedy setting.
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t == 0 or MIN_TEMPERATURE <= t < math.inf):
            raise OptionError(
                "temperature",
                f"must be 0 or more (0 means greedy): a finite number, 0 or at least {MIN_TEMPERATURE:g}, got {t!r}",
            )
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
                raise OptionError("top_k", f"must be 0 (off) or a positive number of tokens, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise OptionError("top_p", f"must be in (0, 1], got {p!r}")  # NaN fails `0 < p` too
        finite("repetition_penalty", self.repetition_penalty, low=0, low_open=True)


MIN_TEMPERATURE = 1e-6


GREEDY = Sampling(greedy=True)  # the default of every entry point: deterministic, as transformers' generate


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens that already occur (seen: (B, vocab) bool) less likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_p_filter(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on logits sorted in descending order (B, n).

    Keeps the smallest set of most likely tokens whose probabilities sum to at least p (the first
    token always stays: nothing comes before it) and sets the rest to -inf.
    """
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the more likely tokens
    return sorted_logits.masked_fill(before >= p, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row (B, n) → (B,), drawn with probability `probs` (the exponential race).

    With E_i ~ Exp(1) independent, argmax(p_i / E_i) is index i with probability p_i: the same
    distribution as torch.multinomial, but a few element-wise operations instead of a cumulative
    sum and search, and no host-device synchronisation on a GPU (gpt-fast's trick).
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(dim=-1)


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, vocab); returns ids (B,).

    Logits already masked to -inf (by the UTF-8 guard) are never drawn. With top-k, only the k
    best logits go on (50 instead of 50,257 values to sort, softmax and draw from); top-p then
    works on them in their sorted order.
    """
    if sampling.greedy or sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if sampling.temperature != 1:
        logits = logits / sampling.temperature
    candidates = None  # the vocabulary ids of the columns of `logits`, when it is a subset
    if sampling.top_k:
        logits, candidates = torch.topk(logits, min(sampling.top_k, logits.size(-1)), dim=-1)  # (B, k), sorted
    if sampling.top_p is not None and sampling.top_p < 1:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)  # (B, vocab)
        logits = top_p_filter(logits, sampling.top_p)
    choice = draw(torch.softmax(logits, dim=-1), generator)  # (B,)
    if candidates is None:
        return choice
    return candidates.gather(-1, choice[:, None]).squeeze(-1)  # (B,)


# ----- running the model ------------------------------------------------------------------


def left_pad(rows: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → ids (B, T) left-padded with 0, and a mask (B, T) that is True on real tokens."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            idx[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[i, T - len(r) :] = True
    return idx.to(device), valid.to(device)


def prefill(model: GPT, idx: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the left-padded prompts (B, T) through the model, appending them to `cache`.

    valid (B, T) is True on real tokens: the cache gives each sequence position ids from 0 at its
    first real token and hides the padding from attention. Returns the logits of each prompt's
    last token (B, vocab).
    """
    return model(idx, cache=cache.append(valid))[:, -1, :]


def model_step(model: GPT, token: torch.Tensor, slots: CacheSlots) -> torch.Tensor:
    """One new token per sequence (B, 1) in the cache slots `slots`; its logits (B, vocab)."""
    return model(token, cache=slots)[:, -1, :]


class EagerDecoding:
    """The decode step against a `KVCache`: each step attends to the filled slots only, so the
    shapes grow by one token per step. The cheapest step without a compiler; with `compile`,
    torch.compile'd for growing shapes (`dynamic=True`), the way to compile on a CPU."""

    static = False

    def __init__(self, compile: bool = False) -> None:
        self.step = compiled(model_step, dynamic=True) if compile else model_step

    def __call__(self, model: GPT, token: torch.Tensor, slots: CacheSlots) -> torch.Tensor:
        return self.step(model, token, slots)


class StaticDecoding:
    """The decode step against a `StaticKVCache`: the same shapes at every step (all slots, a mask,
    a tensor slot), so torch.compile captures it once, with CUDA graphs on a GPU (mode
    "reduce-overhead"): that removes the per-layer Python and kernel-launch overhead that
    dominates batch-1 decoding on a fast GPU. Uncompiled it is only a check of the same code path."""

    static = True

    def __init__(self, compile: bool = True, device: torch.device | None = None) -> None:
        self.step = model_step
        if compile:
            mode = "reduce-overhead" if device is not None and device.type == "cuda" else None
            self.step = compiled(model_step, mode=mode, fullgraph=True, dynamic=False)

    def __call__(self, model: GPT, token: torch.Tensor, slots: CacheSlots) -> torch.Tensor:
        # CUDA graphs hand back the same output memory at every replay: copy it out before the next one.
        return self.step(model, token, slots).clone()


def prepare_for_decoding(model: GPT) -> GPT:
    """Store every linear layer's weight column by column, for faster decoding on a CPU.

    Same values, same (out, in) shapes, another memory layout. At every decode step the single
    new hidden vector is multiplied by each of these matrices (49 at GPT-2 small; the output
    layer's 38.6M numbers are the largest read of the step). Stored row by row, as PyTorch does
    by default, each output is a dot product along one row; stored column by column, the product
    adds up `in` scaled columns, a form the CPU's BLAS streams through memory faster. It is
    also the layout of the official checkpoint's Conv1D weights, which is why transformers'
    blocks decode faster than row-by-row ones. On our 2-core test machine
    (benchmarks/bench_matvec.py) the 48 block products took 26.0 instead of 29.1 ms and the
    output layer's 8.6 instead of 13.8 ms; whole decoding steps went from 23.8 to 27.1 tokens/s.
    Other devices are left as they are.

    The tied embedding (the same tensor) still looks tokens up correctly, only a little slower.
    int8 layers (`quantize_model`) are left alone: their CPU kernel has its own packed copy.
    Do not train the model afterwards: every step would copy the gradients into this layout.
    Returns the model, changed in place.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu" and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()  # (out, in) with strides (1, out)
    return model


def compiled(fn, **options):
    """`torch.compile(fn, **options)`, with a failure to compile turned into one clear error.

    Compilation happens at the first call and needs a working toolchain (a C++ compiler on a
    CPU, Triton on a GPU); without one, torch raises from deep inside its compiler.
    """
    compiled_fn = torch.compile(fn, **options)

    def call(*args):
        try:
            return compiled_fn(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise MiniGPT2Error(
                f"torch.compile could not compile the decode step ({reason.strip()}); "
                "generate without compiling (`compile` off): the tokens are the same"
            ) from None

    return call


class Picker:
    """The choosing side of a generation, step after step: the repetition penalty's memory of each
    text's tokens, the UTF-8 guard's state of each, and the draw itself."""

    def __init__(self, prompts, vocab_size: int, sampling: Sampling, generator, guard: Utf8Guard | None, device):
        self.sampling, self.generator, self.guard = sampling, generator, guard
        self.rows = torch.arange(len(prompts), device=device)
        self.states = torch.full((len(prompts),), ACCEPT, dtype=torch.long, device=device)  # UTF-8 automaton
        self.seen = None  # (B, vocab): which tokens each text holds, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                self.seen[i, torch.tensor(sorted(set(p)), device=device)] = True

    def __call__(self, logits: torch.Tensor, last_step: bool = False) -> torch.Tensor:
        """The next token (B,) of every sequence from its last-position logits (B, vocab)."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits.float(), self.seen, self.sampling.repetition_penalty)
        if self.guard is not None:
            logits = self.guard.mask(logits, self.states, last_step=last_step)
        token = sample_next(logits, self.sampling, self.generator)  # (B,)
        if self.guard is not None:
            self.states = self.guard.advance(self.states, token)
        if self.seen is not None:
            self.seen[self.rows, token] = True
        return token


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    generator: torch.Generator | None = None,
    guard: Utf8Guard | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    static: bool | None = None,
) -> Iterator[list[int]]:
    """Yield the next token of every sequence, step by step, `max_new_tokens` times at most.

    prompts: one token list per sequence (non-empty; lengths may differ). A prompt longer than
        the context is cut to its last `n_positions` tokens.
    guard: a `Utf8Guard` to keep the output valid UTF-8. At the last step it also insists on
        a token that ends on a character boundary, so no partial character is left dangling.
    eot_id: a sequence that draws it is finished; generation stops when all are.
    use_cache: False recomputes the whole context at every step (for comparison).
    compile: decode with a torch.compile'd step: on a GPU the static-shape step with CUDA
        graphs; elsewhere the ordinary step, compiled for shapes that grow with the text.
    static: decode with the static-shape step, compiled or not (default: when compiling for
        CUDA). On a CPU it is slower: it attends over every slot of the cache at every step.

    When a sequence fills the context, all sequences continue from the most recent half of
    their text (a sliding window): see `Decoder.advance`.
    """
    windows = [list(p[-model.config.n_positions :]) for p in prompts]  # the tokens in the model's view
    if any(not w for w in windows):
        raise ValueError("every prompt needs at least one token (use <|endoftext|> for an empty prompt)")
    device = model.wte.weight.device
    pick = Picker(prompts, model.config.vocab_size, sampling, generator, guard, device)
    decoder = Decoder(model, windows, use_cache=use_cache, compile=compile, static=static)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = decoder.start()
    for step in range(max_new_tokens):
        token = pick(logits, last_step=step == max_new_tokens - 1)  # (B,)
        yield token.tolist()
        if eot_id is not None:
            done |= token == eot_id
            if bool(done.all()):
                return
        if step < max_new_tokens - 1:
            logits = decoder.advance(token)


class Decoder:
    """The model side of a generation: the windows of text in the model's view, the KV cache and the
    decode strategy. `start` prefills the windows; `advance` appends one token per sequence and
    returns the logits of the next.

    The strategy is `EagerDecoding` (a `KVCache`; compiled for growing shapes when `compile`) or
    `StaticDecoding` (a `StaticKVCache`; compiled once, with CUDA graphs on a GPU): `static`
    chooses, by default the static one exactly when compiling for CUDA. Without a cache
    (`use_cache=False`) every step runs the whole window again.
    """

    def __init__(self, model: GPT, windows: list[list[int]], *, use_cache=True, compile=False, static=None):
        self.model, self.windows = model, windows
        self.device = model.wte.weight.device
        static = (compile and self.device.type == "cuda") if static is None else static
        self.strategy = StaticDecoding(compile, self.device) if static else EagerDecoding(compile)
        self.cache = model.new_cache(len(windows), static=static) if use_cache else None

    def start(self) -> torch.Tensor:
        """Prefill the current windows into an emptied cache; the last position's logits (B, vocab)."""
        idx, valid = left_pad(self.windows, self.device)
        if self.cache is None:  # a throwaway cache just big enough: the whole window is recomputed
            return prefill(self.model, idx, valid, self.model.new_cache(len(self.windows), idx.size(1)))
        self.cache.reset()
        return prefill(self.model, idx, valid, self.cache)

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Append `token` (B,) to every sequence; the logits (B, vocab) of the token after it.

        When a sequence outgrows the context, all continue from the most recent half of their
        text (a sliding window): the cache is emptied and that half is prefilled again.
        """
        n_ctx = self.model.config.n_positions
        for w, t in zip(self.windows, token.tolist()):
            w.append(t)
        if max(len(w) for w in self.windows) > n_ctx:  # the context is full: keep the most recent half
            self.windows[:] = [w[-(n_ctx // 2) :] for w in self.windows]
            return self.start()
        if self.cache is None:
            return self.start()
        return self.strategy(self.model, token[:, None], self.cache.append(1))  # token: (B, 1)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling = GREEDY, **kwargs) -> torch.Tensor:
    """The prompts `idx` (B, T) followed by up to `max_new_tokens` generated tokens each."""
    steps = list(generate_tokens(model, idx.tolist(), max_new_tokens, sampling, **kwargs))
    new = torch.tensor(steps, dtype=torch.long, device=idx.device).T.reshape(idx.size(0), -1)  # (B, steps)
    return torch.cat([idx, new], dim=1)
