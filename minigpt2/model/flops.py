"""How much arithmetic a training step is, and what share of the GPU's peak it reached (MFU).

MFU (model FLOPs utilisation) = achieved training FLOP/s / the chip's peak FLOP/s. It says how well
the hardware is used, independently of model size: nanoGPT-style GPT-2 training reaches 40-50% on
an A100/H100 in bf16.
"""

from __future__ import annotations

import torch

from minigpt2.model.config import GPTConfig

# Dense bf16/fp16 tensor-core peak of the GPUs MFU is reported for (FLOP/s, no sparsity); the
# first name found in torch.cuda.get_device_name() wins, so variants come before the plain name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's matmuls.

    The position embedding is a lookup, not a matmul, so it is left out; the token embedding is
    counted, since it is also the output layer's weight.
    """
    n = config.vocab_size * config.n_embd + config.n_layer * 12 * config.n_embd**2
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense 16-bit peak, for MFU; None where unknown (CPU, MPS, fp32, other GPUs)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
