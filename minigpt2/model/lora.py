"""LoRA: fine-tune a low-rank update of each weight instead of the weight itself.

Full fine-tuning changes every entry of a (out, in) matrix W. LoRA (Hu et al., 2021) freezes W
and learns its change as a product of two thin matrices:

    W' = W + (alpha / r) · B @ A          A: (r, in)   B: (out, r)   r << min(in, out)

so a layer's output becomes

    y = x W^T + b  +  (alpha / r) · (x A^T) B^T
        └ frozen ┘      └──── the adapter: x squeezed to r numbers, then expanded ────┘

Why it works: the updates full fine-tuning makes are close to low-rank (`compare.py` measures
this as rank90 / stable rank), so restricting them to rank r loses little, while the optimizer
keeps moments for r·(in + out) numbers per matrix instead of in·out: at GPT-2 small and r = 8,
about 1.3M trainable numbers instead of 124M, and an optimizer state a hundred times smaller.
"LoRA Learns Less and Forgets Less" (Biderman et al., 2024) measures the price: less learning
of the new domain, and less forgetting of the old one.

The module tree after `apply_lora` (every block, for each targeted layer, here `attn.c_attn`):

    h.N.attn.c_attn             LoRALinear: a forward hook here still sees the layer's output
    h.N.attn.c_attn.base        the original nn.Linear, frozen (requires_grad False)
    h.N.attn.c_attn.lora_A      nn.Linear(in, r, bias=False): weight (r, in), random
    h.N.attn.c_attn.lora_B      nn.Linear(r, out, bias=False): weight (out, r), zeros

Names follow PEFT's (`lora_A.weight`, `lora_B.weight`), so the adapter file is PEFT's layout
by a prefix alone, and that one name (`adapter_state`) is used in the trainer state too. A grown
vocabulary's new rows can train beside the adapters (`add_trainable_tokens`, PEFT's
`trainable_token_indices`) while every old row stays frozen. Checkpoints are written *merged*
(`merged_state_dict`): the plain GPT-2 layout, which every reader of minigpt2 and transformers understands.
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

from minigpt2.errors import CheckpointError, MiniGPT2Error

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_ALPHA = 8.0  # PEFT's default lora_alpha: see `apply_lora`
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapter tensors have one name everywhere (the adapter file, the trainer state, `adapter_state`):
# PEFT's, i.e. the module path inside PeftModel(GPT2LMHeadModel) → .transformer → h.N...
PEFT_PREFIX = "base_model.model.transformer."
LEGACY_STATE_PREFIX = "lora."  # how trainer states written before one name was used prefixed them (read only)
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # inside wte, as PEFT names it
ADAPTER_NAME = re.compile(r"\.lora_[AB]\.weight$|^wte\." + re.escape(TOKEN_ROWS) + "$")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scaling · B(A(dropout(x))).

    - rank r: the update B @ A has rank at most r. Every input is squeezed through r numbers on
      its way through the adapter, so the layer can learn at most r new directions. Small r:
      fewer parameters, a smaller optimizer state, less capacity.
    - B starts at zero, A at random: the update B @ A is zero, so the adapted model is the base
      model exactly at step 0 (fine-tuning starts where the base model is, not at a perturbed
      copy of it). A must not be zero as well: with A = B = 0 both gradients are zero (the
      gradient of B is proportional to A and the other way round) and nothing would ever move.
      A gets nn.Linear's own init (kaiming-uniform, bound 1/sqrt(in)), as in PEFT.
    - scaling = alpha / r: the update's size at a given learning rate depends little on r (each
      of r independent directions adds to the output; dividing by r keeps the sum's scale), so
      alpha, once chosen, can stay fixed while r is varied, and the learning rate need not be
      tuned again for each r.
    - dropout, on the adapter's input only: the frozen path sees x unchanged.
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        w = base.weight
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) → base: (..., out);  adapter: (..., in) → (..., r) → (..., out)
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """The update (alpha / r) · B @ A, (out, in) like nn.Linear's weight, in float32."""
        a = self.lora_A.weight if a is None else a
        b = self.lora_B.weight if b is None else b
        return (b.float() @ a.float()) * self.scaling  # (out, r) @ (r, in) → (out, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout aside): weight W + (alpha / r) · B @ A.

        For what needs one matrix per layer, e.g. int8 quantization (`quantize_model`), which
        then rounds the adapted weight once instead of adding a float update to every product.
        """
        w = self.base.weight
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=w.dtype)  # fmt: skip
        linear.weight.copy_((w.float() + self.delta_weight()).to(w.dtype))
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(False)


class TokenAdapter(nn.Module):
    """The trained values of some embedding rows: `trainable_tokens_delta` (n, C), rows `token_indices`.

    Named as PEFT names it (`wte.token_adapter.trainable_tokens_delta`), so the adapter file needs
    a prefix alone. PEFT calls it a "delta" but stores the rows' values, not a difference.
    """

    def __init__(self, rows: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        self.trainable_tokens_delta = nn.Parameter(rows.detach().clone())  # (n, C)
        index = torch.tensor(list(indices), dtype=torch.long, device=rows.device)
        self.register_buffer("token_indices", index, persistent=False)  # (n,)


class TrainableTokens(nn.Module):
    """An embedding whose rows `indices` train as a parameter of their own (PEFT's "trainable tokens").

    Why: a grown vocabulary (vocab.py) adds rows that the base model never learned. They must
    train, while the base rows may have to stay frozen (LoRA), or train at another pace. A
    parameter holds whole tensors, so the new rows become one: `token_adapter.trainable_tokens_delta`
    (n, C). The forward writes them over their rows of the (frozen or not) base matrix:

        weight = base.weight with rows `indices` replaced       (V, C), a new tensor each call
        x      = weight[idx]                                     (B, T) → (B, T, C)

    The base's own copies of those rows get a zero gradient (they are overwritten), so they keep
    their initial values; the other base rows are bit-identical when frozen. The output layer,
    tied to this matrix, reads the same `weight` through `TrainableTokensHead`.
    """

    def __init__(self, base: nn.Embedding, indices: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        self.token_adapter = TokenAdapter(base.weight[list(indices)], indices)

    @property
    def weight(self) -> torch.Tensor:
        a = self.token_adapter
        return self.base.weight.index_copy(0, a.token_indices, a.trainable_tokens_delta.to(self.base.weight.dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(idx, self.weight)  # (B, T) → (B, T, C)


class TrainableTokensHead(nn.Module):
    """The output layer tied to a `TrainableTokens` embedding: scores with its weight, trained rows
    included. The embedding is held outside the module tree (its tensors are wte's, listed once)."""

    def __init__(self, base: nn.Linear, embedding: TrainableTokens) -> None:
        super().__init__()
        self.base = base
        self._embedding = [embedding]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._embedding[0].weight)  # (B, T, C) → (B, T, V)


def add_trainable_tokens(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Give the embedding rows `indices` (a grown vocabulary's new ids) a parameter of their own.

    In place; returns the model. The rest keeps its `requires_grad`: apply LoRA first to freeze it
    (the new rows then train beside the adapters), or leave it trainable (full fine-tuning, with
    the new rows in an optimizer group of their own: their own learning rate, a phase alone).
    """
    if trainable_tokens(model) is not None:
        raise MiniGPT2Error("this model's embedding already has trainable tokens")
    indices = list(indices)
    if not indices or min(indices) < 0 or max(indices) >= model.config.vocab_size:
        raise MiniGPT2Error(f"trainable token ids must lie in 0..{model.config.vocab_size - 1}")
    model.wte = TrainableTokens(model.wte, indices)
    model.lm_head = TrainableTokensHead(model.lm_head, model.wte)
    return model


def trainable_tokens(model: nn.Module) -> TrainableTokens | None:
    return next((m for m in model.modules() if isinstance(m, TrainableTokens)), None)


def is_adapted(model: nn.Module) -> bool:
    """The model holds LoRA adapters or trainable tokens: its state dict is not the plain layout
    (`merged_state_dict` gives that)."""
    return any(isinstance(m, (LoRALinear, TrainableTokens)) for m in model.modules())


# ----- wrapping a model ---------------------------------------------------------------------------


def check_settings(r: int, alpha: float, dropout: float, targets: Sequence[str]) -> tuple[str, ...]:
    """Validate LoRA settings (raising `MiniGPT2Error` with what is allowed); the targets as a tuple."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise MiniGPT2Error(f"the LoRA rank must be a whole number of at least 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise MiniGPT2Error(f"the LoRA alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise MiniGPT2Error(f"the LoRA dropout must be at least 0 and below 1, got {dropout!r}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        what = f"unknown LoRA target {', '.join(map(repr, unknown))}" if unknown else "no LoRA target given"
        raise MiniGPT2Error(f"{what}; the layers that can be adapted are {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise MiniGPT2Error(f"a LoRA target is named twice in {', '.join(targets)}")
    return targets


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | str = TARGETS,
    seed: int | None = None,
) -> nn.Module:
    """Freeze every weight of `model` (a GPT) and wrap the `targets` of every block in `LoRALinear`.

    In place; returns the model. `targets` are module paths inside a block (a comma-separated
    string works too). `alpha` defaults to 8, PEFT's default: the LoRA paper sets alpha once and
    leaves it while varying r (see `LoRALinear`), and with alpha = 8 the default r = 8 scales
    the update by exactly 1, as PEFT does. `seed` draws every A from its own generator, leaving
    the global RNG untouched; None draws from the global RNG (like nn.Linear's init).

    Only A and B are trainable afterwards: the trainer's `param_groups` skips frozen parameters,
    so AdamW holds moments for the adapters alone.
    """
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    targets = check_settings(r, alpha, dropout, targets)
    if is_lora(model):
        raise MiniGPT2Error("this model already has LoRA adapters; apply LoRA once, to the base model")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.h:
        for target in targets:
            parent_name, _, child = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise MiniGPT2Error(f"{target} is a {type(base).__name__}, not a linear layer; LoRA cannot adapt it")
            setattr(parent, child, LoRALinear(base, r, float(alpha), float(dropout), generator))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by its module path (`h.0.attn.c_attn`, ...), a torch.compile prefix removed."""
    return {name.removeprefix("_orig_mod."): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_settings(model: nn.Module) -> dict:
    """{"r", "alpha", "dropout", "targets"} of a LoRA model (JSON-able, e.g. for run.json)."""
    layers = lora_layers(model)
    if not layers:
        raise MiniGPT2Error("this model has no LoRA adapters")
    first = next(iter(layers.values()))
    targets = list(dict.fromkeys(re.sub(r"^h\.\d+\.", "", name) for name in layers))
    return {"r": first.r, "alpha": first.alpha, "dropout": first.dropout, "targets": targets}


# ----- merged weights and adapter tensors -----------------------------------------------------------


def _own_names(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    source = model.state_dict() if state_dict is None else state_dict
    return {name.removeprefix("_orig_mod."): t for name, t in source.items()}


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain GPT state dict of an adapted model: W + (alpha / r) · B @ A for every LoRA layer,
    and the trainable tokens' rows written into wte (and lm_head, the same tensor).

    Names are the official ones (`h.0.attn.c_attn.weight`: no `.base`, no adapter tensors) and
    weights are in nn.Linear orientation (out, in), so `weights.save_model(model, dir,
    state_dict=merged_state_dict(model))` writes the usual checkpoint. `state_dict` replaces
    `model.state_dict()` when the model's own tensors are not whole (an FSDP model's gathered
    full state). The merge is computed in float32 and cast back to the weight's dtype.
    """
    layers = lora_layers(model)
    tokens = trainable_tokens(model)
    source = _own_names(model, state_dict)
    merged, embedding = {}, None
    for name, tensor in source.items():
        module, _, leaf = name.rpartition(".")
        layer = module.removesuffix(".base")
        if ADAPTER_NAME.search(name):
            continue  # lora_A / lora_B / the tokens' rows: folded into their layer's weight below
        if tokens is not None and module in ("wte.base", "lm_head.base"):
            if embedding is None:  # once: wte and lm_head stay one (tied) tensor
                rows, index = source[f"wte.{TOKEN_ROWS}"].to(tensor.dtype), tokens.token_adapter.token_indices
                embedding = tensor.detach().index_copy(0, index.to(tensor.device), rows.detach())
            merged[f"{layer}.{leaf}"] = embedding
        elif module.endswith(".base") and layer in layers:
            if leaf == "weight":
                delta = layers[layer].delta_weight(source[f"{layer}.lora_A.weight"], source[f"{layer}.lora_B.weight"])
                tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
            merged[f"{layer}.{leaf}"] = tensor.detach()
        else:
            merged[name] = tensor
    return merged


def unmerged_state_dict(model: nn.Module, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `merged_state_dict` for a model with trainable tokens and no LoRA (full
    fine-tuning with the new rows apart): the model's own state dict from a plain checkpoint's.
    The base matrix takes the checkpoint's wte whole (its copies of the trained rows are never
    read: the forward overwrites them), the trainable rows their slice of it."""
    tokens = trainable_tokens(model)
    if tokens is None or is_lora(model):
        raise MiniGPT2Error("unmerged_state_dict is for a model with trainable tokens and no LoRA")
    out = {}
    for name in _own_names(model, None):
        if name in ("wte.base.weight", "lm_head.base.weight"):
            out[name] = merged["wte.weight"]
        elif name == f"wte.{TOKEN_ROWS}":
            out[name] = merged["wte.weight"][tokens.token_adapter.token_indices.to(merged["wte.weight"].device)]
        else:
            out[name] = merged[name]
    return out


def adapter_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, under PEFT's names: {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight":
    (r, in), "...lora_B.weight": (out, r), ..., "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta":
    (n, C) with trainable tokens}.

    One name everywhere: this is what the adapter file holds and what the trainer state holds for
    resuming. Small, detached, on the CPU, contiguous: ready for safetensors.
    """
    return {
        PEFT_PREFIX + name: t.detach().cpu().contiguous()
        for name, t in _own_names(model, state_dict).items()
        if ADAPTER_NAME.search(name)
    }


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the adapter tensors (named as `adapter_state` names them) into an adapted model, strictly.

    Other entries of `tensors` (a trainer state's optimizer moments and RNG states) are ignored;
    adapter tensors that trainer states written before PEFT's names were used everywhere kept under
    `lora.` are read too. The base weights are NOT in there and must not come from a merged
    checkpoint: the caller rebuilds the run's start model, applies the same adapters, then calls
    this. Loading the merged weights as the base would add B @ A twice.
    """
    tensors = {
        PEFT_PREFIX + k.removeprefix(LEGACY_STATE_PREFIX) if k.startswith(LEGACY_STATE_PREFIX) else k: v
        for k, v in tensors.items()
        if k.startswith((PEFT_PREFIX, LEGACY_STATE_PREFIX))
    }
    expected = adapter_state(model)
    short = len(PEFT_PREFIX)
    missing = sorted(k[short:] for k in set(expected) - set(tensors))
    unexpected = sorted(k[short:] for k in set(tensors) - set(expected))
    wrong = [
        f"{n[short:]} is {list(tensors[n].shape)}, expected {list(expected[n].shape)}"
        for n in expected
        if n in tensors and tensors[n].shape != expected[n].shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
            if items
        ]
        raise CheckpointError(
            f"the saved adapters do not match this model's ({'; '.join(problems)}). "
            "Use the same rank, target layers and vocabulary as the run that saved them."
        )
    params = {name.removeprefix("_orig_mod."): p for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name[short:]].copy_(tensor)


# ----- PEFT's adapter layout ------------------------------------------------------------------------


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

    from minigpt2.io.weights import write_atomically

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
    itself (the adapter folder given as the model), or None."""
    from minigpt2.io.weights import read_json_object

    path = Path(checkpoint) / "adapter" / ADAPTER_CONFIG
    path = path if path.is_file() else Path(checkpoint) / ADAPTER_CONFIG
    return read_json_object(path, "a PEFT adapter_config.json") if path.is_file() else None


# ----- the start line -------------------------------------------------------------------------------


def lora_summary(model: nn.Module) -> dict:
    """What LoRA leaves to train, for the start line: counts, share, names, optimizer memory.

    AdamW keeps two float32 moments per trainable number (8 bytes; its per-tensor step counters
    are left out), so the optimizer state is 8 x the trainable count; `full_optimizer_state_bytes`
    is what full fine-tuning of the same model would hold.
    """
    unique = {id(p): p for p in model.parameters()}.values()  # wte and lm_head are one tensor
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    adapters = sum(p.numel() for name, p in model.named_parameters() if ADAPTER_NAME.search(name))
    tokens = trainable_tokens(model)
    return {
        **lora_settings(model),
        "trainable_tokens": 0 if tokens is None else len(tokens.token_adapter.token_indices),
        "scaling": next(iter(lora_layers(model).values())).scaling,
        "adapted": [f"{name}.weight" for name in lora_layers(model)],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "optimizer_state_bytes": 8 * trainable,
        "full_optimizer_state_bytes": 8 * (total - adapters),
    }


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
