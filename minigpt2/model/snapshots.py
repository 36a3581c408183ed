"""Watching a model change: how far each weight has moved, and how each block's output differs.

Fine-tuning changes every tensor a little; the question is *where* it changes most. A snapshot
compares the model now with the model it started from, in two ways:

- weights: for every tensor W, the relative change ||W - W0|| / ||W0|| (Frobenius norms);
- activations: forward hooks on every block `h.N` capture its output on a fixed probe prompt,
  compared with the starting model's output on the same prompt: the mean over tokens of the
  cosine similarity (did the direction of the hidden state change?) and the relative difference
  ||h - h0|| / ||h0|| (how much did it change overall?).

Per layer (`run_drift`), a layer's tensors are pooled: the figure the trainer logs at each snapshot
and the one `compare.py RUN` draws over a run's steps come from this one computation.

Hooks are always removed in a `finally`, so a failed forward pass never leaves one behind to fire
during training.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from minigpt2.model.lora import is_adapted, merged_state_dict

DEFAULT_PROBE = "今天的天气很好，我们一起去公园散步。The weather is nice today, so we went for a walk."


def official_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their official names (no lm_head: it is wte, tied); an adapted
    model's merged weights (base + its low-rank update), so drift is measured as for any model."""
    out = {}
    for name, tensor in (merged_state_dict(model) if is_adapted(model) else model.state_dict()).items():
        name = name.removeprefix("_orig_mod.")
        if name != "lm_head.weight":
            out[name] = tensor
    return out


@contextlib.contextmanager
def capture_block_outputs(model: nn.Module, names: list[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the `with`, every forward pass stores the output of each named module under its name,
    the name of its tensors in the checkpoint: "h.7" (a block's output, the residual stream after
    it), "h.7.mlp", "h.7.attn.c_proj", "ln_f", ... By default every block, "h.0" ... "h.{L-1}".
    The hooks are removed on leaving, also after an error."""
    names = [f"h.{i}" for i in range(len(model.h))] if names is None else list(names)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:

            def hook(module, inputs, output, name=name):
                captured[name] = output.detach().float()

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def hidden_drift(ha: torch.Tensor, hb: torch.Tensor) -> dict[str, float]:
    """How far one block's output B moved from A, each (T, C): the mean over tokens of their cosine
    similarity, and the relative difference ||hA - hB|| / ||hA||. Identical outputs give exactly 1
    and 0 (not 1 - rounding). The one measure of activation drift: snapshots during training and
    `compare` afterwards both use it."""
    d = ha - hb
    cosine = F.cosine_similarity(ha, hb, dim=1)
    cosine = torch.where((d == 0).all(dim=1), torch.ones_like(cosine), cosine.clamp(-1.0, 1.0))
    norm_d, norm_a = torch.linalg.vector_norm(d).item(), torch.linalg.vector_norm(ha).item()
    relative = 0.0 if norm_d == 0 else (math.inf if norm_a == 0 else norm_d / norm_a)
    return {"cosine": cosine.mean().item(), "relative_diff": relative}


class Snapshotter:
    """Remembers the starting model (a float32 copy on the CPU) and measures drift from it."""

    def __init__(self, model: nn.Module, probe_ids: list[int], probe_text: str = DEFAULT_PROBE) -> None:
        self.probe_text = probe_text
        self.probe_ids = probe_ids[: model.config.n_positions]
        self.w0 = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in official_tensors(model).items()}
        self.h0 = self.block_outputs(model)
        self.start_norms: dict[str, float] | None = None  # ||W0|| per tensor, at the first `layer_drift`

    @torch.no_grad()
    def block_outputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each block's output (T, C) on the probe, in float32, with dropout off."""
        was_training = model.training
        device = next(model.parameters()).device
        idx = torch.tensor([self.probe_ids], device=device)
        model.eval()
        try:
            with capture_block_outputs(model) as captured:
                model(idx)
        finally:
            model.train(was_training)
        return {name: h[0].cpu() for name, h in captured.items()}

    @torch.no_grad()
    def measure(self, model: nn.Module, step: int, tokens: int) -> dict:
        """One line of snapshots.jsonl (see the module docstring for the measures)."""
        weights = {}
        for name, w in official_tensors(model).items():
            w0 = self.w0[name]
            diff = torch.linalg.vector_norm(w.detach().to("cpu", torch.float64) - w0.double()).item()
            base = torch.linalg.vector_norm(w0.double()).item()
            # A tensor that started at zero (a bias of a model trained from scratch) has no
            # relative change; its absolute change is reported instead.
            weights[name] = diff / base if base > 0 else diff
        activations = {}
        for name, h in self.block_outputs(model).items():
            activations[name] = hidden_drift(self.h0[name].double(), h.double())
        return {
            "step": step,
            "tokens": tokens,
            "weights": weights,
            "activations": activations,
            "probe": self.probe_text,
        }

    def layer_drift(self, snapshot: dict) -> dict:
        """A snapshot per layer, as `compare.py RUN` shows it: {"weight_drift": {layer: pooled
        relative change}, "activation_drift": {block: ...}, ...} (see `run_drift`)."""
        if self.start_norms is None:
            self.start_norms = {name: torch.linalg.vector_norm(w.double()).item() for name, w in self.w0.items()}
        return run_drift([snapshot], self.start_norms)["steps"][0]


# ----- drift per layer, from the snapshots ---------------------------------------------------


def tensor_kind(name: str) -> tuple[str, str]:
    """(layer, module kind) of an official tensor name: `h.3.mlp.c_fc.bias` -> ("h.3", "mlp.c_fc")."""
    m = re.fullmatch(r"(h\.\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return m.group(1), m.group(2)
    module = name.rsplit(".", 1)[0]
    return module, module  # wte, wpe, ln_f: a "layer" of their own


def _layer_drift(changes: dict[str, float], norms: dict[str, float] | None) -> dict[str, float]:
    """Per layer, from per-tensor relative changes: pooled when the starting norms are known.

    Pooled is the figure of the per-layer weights table, ||all of W - W0|| / ||all of W0||, with
    ||W - W0|| = change x ||W0|| (or the change itself for a tensor that started at zero, where
    the trainer records the absolute change). Without the norms, the plain mean of the ratios,
    in which a small LayerNorm bias counts as much as a large matrix.
    """
    groups: dict[str, list[tuple[float, float | None]]] = {}
    for name, value in changes.items():
        norm = None if norms is None else norms.get(name)
        groups.setdefault(tensor_kind(name)[0], []).append((float(value), norm))
    drift = {}
    for layer, items in groups.items():
        if any(norm is None for _, norm in items):
            drift[layer] = sum(value for value, _ in items) / len(items)
        else:
            diff = math.sqrt(sum((value * norm if norm > 0 else value) ** 2 for value, norm in items))
            base = math.sqrt(sum(norm**2 for _, norm in items))
            drift[layer] = diff / base if base > 0 else diff
    return drift


def run_drift(snapshots: list[dict], start_norms: dict[str, float] | None = None) -> dict:
    """Drift over steps, per layer, from the trainer's snapshots.

    Weight drift of a layer at a step is its tensors' relative change from the start, pooled with
    the norms of the starting model when they are given (see `_layer_drift`); activation drift is
    the relative difference and cosine of each block's output on the probe prompt.
    """
    layers = []
    for snap in snapshots:
        for layer in list(dict.fromkeys(tensor_kind(n)[0] for n in snap["weights"])) + list(snap["activations"]):
            if layer not in layers:
                layers.append(layer)
    order = {name: i for i, name in enumerate(["wte", "wpe"] + [f"h.{i}" for i in range(10_000)] + ["ln_f"])}
    layers.sort(key=lambda name: order.get(name, len(order)))
    steps = []
    for snap in snapshots:
        steps.append(
            {
                "step": snap["step"],
                "tokens": snap.get("tokens"),
                "weight_drift": _layer_drift(snap["weights"], start_norms),
                "activation_drift": {
                    b: float(v.get("relative_diff", math.nan)) for b, v in snap["activations"].items()
                },
                "activation_cosine": {b: float(v.get("cosine", math.nan)) for b, v in snap["activations"].items()},
            }
        )
    probe = next((s.get("probe") for s in reversed(snapshots) if s.get("probe") is not None), None)
    return {"layers": layers, "probe": probe, "steps": steps, "pooled": start_norms is not None, "snapshots": snapshots}
