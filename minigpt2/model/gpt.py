"""GPT-2, written out box by box.

The whole model is the classic diagram, top to bottom. Every box is an `nn.Module` whose name is
the name of its tensors in the official checkpoint, so a forward hook on `h.7.attn.c_proj` sees
the output of the layer whose weight is stored as `h.7.attn.c_proj.weight`.

    token ids                                   (B, T)
       │
    wte  Embedding: a learned vector per token  (B, T, C)
    wpe  Positional encoding: a learned vector  (T, C)     added to wte's output
       │ per position 0..n_positions-1
    drop
       │
    h.0 … h.{n_layer-1}  Transformer block × N
       │   x = x + attn(ln_1(x))    causal self-attention: each token gathers from earlier tokens
       │   x = x + mlp(ln_2(x))     MLP: each token is transformed on its own
       │
    ln_f  Final layer norm
       │
    lm_head  Output layer: a score per vocabulary entry (B, T, vocab_size)
             (it reuses wte's weight: "tied" embeddings)

Shapes use B = batch size, T = tokens in this call, S = tokens attended to (T plus any cached),
C = n_embd (width), nh = n_head, hs = head size = C / nh.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt2.model.config import GPTConfig


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention in which the T queries are the *last* T of the S keys, each seeing only the past.

    q is (B, nh, T, hs); k and v are (B, nh, S, hs) with S >= T. Query i sits at position
    S - T + i and may attend to keys 0..S-T+i. Three cases:

    - T == S, the whole text at once (training, or the first pass over a prompt): the usual
      lower-triangular mask, which SDPA builds itself with `is_causal=True` (and may then use a
      fused kernel that never materialises it).
    - T == 1, one new token against a cache: it may see every key, so no mask at all.
    - otherwise, a chunk of new tokens against a cache: the triangle must be aligned to the
      bottom-right corner. SDPA's `is_causal=True` aligns it top-left, which would hide most of
      the cached keys, so we build the mask: key j is visible to query i iff j <= S - T + i.

    Scores are scaled by 1/sqrt(hs) (SDPA's default) so their spread does not grow with the head
    size, which would push the softmax into saturation.
    """
    T, S = q.size(-2), k.size(-2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each token mixes in information from earlier tokens.

    Every token emits a query ("what am I looking for?"), a key ("what do I contain?") and a value
    ("what do I pass on?"). A token's output is the average of the values of the tokens at or
    before it, weighted by how well its query matches their keys. Doing this in `n_head` smaller
    heads lets the layer attend to several things at once.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k and v for all heads in one matrix multiply. The official checkpoint stores them
        # concatenated the same way, as one (C, 3C) tensor in Conv1D's (in, out) orientation;
        # nn.Linear holds the transpose, (3C, C), and weights.py transposes on load and save.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # Mixes the heads' outputs back into the residual stream.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layer: int = 0, cache: CacheSlots | None = None) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = causal_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
        else:  # earlier tokens' keys and values come from the cache, which also says what each query sees
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs): S = the slots this cache lets queries read
            if cache.mask is None:  # no padding anywhere: the causal rule alone
                y = causal_attention(q, k, v, dropout_p=dropout_p)
            else:  # (B, 1, T, S): causal, and hiding padding (and, for a static cache, unwritten slots)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The feed-forward network: widen 4x, GELU, project back. Applied to each token separately.

    GPT-2 uses the tanh approximation of GELU (`gelu_new` in transformers), which is what the
    official weights were trained with; the exact erf GELU differs by up to ~1e-3 per activation
    and would drift the logits away from the reference.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) → (B, T, 4C) → (B, T, C)


class Block(nn.Module):
    """One transformer block: attention, then MLP, each added to the residual stream.

    GPT-2 normalises *before* each sub-layer ("pre-LN": `x + f(ln(x))`) rather than after it as
    in the original Transformer. The residual stream x itself is never normalised inside the
    blocks, so gradients flow straight through all N blocks, which is what made deep stacks
    trainable without warm-up tricks.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer: int = 0, cache: CacheSlots | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """The GPT-2 language model: token ids in, next-token scores out."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # Embedding
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # Positional encoding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))  # Transformer block × N
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)  # Final layer norm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # Output layer
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Make the output layer share the token embedding's weight.

        Reading a token in (wte) and writing it out (lm_head) use the same (vocab, C) matrix:
        the score of token j is the dot product of the final hidden state with j's embedding.
        This saves 38.6M parameters at GPT-2 small size and is how the official model was trained.
        """
        self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms.

        The output projections (`attn.c_proj`, `mlp.c_proj`) get std 0.02 / sqrt(2 * n_layer):
        each block adds two of them to the residual stream, so with 2N additions of independent
        noise the stream's variance would otherwise grow with depth.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # `apply` visits children before their parent, so this runs after c_proj's own (nn.Linear)
        # initialisation above and overrides it.
        if isinstance(module, (CausalSelfAttention, MLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_dropout(self, p: float) -> None:
        """Use dropout probability `p` everywhere from now on (the config records it too).

        The official weights were trained with 0.1; fine-tuning on little text often wants more,
        and a model only used for inference none. Dropout holds no weights, so this is safe at any
        time. (It only acts in `train()` mode.)
        """
        self.config = dataclasses.replace(self.config, dropout=p)  # validates p
        for name, module in self.named_modules():
            # A LoRA adapter's own dropout (`.lora_dropout`, lora.py) is a setting of the adapter,
            # fixed for the life of its run (a resume checks it): not the model's to change.
            if isinstance(module, nn.Dropout) and not name.endswith(".lora_dropout"):
                module.p = p
            if isinstance(module, CausalSelfAttention):
                module.dropout = p

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once (124,439,808 for `gpt2`)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None, *, static: bool = False) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens (default: the context),
        on the model's device and dtype. `static=True` gives the fixed-shape `StaticKVCache`."""
        cls = StaticKVCache if static else KVCache
        return cls(self.config, batch_size, max_len, device=self.wte.weight.device, dtype=self.wte.weight.dtype)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: CacheSlots | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits for every position of `idx` (B, T).

        Args:
            idx: token ids, (B, T).
            targets: if given, (B, T) ids of the token that *follows* each position (usually
                `idx` shifted left by one); entries of -100 are ignored. Then the mean
                cross-entropy loss is returned too.
            cache: for generation, `kv_cache.append(...)`: the cache slots that `idx`'s tokens
                take. Their keys and values are written there, the earlier tokens' are read from
                there, and the slots say each token's position id and what it may attend to.
                Without a cache, `idx` is a whole text from position 0.

        Returns:
            logits (B, T, vocab_size), or (logits, loss) when `targets` is given.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.n_positions} tokens")
            positions = torch.arange(T, device=idx.device)  # (T,)
        else:
            if cache.positions.shape != idx.shape:
                raise ValueError(f"cache slots for {tuple(cache.positions.shape)} tokens, not {tuple(idx.shape)}")
            positions = cache.positions  # (B, T): each sequence's own, counted from its first real token
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C) + (T, C) or (B, T, C) → (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, i, cache)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits
        # Cross-entropy in float32 even under bf16/fp16 autocast: a log-softmax over 50k entries
        # loses too much precision in 16 bits.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss


# ----- for generation: the KV cache ------------------------------------------------------------


class KVCache(nn.Module):
    """The decoding state of a batch: every layer's keys and values, and what each cache slot holds.

    When generating, token t+1 needs the keys and values of tokens 0..t. Those never change once
    computed (a token only ever looks back), so instead of running the whole text through the
    model again for every new token, we keep them here and compute only the new token's.

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
