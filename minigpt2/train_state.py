"""A training checkpoint: what --resume needs besides the weights (AdamW's moments, the step, the RNG
states, the loss scaler), and the trainer's saving of checkpoints and continuing from them.

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

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import write_json
from .lora import (
    adapter_state,
    is_adapted,
    is_lora,
    load_adapter_state,
    lora_settings,
    merged_state_dict,
    save_peft_adapter,
    unmerged_state_dict,
)
from .rundir import STATE_JSON, STATE_TENSORS, other_checkpoints_hint, step_name
from .weights import load_model, save_model

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
    stepped = state.get("stepped", state["param_names"])  # parameters with AdamW moments (see `state`)
    expected = ["rng.torch_cpu"] + [f"optimizer.{n}.{m}" for n in stepped for m in MOMENTS]
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{STATE_TENSORS} lacks {', '.join(missing[:3])}{more}")
    return state, tensors


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another model (other parameters, other LoRA settings): a resume
    stops there rather than falling back, since every checkpoint of the run would differ alike."""


class CheckpointIO:
    """The half of `Trainer` that writes its checkpoints and continues from them (mixed into it, so
    the loop in trainer.py reads without them). It uses the trainer's model, optimizer, scaler,
    run directory and process group; see `Trainer.__init__`."""

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Write weights + trainer state to RUN/step-NNNNNN (or RUN/final), crash-safely.

        `RunDir.save` writes into a hidden folder and renames it into place. Under torchrun only
        rank 0 writes (a sharded model's full weights are first gathered to it, which every rank
        takes part in). Older step checkpoints beyond `keep_last` are deleted afterwards.
        """
        name = name or step_name(self.step)
        weights = optim = None
        if self.sharded:  # collectives: every rank, before rank 0 alone goes on
            from .distributed import full_model_state, full_optimizer_state

            weights = full_model_state(self.raw_model)
            optim = full_optimizer_state(self.raw_model, self.optimizer)
        target = self.out / name
        if not self.dist.is_main:
            return target

        lora, adapted = is_lora(self.raw_model), is_adapted(self.raw_model)

        def write(folder: Path) -> None:
            # LoRA: model.safetensors holds the merged model (the usual layout), adapter/ the
            # adapters alone in PEFT's layout, the trainer state the adapters for resuming (under
            # the same names). Trainable tokens without LoRA: merged too, resumed from the weights.
            merged = merged_state_dict(self.raw_model, weights) if adapted else weights
            save_model(self.raw_model, folder, tokenizer_source=self.tokenizer_source, state_dict=merged)
            self.run_dir.stage("weights-written")
            tensors, state = self.state(optim)
            if lora:
                save_peft_adapter(self.raw_model, folder / "adapter", getattr(self.raw_model, "source", None), weights)
                tensors.update(adapter_state(self.raw_model, weights))
            write_state(folder, tensors, state)

        try:
            path = self.run_dir.save(name, write)
        except OSError as e:
            raise CheckpointError(
                f"could not save checkpoint {name} in '{self.out}': {e.strerror or e}. "
                "The previous checkpoints are untouched; free some space and resume."
            ) from None
        if self.keep_last and name != "final":
            self.run_dir.prune(self.keep_last)
        return path

    def state(self, full_optimizer_state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainer state as (tensors for safetensors, JSON-able dict): see `train_state.py`.

        The data position needs no state of its own: batch i is a pure function of (seed, i),
        see `WindowSampler`. Python's and NumPy's global generators are not used by the loop.
        A sharded run passes its gathered optimizer state (keyed by parameter name); it is
        written in the same layout, so any run can resume from any other.
        """
        if full_optimizer_state is None:
            opt = self.optimizer.state_dict()
        else:
            index = {name: i for i, name in enumerate(self.param_names)}
            opt = {
                "state": {index[name]: entry for name, entry in full_optimizer_state["state"].items()},
                "param_groups": [
                    {**g, "params": [index[name] for name in g["params"]]} for g in full_optimizer_state["param_groups"]
                ],
            }
        tensors = {**optimizer_tensors(opt, self.param_names), **rng_tensors(self.device)}
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "config": dataclasses.asdict(self.config),
            "param_names": self.param_names,
            # Frozen so far (an embedding warm-up trains the new rows alone): no moments yet.
            "stepped": [self.param_names[i] for i in sorted(opt["state"])],
            "param_groups": opt["param_groups"],
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": {"seed": self.config.seed, "next_batch": self.step * self.config.grad_accum * self.config.ranks},
            "ranks": self.config.ranks,
            "lora": lora_settings(self.raw_model) if is_lora(self.raw_model) else None,
        }
        return tensors, state

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint: its weights, optimizer moments, step, RNG and scaler.

        Everything is read and checked before anything is changed, so a checkpoint that cannot
        be read raises `CheckpointError` and leaves the trainer as it was.
        """
        try:
            self._load_checkpoint(Path(path))
        except CheckpointError as e:
            raise type(e)(f"cannot resume from '{path}': {e}") from None

    def _load_checkpoint(self, path: Path) -> None:
        state, tensors = read_state(path)
        if state["param_names"] != self.param_names:
            raise CheckpointMismatch("it was saved from a model with different parameters")
        lora = lora_settings(self.raw_model) if is_lora(self.raw_model) else None
        if state.get("lora") != lora:
            raise CheckpointMismatch(f"it was saved with LoRA settings {state.get('lora')}, not {lora}")
        opt = optimizer_state(tensors, state["param_groups"], self.param_names)
        if lora:  # the base stays the start model; model.safetensors is merged (B @ A counted in)
            load_adapter_state(self.raw_model, tensors)
            self.optimizer.load_state_dict(opt)
        elif self.sharded:
            loaded = load_model(path, device="cpu")  # every rank reads the full state and keeps its slices
            from .distributed import load_full_state

            names = self.param_names
            load_full_state(
                self.raw_model,
                self.optimizer,
                loaded.state_dict(),
                {
                    "state": {names[i]: entry for i, entry in opt["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]],
                },
            )
        else:
            loaded = load_model(path, device=self.device).state_dict()
            if is_adapted(self.raw_model):  # trainable tokens: the merged wte split into base and rows
                loaded = unmerged_state_dict(self.raw_model, loaded)
            with torch.no_grad():
                self.raw_model.load_state_dict(loaded)
            self.optimizer.load_state_dict(opt)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(tensors, self.device)
        self.step, self.tokens = state["step"], state["tokens"]
        self.resumed_from = path
        if self.dist.rank:  # the checkpoint holds rank 0's dropout stream; the others start anew
            torch.manual_seed(self.config.seed + self.dist.rank + 1_000_003 * self.step)
        if self.dist.is_main:
            self.run_dir.forget_after(self.step)

    def resume(self) -> list[dict]:
        """Continue from the newest checkpoint that can be read, falling back past the others.

        Returns one record per checkpoint skipped ({"path", "why", "kept_as"}). A damaged checkpoint is renamed
        `NAME.damaged-N` (kept for inspection, never deleted), so it is not tried again and a fresh
        checkpoint of the same step can take its name. With no usable checkpoint at all, the run
        starts from step 0 (the model it was given).
        """
        skipped = []
        for candidate in self.run_dir.resume_candidates():
            try:
                self._load_checkpoint(candidate.path)
                break
            except CheckpointMismatch as e:  # readable, but of another model: every one would be
                raise CheckpointMismatch(f"cannot resume from '{candidate.path}': {e}") from None
            except CheckpointError as e:
                why = str(e).removesuffix(other_checkpoints_hint(candidate.path))  # its advice is to resume: we are
                kept_as = self._set_aside(candidate.path) if self.dist.is_main else None
                skipped.append({"path": str(candidate.path), "why": why, "kept_as": kept_as and str(kept_as)})
        if self.resumed_from is None and self.dist.is_main:  # from step 0: its step-0 evaluation stays logged
            self.run_dir.forget_after(0)
        return skipped

    def _set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint NAME.damaged-N (the first N free); return its new path."""
        n = 1
        while (aside := path.with_name(f"{path.name.lstrip('.')}.damaged-{n}")).exists():
            n += 1
        os.rename(path, aside)
        return aside
