"""Text generation: prefill the prompt once, then decode one token at a time from a KV cache.

Small pure functions, in the style of gpt-fast: `prefill` runs the prompt through the model and
fills the cache, `decode_one_token` feeds one new token, `sample_next` turns logits into a token.
The model knows nothing about sampling, and the sampler nothing about the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .model import GPT


def sample_next(
    logits: torch.Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits (B, vocab); returns ids (B, 1).

    Greedy takes the most likely token. Otherwise the logits are divided by `temperature`
    (below 1 sharpens the distribution, above 1 flattens it), optionally cut to the `top_k`
    most likely tokens, and one token is drawn from the softmax.
    """
    if greedy or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def prefill(model: GPT, idx: torch.Tensor, kv_caches: nn.ModuleList) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; return the last logits (B, vocab)."""
    return model(idx, kv_caches=kv_caches, pos=0)[:, -1, :]


def decode_one_token(model: GPT, token: torch.Tensor, kv_caches: nn.ModuleList, pos: int) -> torch.Tensor:
    """Feed one token per sequence (B, 1) at position `pos`; return its logits (B, vocab)."""
    return model(token, kv_caches=kv_caches, pos=pos)[:, -1, :]


@torch.no_grad()
def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` new tokens (each (B, 1)) continuing the prompt `idx` (B, T).

    When the text fills the model's context, the cache is rebuilt from the last half of the
    context (a sliding window), so generation can go on past n_positions tokens.
    """
    n_ctx = model.config.n_positions
    idx = idx[:, -n_ctx:]
    kv_caches = model.new_kv_caches(idx.size(0))
    logits = prefill(model, idx, kv_caches)
    pos = idx.size(1)
    for _ in range(max_new_tokens):
        token = sample_next(logits, greedy=greedy, temperature=temperature, top_k=top_k, generator=generator)
        yield token
        idx = torch.cat([idx, token], dim=1)  # (B, T + 1)
        if pos == n_ctx:  # the context is full: keep the most recent half and start over
            idx = idx[:, -(n_ctx // 2) :]
            logits = prefill(model, idx, kv_caches)
            pos = idx.size(1)
        else:
            logits = decode_one_token(model, token, kv_caches, pos)
            pos += 1


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """The prompt followed by `max_new_tokens` generated tokens, (B, T + max_new_tokens)."""
    new = list(generate_tokens(model, idx, max_new_tokens, **sampling))
    return torch.cat([idx, *new], dim=1)
