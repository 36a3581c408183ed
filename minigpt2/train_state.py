"""What --resume needs besides the weights: AdamW's moments, the step, the RNG states, the loss scaler.

A checkpoint folder holds it in two files, beside the usual config.json + model.safetensors:

    trainer_state.safetensors   tensors: optimizer.<parameter name>.<exp_avg|exp_avg_sq|step>,
                                rng.torch_cpu, rng.cuda.<i>
    trainer_state.json          everything else: step, tokens, the TrainConfig, parameter names and
                                optimizer groups, the loss scaler, the data position

No pickle anywhere: a checkpoint from a stranger can be read without running their code. The
optimizer state is keyed by parameter *name*, not by position, so a run resumes on one process or
many, sharded or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import write_json
from .rundir import STATE_JSON, STATE_TENSORS

MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # what AdamW keeps per parameter


def optimizer_tensors(opt_state: dict, param_names: list[str]) -> dict[str, torch.Tensor]:
    """An optimizer `state_dict()` (state keyed by parameter index) as named tensors on the CPU."""
    tensors = {}
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{param_names[index]}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict], param_names: list[str]) -> dict:
    """The inverse of `optimizer_tensors`: a state dict `torch.optim.AdamW.load_state_dict` takes."""
    index = {name: i for i, name in enumerate(param_names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, field = key[len("optimizer.") :].rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    return {"state": state, "param_groups": [{**g, "betas": tuple(g["betas"])} for g in groups]}


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators that dropout draws from, so a resumed run draws the same numbers."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and device.type == "cuda" and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def write_state(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """The tensors first, the JSON last: a folder with trainer_state.json is complete."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / STATE_TENSORS))
    write_json(folder / STATE_JSON, state)


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state JSON, tensors) of a checkpoint, checked to hold everything a resume needs.

    Raises `CheckpointError` saying what is wrong (unreadable JSON, a truncated tensor file, a
    missing tensor), so the caller can name the checkpoint and fall back to an older one.
    """
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{STATE_JSON} cannot be read ({e})") from None
    needed = ("step", "tokens", "param_names", "param_groups")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise CheckpointError(f"{STATE_JSON} lacks one of {', '.join(needed)}")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except Exception as e:  # SafetensorError (truncated, corrupted) or OSError
        raise CheckpointError(f"{STATE_TENSORS} cannot be read ({e})") from None
    expected = ["rng.torch_cpu"] + [f"optimizer.{n}.{m}" for n in state["param_names"] for m in MOMENTS]
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{STATE_TENSORS} lacks {', '.join(missing[:3])}{more}")
    return state, tensors
