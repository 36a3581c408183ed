"""Choosing where the model runs and in what precision."""

from __future__ import annotations

import torch

from .errors import MiniGPT2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; a named device must be available."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MiniGPT2Error(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniGPT2Error(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; use `device=cpu` or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MiniGPT2Error(
            f"device {name!r} asked for, but Apple's MPS is not available here; use `device=cpu` or auto"
        )
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The precision for `--dtype`, the one place that decides it (sampling and training alike).

    `auto` (or None): bfloat16 on a GPU that has it, float16 on older GPUs, float32 on the CPU and
    Apple's MPS. bfloat16 keeps float32's range, so nothing overflows; float16 does not, which is why
    training then scales the loss (see the trainer), and why it is refused on a CPU, where it is
    also slower than float32.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise MiniGPT2Error(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise MiniGPT2Error("float16 needs a GPU; on the CPU use float32 or bfloat16")
    return DTYPES[name]
