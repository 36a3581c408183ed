"""Building GPT-2-layout checkpoints from random weights, as the real ones are laid out.

transformers' `GPT2LMHeadModel` is the reference: we make one from random weights and write
it out (a) exactly as the official hub file is laid out (no `transformer.` prefix, Conv1D
weights (in, out), the `attn.bias` mask buffers present, no `lm_head`) or (b) with
`save_pretrained`, and (c) into a Hugging Face cache folder, as `hf_hub_download` leaves it.
`tiny_gpt` is a small minigpt2 model from random weights, for tests that need no checkpoint;
`tiny_model` one as `--init-preset` builds it, for training tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt2 import GPT, GPTConfig

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}


def tiny_model(seed=0, dropout=0.0) -> GPT:
    """A tiny GPT-2 as train.py's `--init-preset gpt2` builds it (seeded, in training mode)."""
    from minigpt2.training.setup_run import start_model

    return start_model(None, "gpt2", TINY, seed=seed, dropout=dropout)


def tiny_gpt(vocab_size=500, n_positions=32, seed=0, n_layer=2, n_embd=32, n_head=4) -> GPT:
    """A small minigpt2 GPT from seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    ).eval()


def random_hf_model(*, n_layer, n_head, n_embd, n_positions=128, vocab_size=50257, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=vocab_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    # transformers' init leaves biases and LayerNorms at 0 / 1; randomise them too, so that a
    # loader that skipped or swapped one of them would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors of the official `openai-community/gpt2` model.safetensors, for this model."""
    n_ctx = model.config.n_positions
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensors[key.removeprefix("transformer.")] = tensor.detach().clone().contiguous()
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    return tensors


def write_official_layout(model, directory: Path, *, with_config: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(official_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if with_config:
        (directory / "config.json").write_text(model.config.to_json_string())
    return directory


def populate_hub_cache(hub_cache: Path, repo_id: str, model, *, extra_files=None, revision="main") -> Path:
    """Lay out `repo_id` in a Hugging Face cache the way huggingface_hub itself does.

    models--{owner}--{name}/blobs/<sha256> hold the contents, snapshots/<commit>/<file> are
    relative symlinks to them, refs/<revision> holds the commit hash.
    """
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    staging = repo_dir / "staging"
    write_official_layout(model, staging)
    files = {p.name: p for p in staging.iterdir()}
    files.update({name: Path(p) for name, p in (extra_files or {}).items()})
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    for p in staging.iterdir():
        p.unlink()
    staging.rmdir()
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


def hf_config_dict(model) -> dict:
    return json.loads(model.config.to_json_string())
