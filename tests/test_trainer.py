"""The training loop, in-process: it learns, it resumes exactly, it stops on NaN, it saves loadable checkpoints."""

import functools
import hashlib
import math

import pytest
import torch
from checkpoints import tiny_model
from safetensors.torch import load_file

from minigpt2 import load_model, load_tokenizer
from minigpt2.files import read_jsonl
from minigpt2.model.evaluate import char_counts
from minigpt2.model.snapshots import Snapshotter
from minigpt2.training.data import prepare_corpus
from minigpt2.training.rundir import STATE_JSON, RunDir
from minigpt2.training.trainer import TrainConfig, Trainer, TrainingDiverged, lr_at, param_groups, steps_for


@pytest.fixture(scope="module")
def novels(test_data, enc, tmp_path_factory):
    """The four novels, with the tail 1% of each held out."""
    zh = test_data / "zh"
    files = [zh / n for n in ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")]
    return prepare_corpus(files, enc, val_fraction=0.01, cache_dir=tmp_path_factory.mktemp("tokens"))


@functools.cache
def gpt2_char_counts():
    """Characters per token id of the tokenizer the novels were tokenized with (for bits per character)."""
    return char_counts(load_tokenizer("gpt2"))


def make_trainer(novels, out, *, model=None, tokenizer=None, **config):
    config = {"steps": 8, "batch_size": 4, "seq_len": 32, "eval_every": 0, "eval_tokens": 512, "lr": 3e-3, **config}
    counts = gpt2_char_counts()
    model, evals, config = model or tiny_model(), {"val": novels.val}, TrainConfig(**config)
    return Trainer(model, novels.train, evals, config, out, tokenizer_source=tokenizer, char_counts=counts)


def checkpoints(run):
    return [(c.step, c.path) for c in RunDir(run).checkpoints()]


def records(trainer, kind=None, on=None):
    out = []
    for r in trainer.run():
        if on:
            on(trainer, r)
        if kind is None or r["type"] == kind:
            out.append(r)
    return out


def test_adamw_groups_decay_only_linear_weights():
    groups = param_groups(tiny_model(), 0.1)
    decay, no_decay = groups[0]["names"], groups[1]["names"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == [
        f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias", "h.1.mlp.c_fc.bias"} <= set(no_decay)
    assert "lm_head.weight" not in decay + no_decay  # tied to wte: one tensor, optimised once
    assert len(decay) + len(no_decay) == len(list(tiny_model().parameters()))


def test_warmup_then_cosine():
    c = TrainConfig(steps=110, lr=1e-3, min_lr=1e-4, warmup=10)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(0.55e-3)  # half way down the cosine
    assert lr_at(110, c) == pytest.approx(1e-4)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 110))
    assert TrainConfig(steps=100).warmup == 5 and TrainConfig(steps=100).min_lr == pytest.approx(3e-5)
    assert steps_for(epochs=2, train_tokens=1000, tokens_per_step=300) == 7
    assert steps_for(train_tokens=1000, tokens_per_step=300) == 4


def test_a_tiny_model_learns_the_novels(novels, enc, tmp_path):
    trainer = make_trainer(novels, tmp_path / "run", steps=24, eval_every=12, eval_tokens=1024)
    evals = records(trainer, "eval")
    losses = [r["loss"] for r in evals]
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert losses[0] > 10.5  # random init: about ln(50257) = 10.8
    assert losses[-1] < losses[0] - 2.5 and losses[-1] < losses[1]
    # bits per character of exactly the 1,024 tokens evaluated (after the EOT that starts the set)
    scored = novels.val.tokens[1:1025].tolist()
    chars = sum(1 for byte in enc.decode_bytes([t for t in scored if t != enc.eot_token]) if byte & 0xC0 != 0x80)
    assert evals[-1]["eval_tokens"] == 1024 and evals[-1]["window"] == 32 and evals[-1]["chars"] == chars
    assert evals[-1]["bpc"] == pytest.approx(losses[-1] * 1024 / (chars * math.log(2)))
    assert evals[-1]["ppl"] == pytest.approx(math.exp(losses[-1]))


def test_resume_continues_bit_for_bit(novels, tmp_path):
    # dropout and gradient accumulation on, so the RNG state and micro-batch position matter too
    kw = dict(steps=8, grad_accum=2, seq_len=16, eval_every=3, eval_tokens=128, save_every=0)
    full = make_trainer(novels, tmp_path / "full", model=tiny_model(dropout=0.1), **kw)
    full_losses = [r["loss"] for r in records(full, "train")]

    def stop_at_5(trainer, r):
        if r["type"] == "train" and r["step"] == 5:
            trainer.request_stop("test")

    first = make_trainer(novels, tmp_path / "split", model=tiny_model(dropout=0.1), **kw)
    stopped = records(first, on=stop_at_5)[-1]
    assert stopped["type"] == "stopped" and stopped["step"] == 5
    assert [step for step, _ in checkpoints(tmp_path / "split")] == [5]

    second = make_trainer(novels, tmp_path / "split", model=tiny_model(seed=123, dropout=0.1), **kw)
    second.load_checkpoint(tmp_path / "split" / "step-000005")
    resumed = [r["loss"] for r in records(second, "train")]
    assert len(resumed) == 3
    assert resumed == full_losses[5:]  # exactly equal floats
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = read_jsonl(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 9))  # one clean history


def test_nan_stops_and_leaves_the_last_checkpoint_untouched(novels, tmp_path):
    model = tiny_model()
    forward, calls = model.forward, [0]

    def poisoned(idx, targets=None, **kw):  # the loss of the 6th training step is NaN
        out = forward(idx, targets, **kw)
        calls[0] += model.training
        if model.training and calls[0] == 6:
            return out[0], out[1] * float("nan")
        return out

    model.forward = poisoned
    trainer = make_trainer(novels, tmp_path / "run", model=model, steps=10, save_every=4)
    seen, digests = [], {}

    def remember(trainer, r):
        seen.append(r)
        if r["type"] == "checkpoint":
            digests.update(
                {
                    p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in (tmp_path / "run" / "step-000004").iterdir()
                }
            )

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*step-000004, is untouched"):
        records(trainer, on=remember)
    assert [r["step"] for r in seen if r["type"] == "train"] == [1, 2, 3, 4, 5]
    assert [p.name for _, p in checkpoints(tmp_path / "run")] == ["step-000004"]
    assert digests == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run" / "step-000004").iterdir()
    }
    assert torch.isfinite(load_model(tmp_path / "run" / "step-000004").wte.weight).all()


def test_checkpoints_load_in_transformers_and_hold_no_pickles(novels, test_data, tmp_path):
    from transformers import GPT2LMHeadModel

    trainer = make_trainer(novels, tmp_path / "run", steps=3, tokenizer=test_data / "gpt2")
    records(trainer)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["config.json", "model.safetensors", "vocab.json", "merges.txt", STATE_JSON, "trainer_state.safetensors"]
    )
    ours = load_model(final)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), trainer.raw_model.state_dict().values()))
    theirs = GPT2LMHeadModel.from_pretrained(final).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4
    state = load_file(str(final / "trainer_state.safetensors"))
    assert "optimizer.h.0.attn.c_attn.weight.exp_avg" in state and "rng.torch_cpu" in state


def test_snapshots_measure_drift_and_remove_their_hooks(novels, enc, tmp_path):
    model = tiny_model()
    snap = Snapshotter(model, enc.encode("今天的天气很好"), "今天的天气很好")
    trainer = make_trainer(novels, tmp_path / "run", model=model, steps=4, snapshot_every=2)
    trainer.snapshotter = snap
    records(trainer)
    lines = read_jsonl(tmp_path / "run" / "snapshots.jsonl")
    assert [s["step"] for s in lines] == [0, 2, 4]
    assert lines[1]["tokens"] == 2 * 4 * 32 and lines[0]["probe"] == "今天的天气很好"
    names = [n for n in model.state_dict() if n != "lm_head.weight"]
    assert list(lines[2]["weights"]) == names
    assert set(lines[0]["weights"].values()) == {0.0}
    assert all(v > 0 for v in lines[2]["weights"].values())
    assert lines[2]["weights"]["h.0.attn.c_attn.weight"] > lines[1]["weights"]["h.0.attn.c_attn.weight"]
    assert list(lines[2]["activations"]) == ["h.0", "h.1"]
    assert lines[0]["activations"]["h.1"] == {"cosine": pytest.approx(1.0), "relative_diff": 0.0}
    assert 0 < lines[2]["activations"]["h.1"]["relative_diff"] and lines[2]["activations"]["h.1"]["cosine"] < 1
    assert all(not m._forward_hooks for m in model.modules())


# ----- reading the loss to the host only now and then (a GPU's queue never waits) ----------------


def small_trainer(tmp_path, read_every, model=None, **config):
    import numpy as np

    from minigpt2 import GPT, GPTConfig
    from minigpt2.training.data import TokenFile

    path = tmp_path / f"tokens-{read_every}.bin"
    np.random.default_rng(0).integers(0, 500, 4096, dtype=np.uint16).tofile(path)
    torch.manual_seed(0)
    model = model or GPT(GPTConfig(vocab_size=500, n_positions=32, n_layer=2, n_head=2, n_embd=32))
    config = TrainConfig(**{"steps": 12, "batch_size": 2, "seq_len": 16, "eval_every": 0, **config})
    trainer = Trainer(model, TokenFile(path, chars=4096), {}, config, tmp_path / f"run-{read_every}")
    trainer.read_every = read_every
    return trainer


def test_steps_between_reads_never_wait_for_the_device(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, read_every=5)
    inside, waits = [False], []

    def counted(name, original):
        def read(self, *args):
            if inside[0]:
                waits.append(name)
            return original(self, *args)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__format__"):  # every way to read a tensor
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    train_step = trainer.train_step

    def unread_step(read=True):
        inside[0] = not read
        try:
            return train_step(read)
        finally:
            inside[0] = False

    monkeypatch.setattr(trainer, "train_step", unread_step)
    got = records(trainer, "train")
    monkeypatch.undo()
    assert waits == []
    assert [r["step"] for r in got] == list(range(1, 13))
    every_step = records(small_trainer(tmp_path, read_every=1), "train")  # the same numbers, read at once
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in every_step]
    assert all(isinstance(r["loss"], float) and r["step_s"] > 0 for r in got)
    # reading one step returns the record of train_step(read=True): the same loss as the logged one
    lone = small_trainer(tmp_path, read_every=1)
    assert lone.read_records([lone.train_step(read=False)])[0]["loss"] == every_step[0]["loss"]


def test_nan_found_at_a_later_read_still_saves_nothing_after_it(tmp_path):
    trainer = small_trainer(tmp_path, read_every=5, save_every=4)
    model = trainer.raw_model
    forward, calls = model.forward, [0]

    def poisoned(idx, targets=None, **kw):  # the loss of the 6th training step is NaN
        out = forward(idx, targets, **kw)
        calls[0] += model.training
        return (out[0], out[1] * float("nan")) if model.training and calls[0] == 6 else out

    model.forward = poisoned
    seen = []
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6; stopping before saving any later step"):
        records(trainer, on=lambda t, r: seen.append(r))
    assert [r["step"] for r in seen if r["type"] == "train"] == [1, 2, 3, 4]
    assert [p.name for _, p in checkpoints(tmp_path / "run-5")] == ["step-000004"]
