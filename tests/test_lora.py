"""LoRA: step 0 is the base model, training moves only the adapted weights by a rank <= r update,
checkpoints are merged (checked against NumPy, transformers and PEFT), and a LoRA run resumes bit for bit."""

import json
import math

import numpy as np
import pytest
import torch
from checkpoints import tiny_model
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from minigpt2 import MiniGPT2Error, load_model, save_model
from minigpt2.analysis.compare import compare
from minigpt2.analysis.report import render
from minigpt2.errors import CheckpointError
from minigpt2.io.tokenizer import encoding_from_files
from minigpt2.model.lora import (
    PEFT_PREFIX,
    TARGETS,
    LoRALinear,
    adapter_state,
    apply_lora,
    load_adapter_state,
    lora_summary,
    merged_state_dict,
)
from minigpt2.model.snapshots import Snapshotter
from minigpt2.training.data import prepare_corpus
from minigpt2.training.rundir import STATE_JSON, STATE_TENSORS, RunDir
from minigpt2.training.setup_run import start_model
from minigpt2.training.trainer import TrainConfig, Trainer, param_groups

R, ALPHA = 2, 8.0
TRAINED = ("attn.c_attn", "mlp.c_proj")  # a subset, so that untouched layers of each kind remain


@pytest.fixture(scope="module")
def corpus(test_data, tmp_path_factory):
    """A small slice of 鲁迅小说集 (fast to tokenize), the tail 10% held out."""
    enc = encoding_from_files(test_data / "gpt2" / "vocab.json", test_data / "gpt2" / "merges.txt")
    text = (test_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:40_000]
    folder = tmp_path_factory.mktemp("text")
    (folder / "luxun.txt").write_text(text, encoding="utf-8")
    return prepare_corpus([folder / "luxun.txt"], enc, val_fraction=0.1, cache_dir=folder / "cache")


@pytest.fixture(scope="module")
def base_dir(test_data, tmp_path_factory):
    """The base model, saved: a run starts from it, and PEFT applies the adapter to it."""
    return save_model(tiny_model(seed=7), tmp_path_factory.mktemp("base") / "base", tokenizer_source=test_data / "gpt2")


def lora_trainer(corpus, base_dir, out, *, seed=1, lora_dropout=0.0, snapshotter=None, **config):
    model = start_model(str(base_dir), dropout=config.pop("dropout", None))
    apply_lora(model, R, ALPHA, dropout=lora_dropout, targets=TRAINED, seed=seed)
    if snapshotter:
        snapshotter = Snapshotter(model, list(range(100, 120)))
    config = {
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 0,
        "eval_tokens": 256,
        "lr": 1e-2,
        "warmup": 0,
        **config,
    }
    return Trainer(
        model,
        corpus.train,
        {"val": corpus.val},
        TrainConfig(**config),
        out,
        tokenizer_source=base_dir,
        base_model=str(base_dir),
        snapshotter=snapshotter,
    )


def train_losses(trainer, stop_at=None):
    losses = []
    for r in trainer.run():
        if r["type"] == "train":
            losses.append(r["loss"])
            if r["step"] == stop_at:
                trainer.request_stop("test")
    return losses


@pytest.fixture(scope="module")
def trained(corpus, base_dir, tmp_path_factory):
    """A finished 6-step LoRA run (r=2, on attn.c_attn and mlp.c_proj), with snapshots."""
    out = tmp_path_factory.mktemp("run") / "run"
    trainer = lora_trainer(corpus, base_dir, out, snapshotter=True, snapshot_every=3)
    train_losses(trainer)
    return trainer, out / "final"


# ----- the module ---------------------------------------------------------------------------------


def test_step_zero_is_the_base_model_exactly_and_hooks_still_see_the_layer():
    base, model = tiny_model(), tiny_model()
    apply_lora(model, 4, dropout=0.1, seed=0)
    base.eval()
    model.eval()
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = {}
    model.h[1].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.setdefault("lora", o))
    base.h[1].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.setdefault("base", o))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
    assert torch.equal(seen["lora"], seen["base"])
    assert isinstance(model.h[1].mlp.c_fc, LoRALinear) and model.h[1].mlp.c_fc.scaling == 8 / 4
    assert all(torch.equal(base.state_dict()[k], v) for k, v in merged_state_dict(model).items())
    assert list(merged_state_dict(model)) == [k for k in base.state_dict()]  # official names, same order


def test_only_the_adapters_are_trainable_and_optimised():
    model = apply_lora(tiny_model(), 8, targets="attn.c_attn,mlp.c_fc")
    names = [n for g in param_groups(model, 0.1) for n in g["names"]]
    assert names == [
        f"h.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB"
    ]
    s = lora_summary(model)
    expected = 2 * 8 * ((64 + 192) + (64 + 256))
    assert s["trainable_params"] == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s["total_params"] == tiny_model().num_params() + expected
    assert s["trainable_share"] == pytest.approx(expected / s["total_params"])
    assert s["optimizer_state_bytes"] == 8 * expected
    assert s["full_optimizer_state_bytes"] == 8 * tiny_model().num_params()
    assert s["adapted"] == [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    assert (s["r"], s["alpha"], s["targets"]) == (8, 8.0, ["attn.c_attn", "mlp.c_fc"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "rank must be a whole number of at least 1"),
        ({"r": 2.5}, "rank must be a whole number"),
        ({"r": True}, "rank must be a whole number"),
        ({"alpha": 0}, "alpha must be a positive finite number"),
        ({"alpha": math.nan}, "alpha must be a positive finite number"),
        ({"alpha": math.inf}, "alpha must be a positive finite number"),
        ({"dropout": 1.0}, "dropout must be at least 0 and below 1"),
        ({"dropout": -0.1}, "dropout must be at least 0 and below 1"),
        (
            {"targets": ("attn.c_attn", "attn.c_atn")},
            "unknown LoRA target 'attn.c_atn'; the layers that can be adapted "
            "are attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj",
        ),
        ({"targets": ()}, "no LoRA target given"),
        ({"targets": "mlp.c_fc,mlp.c_fc"}, "named twice"),
    ],
)
def test_bad_settings_are_refused_with_what_is_allowed(kwargs, message):
    model = tiny_model()
    with pytest.raises(MiniGPT2Error, match=message):
        apply_lora(model, **{"r": 4, **kwargs})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen


def test_lora_is_applied_once_and_adapters_must_match():
    model = apply_lora(tiny_model(), 4)
    with pytest.raises(MiniGPT2Error, match="already has LoRA adapters"):
        apply_lora(model, 4)
    other = apply_lora(tiny_model(), 2)
    with pytest.raises(CheckpointError, match=r"wrong shapes: h\.0\.attn\.c_attn\.lora_A\.weight is \[4, 64\]"):
        load_adapter_state(other, adapter_state(model))
    fewer = apply_lora(tiny_model(), 4, targets=("attn.c_attn",))
    with pytest.raises(CheckpointError, match="unexpected: h.0.attn.c_proj.lora_A.weight"):
        load_adapter_state(fewer, adapter_state(model))
    # One name everywhere (the adapter file, the trainer state): PEFT's
    assert set(adapter_state(model)) == {
        f"{PEFT_PREFIX}h.{i}.{t}.lora_{ab}.weight" for i in range(2) for t in TARGETS for ab in "AB"
    }


# ----- a LoRA run ------------------------------------------------------------------------------------


def test_training_moves_only_the_adapted_weights_by_a_rank_r_update(trained, base_dir):
    trainer, final = trained
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(final / "model.safetensors"))
    assert set(merged) == set(base)  # the plain layout: no .base, no lora tensors
    adapted = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in TRAINED}
    for key in base:
        if key not in adapted:
            assert torch.equal(merged[key], base[key]), key  # frozen: bit-identical
            continue
        update = merged[key].double() - base[key].double()
        s = torch.linalg.svdvals(update)
        assert s[0] > 1e-3, key  # it moved
        # rank <= R: beyond R, only the float32 rounding of W + update is left
        assert torch.linalg.matrix_rank(update, rtol=1e-4) <= R and s[R] < 1e-5 * s[0], key
    snap = [json.loads(line) for line in (final.parent / "snapshots.jsonl").read_text().splitlines()][-1]
    assert {k for k, v in snap["weights"].items() if v > 0} == {k.removeprefix("transformer.") for k in adapted}


def test_merged_checkpoint_is_base_plus_scaled_BA_in_the_official_orientation(trained, base_dir):
    """Independently of the code under test: NumPy, the saved files, and PEFT's documented merge
    for a Conv1D weight (in, out): W + scaling * (B @ A)^T."""
    _, final = trained
    base = load_numpy(str(base_dir / "model.safetensors"))
    merged = load_numpy(str(final / "model.safetensors"))
    adapter = load_numpy(str(final / "adapter" / "adapter_model.safetensors"))
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D weights are (in, out)
    assert sorted(config["target_modules"]) == sorted(TRAINED)
    assert len(adapter) == 2 * 2 * len(TRAINED)
    scaling = config["lora_alpha"] / config["r"]
    for i in range(2):
        for m in TRAINED:
            key = f"transformer.h.{i}.{m}.weight"
            a = adapter[f"base_model.model.transformer.h.{i}.{m}.lora_A.weight"].astype(np.float64)  # (r, in)
            b = adapter[f"base_model.model.transformer.h.{i}.{m}.lora_B.weight"].astype(np.float64)  # (out, r)
            assert a.shape == (R, base[key].shape[0]) and b.shape == (base[key].shape[1], R)
            expected = base[key].astype(np.float64) + scaling * (b @ a).T  # (in, out)
            np.testing.assert_allclose(merged[key], expected, rtol=0, atol=2e-7)
            assert np.abs(b).max() > 0


def test_transformers_and_peft_compute_what_the_merged_checkpoint_computes(trained):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    trainer, final = trained
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    with torch.no_grad():
        merged = GPT2LMHeadModel.from_pretrained(final).eval()(idx).logits
        ours = load_model(final)(idx)
        trainer.raw_model.eval()
        lora = trainer.raw_model(idx)
        base = GPT2LMHeadModel.from_pretrained(config["base_model_name_or_path"]).eval()(idx).logits
        peft_model = GPT2LMHeadModel.from_pretrained(config["base_model_name_or_path"])
        peft = PeftModel.from_pretrained(peft_model, final / "adapter").eval()(idx).logits
    assert (merged - ours).abs().max() < 1e-4
    assert (lora - ours).abs().max() < 1e-4
    assert (peft - merged).abs().max() < 1e-5
    assert (peft - merged).abs().max() < 1e-3 * (merged - base).abs().max()  # the update counts


def test_compare_marks_the_adapted_tensors_and_their_rank(trained, base_dir):
    _, final = trained
    result = compare(str(base_dir), str(final))
    lora = result["weights"]["lora"]
    assert (lora["r"], lora["alpha"]) == (R, ALPHA)
    assert lora["adapted"] == [f"h.{i}.{m}.weight" for i in range(2) for m in TRAINED]
    for t in result["weights"]["tensors"]:
        if t["name"] in lora["adapted"]:
            assert 1 <= t["rank_90"] <= R
        else:
            assert t["relative_change"] == 0
    text = render(result)
    assert "h.0.attn.c_attn.weight *" in text and "h.0.attn.c_proj.weight *" not in text
    assert f"* marks the 4 adapted tensors, whose update has rank <= {R}" in text
    assert compare(str(base_dir), str(base_dir))["weights"]["lora"] is None


def test_a_lora_run_resumes_bit_for_bit_and_its_state_holds_only_adapters(corpus, base_dir, tmp_path):
    kw = dict(steps=6, grad_accum=2, seq_len=16, eval_every=3, eval_tokens=128, dropout=0.1, lora_dropout=0.1)
    full = lora_trainer(corpus, base_dir, tmp_path / "full", **kw)
    full_losses = train_losses(full)

    first = lora_trainer(corpus, base_dir, tmp_path / "split", **kw)
    assert train_losses(first, stop_at=3) == full_losses[:3]
    assert [c.step for c in RunDir(tmp_path / "split").checkpoints()] == [3]
    ckpt = tmp_path / "split" / "step-000003"
    state = load_file(str(ckpt / STATE_TENSORS))
    moments = [k for k in state if k.startswith("optimizer.")]
    assert moments and all(".lora_A.weight." in k or ".lora_B.weight." in k for k in moments)
    assert {k for k in state if k.startswith(PEFT_PREFIX)} == {
        f"{PEFT_PREFIX}h.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in TRAINED for ab in "AB"
    }
    assert json.loads((ckpt / STATE_JSON).read_text())["lora"]["r"] == R
    adapters = sum(v.numel() for k, v in state.items() if k.startswith(PEFT_PREFIX))
    assert sum(state[k].numel() for k in moments if not k.endswith(".step")) == 2 * adapters

    # a fresh base with differently drawn A: everything trained must come from the checkpoint
    second = lora_trainer(corpus, base_dir, tmp_path / "split", seed=99, **kw)
    second.load_checkpoint(ckpt)
    assert train_losses(second) == full_losses[3:]  # exactly equal floats
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / "final" / name)), load_file(str(tmp_path / "split" / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_with_other_lora_settings_is_refused(trained, corpus, base_dir, tmp_path):
    _, final = trained
    model = start_model(str(base_dir))
    apply_lora(model, R, 2 * ALPHA, targets=TRAINED)
    trainer = Trainer(model, corpus.train, {}, TrainConfig(steps=6, batch_size=4, seq_len=32), tmp_path / "run")
    with pytest.raises(CheckpointError, match="cannot resume from .*saved with LoRA settings .*'alpha': 8.0"):
        trainer.load_checkpoint(final)


def test_all_targets_by_default():
    model = apply_lora(tiny_model(), 1)
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        f"h.{i}.{t}" for i in range(2) for t in TARGETS
    ]
