"""A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's layout) as a model.

A LoRA run writes, in every checkpoint, the merged model (model.safetensors) and the adapter alone
in `adapter/`. The adapter is the small thing to keep or share, so the project's tools take its
folder wherever they take a model: the model it stands for is its base (`base_model_name_or_path`)
with the adapter applied and merged, which is what the run's merged model.safetensors holds too.

Where the base lives inside the run (a grown vocabulary's `grown-base/`), the path is stored
relative to the adapter folder (`../../grown-base`), so a run moved or copied whole keeps working;
a base outside the run is stored as given (a hub name, an absolute path).
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt2.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder holding a PEFT LoRA adapter and no model.safetensors of its own."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "model.safetensors").exists()


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
    return parent if (parent / "model.safetensors").is_file() and (parent / "config.json").is_file() else None


def adapter_base(adapter_dir: str | os.PathLike) -> tuple[str, dict]:
    """(the base model source, the adapter's config): a relative base resolved from the adapter folder."""
    from minigpt2.io.weights import read_json_object

    adapter_dir = Path(adapter_dir)
    config = read_json_object(adapter_dir / ADAPTER_CONFIG, "a PEFT adapter_config.json")
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


def load_adapted(adapter_dir: str | os.PathLike, device, dtype, revision):
    """The base of `adapter_dir` with its LoRA (and trainable token rows) applied and merged: a plain GPT."""
    import torch
    from safetensors.torch import load_file

    from minigpt2.io.weights import empty_model, read_json_object, read_model
    from minigpt2.model.lora import add_trainable_tokens, apply_lora, load_adapter_state, merged_state_dict

    beside = merged_checkpoint(adapter_dir)
    config = read_json_object(Path(adapter_dir) / ADAPTER_CONFIG, "a PEFT adapter_config.json")
    if beside is not None and not config.get("base_model_name_or_path"):  # a random start: the merged model
        return read_model(beside, device, dtype, revision)
    base, config = adapter_base(adapter_dir)
    try:
        model = read_model(base, device, torch.float32, revision)
    except CheckpointError as e:
        raise CheckpointError(f"'{adapter_dir}' is a LoRA adapter of '{base}', which cannot be loaded: {e}") from None
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise CheckpointError(f"'{adapter_dir / ADAPTER_CONFIG}': target_modules is not a list of module names")
    apply_lora(model, int(config.get("r") or 0), config.get("lora_alpha"), 0.0, targets)
    if config.get("trainable_token_indices"):
        add_trainable_tokens(model, config["trainable_token_indices"])
    load_adapter_state(model, load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS), device=str(device)))
    plain = empty_model(model.config, device)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    plain.to(dtype).eval()
    plain.source = str(adapter_dir)
    plain.inferred_config = False
    return plain


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
