"""The KV cache: what lets generation compute only the new token's keys and values.

When generating, token t+1 needs the keys and values of tokens 0..t at every layer. Those never
change once computed (a token only ever looks back), so instead of running the whole text through
the model again for every new token, the cache keeps them and the model computes the new token's
only. The model (gpt.py) needs just two things from a cache, handed over as `CacheSlots`: where
to write this call's keys and values (and the keys and values to attend to), and each new token's
position id and attention mask.

    KVCache         the eager cache: each step attends to the filled slots only (keys grow by one)
    StaticKVCache   the same slots with fixed shapes, so torch.compile captures a step once
    CacheSlots      the slots one call's T tokens take (`KVCache.append` is the only way to get them)

Shapes: L = n_layer, B = batch, nh = heads, hs = head size, T = new tokens, S = slots attended to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minigpt2.model.config import GPTConfig


class KVCache(nn.Module):
    """The cache of a batch: every layer's keys and values, and what each cache slot holds.

    Slots are filled left to right, the same slots for every sequence of the batch. A batch of
    prompts of different lengths is padded on the left, so each sequence's newest token sits in
    the same slot; `valid` records which slots hold real tokens and `next_position` each
    sequence's next position id (its real tokens counted, padding not). All of it changes in one
    place, `append`, which is the only way to get `CacheSlots` for the model: a slot cannot be
    written twice, skipped, or read before it is written, and no position passes the context.

    This cache lets each step attend to the filled slots only (the keys grow by one per token),
    the cheapest without a compiler. `StaticKVCache` is the fixed-shape alternative.
    The buffers are allocated once at full length (gpt-fast's design) and are not persistent,
    so a cache never ends up in a state dict or a checkpoint.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        max_len = config.n_positions if max_len is None else max_len
        if not 0 < max_len <= config.n_positions:
            raise ValueError(f"a cache holds 1 to {config.n_positions} tokens (the context), not {max_len}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)  # (L, B, nh, max_len, hs)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len): real tokens
        self.register_buffer("valid", valid, persistent=False)
        next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.register_buffer("next_position", next_position, persistent=False)
        self.context = config.n_positions
        self.length = 0  # slots filled
        self.padded = False  # whether any filled slot is padding (then attention needs a mask)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (a compiled step keeps pointing at them).

        `padded` stays as it was: a batch that was padded once keeps the masked form of the step
        (same results without padding), so a compiled step is not compiled a second time.
        """
        self.valid.zero_()
        self.next_position.zero_()
        self.length = 0

    def append(self, new: int | torch.Tensor) -> CacheSlots:
        """Take the next slots for `new` tokens of every sequence; what the model needs to run them.

        new: the number T of new tokens per sequence, all real; or a (B, T) mask, True on real
        tokens and False on left padding (a batch of prompts of different lengths).
        """
        B = self.valid.size(0)
        if isinstance(new, int):
            real = torch.ones(B, new, dtype=torch.bool, device=self.valid.device)
        else:
            real = new.to(device=self.valid.device, dtype=torch.bool)
            if real.dim() != 2 or real.size(0) != B:
                raise ValueError(f"expected a (batch {B}, T) mask of real tokens, got shape {tuple(real.shape)}")
            self.padded = self.padded or not bool(real.all())  # one host sync, at a prompt only
        start, T = self.length, real.size(1)
        if start + T > self.max_len:
            raise ValueError(
                f"{T} more tokens do not fit: {start} of the cache's {self.max_len} slots are filled "
                f"(a cache holds at most the model's context of {self.context} tokens)"
            )
        self.valid[:, start : start + T] = real
        # Position ids count real tokens only; a padding token borrows its neighbour's (its output is unused).
        positions = (self.next_position[:, None] + real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        self.next_position += real.sum(dim=1)
        self.length = start + T
        return self._slots(start, T, positions)

    def _slots(self, start: int, T: int, positions: torch.Tensor) -> CacheSlots:
        """Eager: queries read slots 0..start+T-1 only; without padding the causal rule needs no mask."""
        end = start + T
        mask = self.attention_mask(start, T, end) if self.padded else None
        return CacheSlots(self, start, positions, mask)

    def attention_mask(self, start: int, T: int, S: int) -> torch.Tensor:
        """(B, 1, T, S): query i (slot start+i) sees key slot j iff j <= start+i and j holds a real token.

        A padding query also sees itself, so no row is all False: that would give NaN, and NaN
        keys and values would then leak into the real tokens' attention.
        """
        j = torch.arange(S, device=self.valid.device)  # key slots
        i = start + torch.arange(T, device=self.valid.device)  # query slots
        causal = j[None, :] <= i[:, None]  # (T, S)
        own = j[None, :] == i[:, None]  # (T, S)
        return ((causal & self.valid[:, None, :S]) | own)[:, None]  # (B, 1, T, S)

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write `k`, `v` (B, nh, T, hs) of `layer` into slots start..start+T-1; return the keys and
        values of slots 0..start+T-1, (B, nh, start+T, hs): attention costs grow with the text."""
        end = start + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache(KVCache):
    """A `KVCache` whose every step has the same shapes: the way to compile a decode step once.

    Queries attend to all `max_len` slots, with a mask that hides the padding and the slots not
    written yet, and the slot to write is a 0-d tensor rather than a Python int. So the step
    reads and writes the same buffers at every position, and torch.compile captures it once
    (with CUDA graphs on a GPU: one launch for the whole step instead of hundreds of small ones,
    which is what limits batch-1 decoding on a fast GPU). Without a compiler it is slower than
    `KVCache`: it attends over every slot at every step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # CUDA graphs replay fixed addresses; telling the compiler these buffers never move lets a
        # step that writes into them be captured (otherwise it is run without graphs).
        for buffer in (self.k, self.v):
            torch._dynamo.mark_static_address(buffer)

    def _slots(self, start: int, T: int, positions: torch.Tensor) -> CacheSlots:
        start_t = torch.tensor(start, device=self.valid.device)  # a tensor: the same graph at every slot
        return CacheSlots(self, start_t, positions, self.attention_mask(start, T, self.max_len))

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write `k`, `v` (B, nh, T, hs) of `layer` into slots start..start+T-1; return all the
        keys and values, (B, nh, max_len, hs); the mask hides what is not to be read."""
        slots = start + torch.arange(k.size(2), device=k.device)  # (T,)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


@dataclass(frozen=True)
class CacheSlots:
    """The slots a call's T new tokens take in a cache, from `KVCache.append`: where the model writes
    their keys and values (`update`), their position ids (B, T), and the attention mask (B, 1, T, S)
    (None: the plain causal rule)."""

    cache: KVCache
    start: int | torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(layer, self.start, k, v)
