"""PEFT's adapter files: a LoRA run's `adapter/` folder, which `peft.PeftModel.from_pretrained` reads.

    CHECKPOINT/adapter/adapter_config.json         the LoRA settings, as PEFT names them (`peft_config`)
    CHECKPOINT/adapter/adapter_model.safetensors   the adapters under PEFT's names (`lora.adapter_state`)

The adapters themselves (`LoRALinear`, their names, merging) are `minigpt2/model/lora.py`'s; this
module only reads and writes the files.

An adapter folder is also a model to the project's tools (`load_model`, sample.py, compare.py):
the model it stands for is its base (`base_model_name_or_path`) with the adapter applied and
merged (`minigpt2.io.weights.read_adapted`), which is what the run's merged model.safetensors
holds too. Where the base lives inside the run (a grown vocabulary's `grown-base/`), the path is
stored relative to the adapter folder (`../../grown-base`), so a run moved or copied whole keeps
working; a base outside the run is stored as given (a hub name, an absolute path).
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
from minigpt2.io.runs import CONFIG, WEIGHTS
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
    """The adapter_config.json in `checkpoint/adapter/` (a LoRA run's checkpoint) or in `checkpoint`
    itself (an adapter folder given as the model), checked; None where there is none."""
    path = Path(checkpoint) / ADAPTER_DIR / ADAPTER_CONFIG
    path = path if path.is_file() else Path(checkpoint) / ADAPTER_CONFIG
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


# ----- an adapter folder as a model ----------------------------------------------------------------


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder holding a PEFT LoRA adapter and no model.safetensors of its own."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / WEIGHTS).exists()


def base_reference(base: str | os.PathLike | None, adapter_dir: Path, run_root: Path) -> str | None:
    """`base_model_name_or_path` to store in `adapter_dir`: relative to it when the base is a folder
    inside `run_root` (the run), absolute for a local model outside it, else as given (a hub name)."""
    if base is None:
        return None
    path = Path(base).expanduser()
    if path.exists():
        resolved, root = path.resolve(), run_root.resolve()
        if resolved == root or root in resolved.parents:
            return os.path.relpath(resolved, adapter_dir.resolve())
        return str(resolved)  # outside the run: absolute, so the adapter works from any folder
    return str(base)


def merged_checkpoint(adapter_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder a run's `adapter/` belongs to, when it holds the merged model beside it."""
    parent = Path(adapter_dir).resolve().parent
    return parent if (parent / WEIGHTS).is_file() and (parent / CONFIG).is_file() else None


def adapter_base(adapter_dir: str | os.PathLike, config: dict | None = None) -> tuple[str, dict]:
    """(the base model source, the adapter's config): a relative base resolved from the adapter folder.
    `config`: the adapter's config already read (`read_adapter_config`), else it is read here."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir) if config is None else config
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        beside = merged_checkpoint(adapter_dir)
        hint = f"; the merged model is '{beside}'" if beside else ""
        raise CheckpointError(
            f"'{adapter_dir}' is a LoRA adapter whose adapter_config.json names no base model "
            f"(base_model_name_or_path), so it cannot be applied{hint}"
        )
    relative = adapter_dir / base
    if not Path(base).expanduser().is_absolute() and relative.exists():
        return str(relative), config
    return base, config


def adapter_targets(adapter_dir: Path, config: dict) -> list[str]:
    """The module names an adapter's LoRA targets (`read_adapter_config` checked their type): one at least."""
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or config.get("r") is None:
        raise CheckpointError(
            f"'{adapter_dir / ADAPTER_CONFIG}' names no target_modules or no r: it is no LoRA adapter"
        )
    return targets


def adapter_checkpoint(path: Path) -> Path:
    """`path`, or for a run's adapter folder the checkpoint holding its merged model: what reads a
    model's files (its shape, its tensors one by one) reads that. A lone adapter has no such file."""
    if not is_adapter_folder(path):
        return path
    beside = merged_checkpoint(path)
    if beside is not None:
        return beside
    base, _ = adapter_base(path)
    raise CheckpointError(
        f"'{path}' is a LoRA adapter of '{base}' with no merged model beside it: load it with "
        f"minigpt2.load_model('{path}') (which applies it to its base) and save_model() the result to get a folder "
        "with model.safetensors"
    )
