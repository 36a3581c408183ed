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

The model is all this file holds. Generation's KV cache (kvcache.py) enters only where marked
"for generation": attention reads earlier tokens' keys and values from it, `GPT.forward` takes the
new tokens' position ids from it, and `GPT.new_cache` makes one. Without a cache every call is a
whole text from position 0, as in training.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from minigpt2.model.config import GPTConfig
from minigpt2.model.kvcache import CacheSlots, KVCache, StaticKVCache


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

    Speed: `F.scaled_dot_product_attention` (SDPA) computes what the plain version does, up to
    rounding,

        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)       # (B, nh, T, S) scores
        att = att.masked_fill(~mask, float("-inf"))           # hide the future
        att = F.dropout(att.softmax(dim=-1), dropout_p)       # weights summing to 1 per query
        y = att @ v                                           # (B, nh, T, hs)

    but in one fused kernel (FlashAttention or memory-efficient attention where the device has
    one) that never stores the (T, S) score matrix.
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
        if cache is None:  # training, or a whole text: the T tokens see each other causally
            y = causal_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
        else:  # ----- for generation (kvcache.py): earlier tokens' keys and values come from the cache
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
    official weights were trained with; the exact erf GELU differs by up to 4.7e-4 per activation
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
        """For generation: an empty cache (kvcache.py) for `batch_size` sequences of up to `max_len`
        tokens (default: the context), on the model's device and dtype. `static=True` gives the
        fixed-shape `StaticKVCache`."""
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
        if cache is None:  # a whole text: positions 0..T-1
            if T > self.config.n_positions:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.n_positions} tokens")
            positions = torch.arange(T, device=idx.device)  # (T,)
        else:  # for generation: the cache slots say each new token's position
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
