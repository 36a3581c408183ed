"""The plainest fast GPT-2 training step in PyTorch: the yardstick for minigpt2's own (issue 22 §3).

Nothing but the model (SDPA attention, tied embeddings), cross-entropy, backward, clipping and
AdamW (fused where CUDA), all under torch.compile when asked. `bench_train.py` races it against
minigpt2's `Trainer.train_step` on the same weights and windows: whatever minigpt2 is slower by is
what its trainer adds around the model.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, C: int, nh: int) -> None:
        super().__init__()
        self.nh = nh
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT2(nn.Module):
    def __init__(self, vocab: int, n_ctx: int, n_layer: int, n_head: int, C: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(n_ctx, C)
        self.h = nn.ModuleList(Block(C, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied output layer
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def plain_step(config, device: torch.device, dtype: torch.dtype, compile: bool):
    """A `step(x, y)` that trains a fresh PlainGPT2 of `config`'s shape by one AdamW step."""
    torch.manual_seed(0)
    model = PlainGPT2(config.vocab_size, config.n_positions, config.n_layer, config.n_head, config.n_embd).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer_step(lambda: forward(x, y), model.parameters(), opt, device, dtype)

    return step


def optimizer_step(loss_fn, params, opt: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype) -> None:
    """The plain training step: the loss under autocast, backward, clip to 1.0, AdamW, zero the gradients."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
