"""PEFT's adapter files: a LoRA run's `adapter/` folder, which `peft.PeftModel.from_pretrained` reads.

    CHECKPOINT/adapter/adapter_config.json         the LoRA settings, as PEFT names them (`peft_config`)
    CHECKPOINT/adapter/adapter_model.safetensors   the adapters under PEFT's names (`lora.adapter_state`)

The adapters themselves (`LoRALinear`, their names, merging) are `minigpt2/model/lora.py`'s; this
module only reads and writes the files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minigpt2.errors import CheckpointError
from minigpt2.files import read_json_object, write_atomically
from minigpt2.model.lora import adapter_state, lora_settings, trainable_tokens

ADAPTER_DIR = "adapter"  # inside a LoRA run's checkpoint folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(model: nn.Module, base_model_name_or_path: str | os.PathLike | None) -> dict:
    """adapter_config.json for PEFT: a LoRA of these settings on a transformers GPT2LMHeadModel.

    GPT-2 in transformers uses `Conv1D` layers whose weight is stored (in, out), the transpose of
    nn.Linear's. A and B are stored the same way either way ((r, in) and (out, r)); only the
    merge differs, and `fan_in_fan_out: true` tells PEFT to transpose B @ A before adding it
    to such a weight. Trainable tokens are listed in `trainable_token_indices` (PEFT ties the
    output layer's rows to them, as GPT-2 ties its weights). Fields left out take PEFT's defaults.
    """
    s = lora_settings(model)
    tokens = trainable_tokens(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": s["r"],
        "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"],
        "target_modules": s["targets"],
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "trainable_token_indices": None if tokens is None else tokens.token_adapter.token_indices.tolist(),
        "inference_mode": True,
    }


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter as PEFT saves it: adapter_config.json + adapter_model.safetensors.

    `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory)` then
    computes what the merged checkpoint computes. `base_model_name_or_path` is the model the run
    started from (None for a random initialisation; a grown vocabulary's base is the grown model,
    which the run keeps). Files are written atomically.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save the adapter to '{directory}': it is a file, not a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, state_dict)
    config = json.dumps(peft_config(model, base_model_name_or_path), indent=2) + "\n"
    write_atomically(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(config, encoding="utf-8"))
    return directory


def read_adapter_config(checkpoint: str | os.PathLike) -> dict | None:
    """The adapter_config.json in `checkpoint/adapter/` (a LoRA run's checkpoint), or None."""
    path = Path(checkpoint) / ADAPTER_DIR / ADAPTER_CONFIG
    if not path.is_file():
        return None
    config = read_json_object(path, "a PEFT adapter_config.json", CheckpointError)
    targets, r, alpha = config.get("target_modules"), config.get("r"), config.get("lora_alpha")
    names = [targets] if isinstance(targets, str) else targets if isinstance(targets, list) else [0]
    for name, ok in (
        ("target_modules", targets is None or all(isinstance(t, str) for t in names)),
        ("r", r is None or type(r) is int and r > 0),
        ("lora_alpha", alpha is None or type(alpha) in (int, float) and math.isfinite(alpha)),
    ):  # (checked as run.json is: a damaged file is one line naming the field, not a traceback later)
        if not ok:
            raise CheckpointError(f"'{path}' is damaged: \"{name}\" is {config.get(name)!r:.60}; it should hold "
                                  f"{'module names' if name == 'target_modules' else 'a positive number'}")  # fmt: skip
    return config


def adapted_tensors(checkpoint: str | os.PathLike, names: Sequence[str]) -> dict | None:
    """For `compare`: which of `names` (official tensor names) a LoRA checkpoint adapted.

    Reads `checkpoint/adapter/adapter_config.json`; None when there is none (not a LoRA run's
    checkpoint). Returns {"checkpoint", "r", "alpha", "targets", "adapted": [names]}: the weights
    (not the biases) of the targeted layers, whose update has rank at most r.
    """
    config = read_adapter_config(checkpoint)
    if config is None:
        return None
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    pattern = re.compile(r"h\.\d+\.(" + "|".join(map(re.escape, targets)) + r")\.weight")
    return {
        "checkpoint": str(checkpoint),
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "targets": targets,
        "adapted": [n for n in names if targets and pattern.fullmatch(n)],
    }
