"""A training checkpoint: what --resume needs besides the weights (AdamW's moments, the step, the RNG
states, the loss scaler), and `Checkpointer`, the component that saves checkpoints and continues from
them. It is handed what it saves and restores (`TrainingState`: the model, optimizer, scaler and their
names) and the run directory it writes into; it knows nothing else of the trainer.

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
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt2.errors import CheckpointError, OutputError
from minigpt2.files import parse_json, save_tensors, write_json
from minigpt2.io.adapter import base_reference, save_peft_adapter
from minigpt2.io.weights import load_model, save_model
from minigpt2.model.lora import (
    adapter_state,
    is_adapted,
    is_lora,
    load_adapter_state,
    lora_settings,
    merged_state_dict,
    unmerged_state_dict,
)
from minigpt2.training.rundir import STATE_JSON, STATE_TENSORS, STEP_NAME, RunDir, other_checkpoints_hint, step_name

MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # what AdamW keeps per parameter
KEEP_STATE = 2  # the newest checkpoint and the one --resume falls back to: see `drop_old_optimizer_state`


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
    save_tensors(folder / STATE_TENSORS, tensors)
    write_json(folder / STATE_JSON, state)


def read_state(folder: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state JSON, tensors) of a checkpoint, every field checked (see `check_state`).

    Raises `CheckpointError` saying what is wrong (unreadable JSON, a truncated tensor file, a
    missing tensor, a number out of range, a NaN moment, an RNG state of the wrong shape), so the
    caller can name the checkpoint and fall back to an older one. `shapes`: the parameters' shapes
    by name, which the AdamW moments must have.
    """
    from safetensors.torch import load_file

    try:
        state = parse_json((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError and JSONDecodeError among them
        raise CheckpointError(f"{STATE_JSON} cannot be read ({e})") from None
    needed = ("step", "tokens", "param_names", "param_groups")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise CheckpointError(f"{STATE_JSON} lacks one of {', '.join(needed)}")
    check_state_json(state, folder.name)
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except Exception as e:  # SafetensorError (truncated, corrupted) or OSError
        raise CheckpointError(f"{STATE_TENSORS} cannot be read ({e})") from None
    stepped = state.get("stepped", state["param_names"])  # parameters with AdamW moments (see `state`)
    if not isinstance(stepped, list) or not set(stepped) <= set(state["param_names"]):
        raise CheckpointError(f'{STATE_JSON} is damaged: "stepped" is not a list of the parameters\' names')
    expected = ["rng.torch_cpu"] + [f"optimizer.{n}.{m}" for n in stepped for m in MOMENTS]
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{STATE_TENSORS} lacks {', '.join(missing[:3])}{more}")
    check_state_tensors(tensors, stepped, shapes)
    return state, tensors


def _int(value, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def _number(value, low: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def check_state_json(state: dict, name: str) -> None:
    """Every field of trainer_state.json a resume reads: types, ranges, and the step within the run."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{STATE_JSON} is damaged: {why}")

    config = state.get("config")
    if not isinstance(config, dict) or not _int(config.get("steps"), 1):
        raise bad('"config" lacks the run\'s step count')
    steps = config["steps"]
    if not _int(state["step"], 0, steps):
        raise bad(f'"step" is {state["step"]!r}, not a step of this run (0 to {steps})')
    match = STEP_NAME.fullmatch(name.lstrip(".").split(".")[0])
    if match and int(match.group(1)) != state["step"]:
        raise bad(f'"step" is {state["step"]}, but the checkpoint is {name}')
    if not _int(state["tokens"]):
        raise bad(f'"tokens" is {state["tokens"]!r}, not a count')
    names = state["param_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad('"param_names" is not a list of parameter names')
    groups = state["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad('"param_groups" is not a list of optimizer groups')
    seen = []
    for g in groups:
        params, betas = g.get("params"), g.get("betas")
        if not isinstance(params, list) or not all(_int(i, 0, len(names) - 1) for i in params):
            raise bad('an optimizer group\'s "params" are not indices of the parameters')
        seen += params
        if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and b < 1 for b in betas)):
            raise bad(f'an optimizer group\'s "betas" are {betas!r}, not two numbers in [0, 1)')
        for key in ("lr", "weight_decay", "eps"):
            if key in g and not _number(g[key]):
                raise bad(f'an optimizer group\'s "{key}" is {g[key]!r}, not a finite number >= 0')
    if sorted(seen) != list(range(len(names))):
        raise bad("the optimizer groups do not hold each parameter once")
    scaler = state.get("scaler")
    if scaler is not None and (
        not isinstance(scaler, dict) or not all(_number(v) for v in scaler.values() if not isinstance(v, bool))
    ):
        raise bad('"scaler" is not a loss scaler\'s finite settings')
    if not _int(state.get("ranks", 1), 1):
        raise bad(f'"ranks" is {state.get("ranks")!r}, not a positive count')
    if state.get("lora") is not None and not isinstance(state["lora"], dict):
        raise bad('"lora" is not the LoRA settings')


def check_state_tensors(
    tensors: dict[str, torch.Tensor], names: list[str], shapes: dict[str, tuple[int, ...]] | None
) -> None:
    """The RNG states have the generators' shape and dtype; the AdamW moments are finite, of their
    parameter's shape (second moments >= 0), and their step counts finite and >= 0."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{STATE_TENSORS} is damaged: {why}")

    reference = torch.get_rng_state()
    for key, t in tensors.items():
        if key == "rng.torch_cpu" and (t.dtype != reference.dtype or t.shape != reference.shape):
            raise bad(f"{key} is {t.dtype} {tuple(t.shape)}, not the {reference.dtype} {tuple(reference.shape)} of a "
                      "random generator's state")  # fmt: skip
        if key.startswith("rng.cuda.") and (t.dtype != torch.uint8 or t.dim() != 1):
            raise bad(f"{key} is {t.dtype} {tuple(t.shape)}, not a random generator's state")
    for name in names:
        for moment in MOMENTS:
            key = f"optimizer.{name}.{moment}"
            t = tensors[key]
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise bad(f"{key} is not finite")
            if moment == "step":
                if t.numel() != 1 or t.item() < 0:
                    raise bad(f"{key} is not one step count >= 0")
                continue
            if shapes is not None and name in shapes and tuple(t.shape) != tuple(shapes[name]):
                raise bad(f"{key} has shape {tuple(t.shape)}, but the parameter has {tuple(shapes[name])}")
            if moment == "exp_avg_sq" and (t < 0).any():
                raise bad(f"{key} has negative entries (a second moment is >= 0)")


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another model (other parameters, other LoRA settings): a resume
    stops there rather than falling back, since every checkpoint of the run would differ alike."""


@dataclass
class TrainingState:
    """What a checkpoint saves and restores, handed to `Checkpointer` explicitly (torchtitan's
    checkpoint manager takes its `states` the same way).

    model: the raw model (not the DDP or compiled wrapper); params/param_names: the trainable
    parameters in the optimizer's order and their names; config: the `TrainConfig` (its seed, batch
    and ranks place the data stream); sharded: FSDP, whose full state is gathered to rank 0 to save.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    param_names: list[str]
    config: Any
    sharded: bool = False

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in zip(self.param_names, self.params, strict=True)}


@dataclass
class Resumed:
    """What `Checkpointer.resume` found: the checkpoint continued from (None: none, start at step 0),
    its step and tokens, and the checkpoints skipped ({"path", "why", "kept_as"})."""

    path: Path | None
    step: int
    tokens: int
    skipped: list[dict]


class Checkpointer:
    """Saves a `TrainingState` into a run directory's checkpoints and restores it from them.

    It holds only where it writes and how: the `RunDir` (crash-safe replacement, pruning, the lock
    the caller took), the process group (under torchrun only rank 0 writes), the device (RNG states),
    how many step checkpoints to keep, where the tokenizer files are copied from, and the model a LoRA
    adapter applies to (`base_model`, None for a random start).
    """

    def __init__(self, run_dir: RunDir, *, dist, device: torch.device, keep_last: int = 0,
                 tokenizer_source: str | os.PathLike | None = None, base_model: str | None = None,
                 keep_state: int = KEEP_STATE) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.dist = dist
        self.device = torch.device(device)
        self.keep_last = keep_last
        self.keep_state = keep_state  # steps whose checkpoints keep the optimizer state (0: all)
        self.tokenizer_source = tokenizer_source
        self.base_model = base_model

    def save(self, states: TrainingState, step: int, tokens: int, name: str | None = None) -> Path:
        """Write weights + trainer state to RUN/step-NNNNNN (or RUN/final), crash-safely.

        `RunDir.save` writes into a hidden folder and renames it into place. Under torchrun only
        rank 0 writes (a sharded model's full weights are first gathered to it, which every rank
        takes part in). Older step checkpoints beyond `keep_last` are deleted afterwards.
        """
        name = name or step_name(step)
        model = states.model
        weights = optim = None
        if states.sharded:  # collectives: every rank, before rank 0 alone goes on
            from minigpt2.training.distributed import full_model_state, full_optimizer_state

            weights = full_model_state(model)
            optim = full_optimizer_state(model, states.optimizer)
        target = self.run_dir.path / name
        if not self.dist.is_main:
            return target

        lora, adapted = is_lora(model), is_adapted(model)

        def write(folder: Path) -> None:
            # LoRA: model.safetensors holds the merged model (the usual layout), adapter/ the
            # adapters alone in PEFT's layout, the trainer state the adapters for resuming (under
            # the same names). Trainable tokens without LoRA: merged too, resumed from the weights.
            merged = merged_state_dict(model, weights) if adapted else weights
            save_model(model, folder, tokenizer_source=self.tokenizer_source, state_dict=merged)
            self.run_dir.stage("weights-written")
            tensors, state = self.state(states, step, tokens, optim)
            if lora:
                where = self.run_dir.path / name / "adapter"  # where it lands: a base in the run is stored relative
                save_peft_adapter(
                    model, folder / "adapter", base_reference(self.base_model, where, self.run_dir.path), weights
                )
                tensors.update(adapter_state(model, weights))
            write_state(folder, tensors, state)

        try:
            path = self.run_dir.save(name, write)
        except (OSError, OutputError) as e:
            cause = str(e) if isinstance(e, OutputError) else (e.strerror or str(e))
            raise CheckpointError(
                f"could not save checkpoint {name} in '{self.run_dir.path}': {cause}. {self.room_needed(states)}"
                "The previous checkpoints are untouched; make room and resume."
            ) from None
        if self.keep_last and name != "final":
            self.run_dir.prune(self.keep_last)
        drop_old_optimizer_state(self.run_dir, self.keep_state)
        return path

    def room_needed(self, states: TrainingState) -> str:
        """How much room a checkpoint takes and how much the run's disk has, as a sentence."""
        try:
            tensors = [*states.model.state_dict().values()]  # the tied embedding once:
            size = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())
            size += sum(t.numel() * t.element_size() for s in states.optimizer.state.values() for t in s.values())
        except Exception:  # a sharded model's slices: no good estimate here
            return ""
        try:
            free = f"; {shutil.disk_usage(self.run_dir.path).free / 1e6:,.1f} MB are free there"
        except OSError:
            free = ""
        return f"A checkpoint needs about {size / 1e6:,.1f} MB{free}. "

    def state(
        self, states: TrainingState, step: int, tokens: int, full_optimizer_state: dict | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainer state as (tensors for safetensors, JSON-able dict): see the module docstring.

        The data position needs no state of its own: batch i is a pure function of (seed, i),
        see `WindowSampler`. Python's and NumPy's global generators are not used by the loop.
        A sharded run passes its gathered optimizer state (keyed by parameter name); it is
        written in the same layout, so any run can resume from any other.
        """
        names, config = states.param_names, states.config
        if full_optimizer_state is None:
            opt = states.optimizer.state_dict()
        else:
            index = {name: i for i, name in enumerate(names)}
            opt = {
                "state": {index[name]: entry for name, entry in full_optimizer_state["state"].items()},
                "param_groups": [
                    {**g, "params": [index[name] for name in g["params"]]} for g in full_optimizer_state["param_groups"]
                ],
            }
        tensors = {**optimizer_tensors(opt, names), **rng_tensors(self.device)}
        state = {
            "step": step,
            "tokens": tokens,
            "config": dataclasses.asdict(config),
            "param_names": names,
            # Frozen so far (an embedding warm-up trains the new rows alone): no moments yet.
            "stepped": [names[i] for i in sorted(opt["state"])],
            "param_groups": opt["param_groups"],
            "scaler": states.scaler.state_dict() if states.scaler.is_enabled() else None,
            "sampler": {"seed": config.seed, "next_batch": step * config.grad_accum * config.ranks},
            "ranks": config.ranks,
            "lora": lora_settings(states.model) if is_lora(states.model) else None,
        }
        return tensors, state

    def load(self, states: TrainingState, path: str | os.PathLike) -> tuple[int, int]:
        """Continue from a checkpoint: its weights, optimizer moments, RNG and scaler into `states`;
        returns its (step, tokens).

        Everything is read and checked before anything is changed, so a checkpoint that cannot
        be read raises `CheckpointError` and leaves `states` as they were.
        """
        try:
            return self._load(states, Path(path))
        except CheckpointError as e:
            raise type(e)(f"cannot resume from '{path}': {e}") from None

    def _load(self, states: TrainingState, path: Path) -> tuple[int, int]:
        model, optimizer = states.model, states.optimizer
        state, tensors = read_state(path, states.shapes())
        if state["param_names"] != states.param_names:
            raise CheckpointMismatch("it was saved from a model with different parameters")
        lora = lora_settings(model) if is_lora(model) else None
        if state.get("lora") != lora:
            raise CheckpointMismatch(f"it was saved with LoRA settings {state.get('lora')}, not {lora}")
        opt = optimizer_state(tensors, state["param_groups"], states.param_names)
        if lora:  # the base stays the start model; model.safetensors is merged (B @ A counted in)
            load_adapter_state(model, tensors)
            optimizer.load_state_dict(opt)
        elif states.sharded:
            loaded = load_model(path, device="cpu")  # every rank reads the full state and keeps its slices
            from minigpt2.training.distributed import load_full_state

            names = states.param_names
            load_full_state(
                model,
                optimizer,
                loaded.state_dict(),
                {
                    "state": {names[i]: entry for i, entry in opt["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]],
                },
            )
        else:
            loaded = load_model(path, device=self.device).state_dict()
            if is_adapted(model):  # trainable tokens: the merged wte split into base and rows
                loaded = unmerged_state_dict(model, loaded)
            with torch.no_grad():
                model.load_state_dict(loaded)
            optimizer.load_state_dict(opt)
        if state.get("scaler") and states.scaler.is_enabled():
            states.scaler.load_state_dict(state["scaler"])
        restore_rng(tensors, self.device)
        step = state["step"]
        if self.dist.rank:  # the checkpoint holds rank 0's dropout stream; the others start anew
            torch.manual_seed(states.config.seed + self.dist.rank + 1_000_003 * step)
        if self.dist.is_main:
            self.run_dir.forget_after(step)
        return step, state["tokens"]

    def resume(self, states: TrainingState) -> Resumed:
        """Continue from the newest checkpoint that can be read, falling back past the others.

        A damaged checkpoint is renamed `NAME.damaged-N` (kept for inspection, never deleted), so
        it is not tried again and a fresh checkpoint of the same step can take its name. With no
        usable checkpoint at all, the run starts from step 0 (the model it was given).
        """
        skipped = []
        for candidate in self.run_dir.resume_candidates():
            try:
                step, tokens = self._load(states, candidate.path)
                return Resumed(candidate.path, step, tokens, skipped)
            except CheckpointMismatch as e:  # readable, but of another model: every one would be
                raise CheckpointMismatch(f"cannot resume from '{candidate.path}': {e}") from None
            except CheckpointError as e:
                why = str(e).removesuffix(other_checkpoints_hint(candidate.path))  # its advice is to resume: we are
                kept_as = set_aside(candidate.path) if self.dist.is_main else None
                skipped.append({"path": str(candidate.path), "why": why, "kept_as": kept_as and str(kept_as)})
        if self.dist.is_main:  # from step 0: its step-0 evaluation stays logged
            self.run_dir.forget_after(0)
        return Resumed(None, 0, 0, skipped)


def drop_old_optimizer_state(run_dir: RunDir, keep: int) -> list[Path]:
    """Delete trainer_state.safetensors from every checkpoint but those of the newest `keep` steps.

    AdamW's two moments take twice the weights' room in full fine-tuning (949 MiB beside 475 MiB
    of weights for the 124M GPT-2), and only a resume reads them: from the newest checkpoint, or,
    when that one is damaged, the one before it. So those keep it (`final/` and a step folder of
    the same step count as one step), and older ones keep their weights (still sampled, compared and
    read as the run's history) but are no longer resume candidates. 0 keeps every state."""
    if keep <= 0:
        return []
    complete = [c for c in run_dir.checkpoints() if c.path.name == "final" or STEP_NAME.fullmatch(c.path.name)]
    newest = sorted({c.step for c in complete}, reverse=True)[:keep]
    dropped = [c.path for c in complete if c.step not in newest]
    for path in dropped:
        (path / STATE_TENSORS).unlink(missing_ok=True)
    return dropped


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint NAME.damaged-N (the first N free); return its new path."""
    n = 1
    while (aside := path.with_name(f"{path.name.lstrip('.')}.damaged-{n}")).exists():
        n += 1
    os.rename(path, aside)
    return aside
