"""compare.py and minigpt2.analysis.compare / minigpt2.analysis.report: every figure checked against an independent
computation, planted changes found where they were planted, and `python compare.py` run as a user
runs it on a tiny model fine-tuned here, in the test, on the shared Chinese text."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clis import assert_clean_error, run_script

from minigpt2 import GPT, GPTConfig, MiniGPT2Error, load_model, save_model
from minigpt2.analysis.compare import (
    block_outputs,
    compare,
    compare_weights,
    count_characters,
    run_drift,
    tensor_metrics,
    token_text,
)
from minigpt2.analysis.report import finite, render, to_json, write_json, write_plot
from minigpt2.io.tokenizer import encoding_from_files
from minigpt2.io.weights import is_conv1d
from minigpt2.training import distributed
from minigpt2.training import setup_run as launch
from minigpt2.training.options import TrainOptions
from minigpt2.training.rundir import RunDir

TINY = GPTConfig(n_layer=3, n_head=2, n_embd=32, n_positions=32)


def tokenizer_dir(test_data: Path) -> Path:
    return test_data / "gpt2"


def tiny_pair(tmp_path: Path, test_data: Path, config: GPTConfig = TINY, change=None, seed: int = 0):
    """Checkpoint A (random) and B (A with `change(model)` applied), each with tokenizer files."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # random biases and LayerNorms too, so no tensor is trivially 0 or 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    a = save_model(model, tmp_path / "a", tokenizer_source=tokenizer_dir(test_data))
    if change is not None:
        with torch.no_grad():
            change(model)
    b = save_model(model, tmp_path / "b", tokenizer_source=tokenizer_dir(test_data))
    return str(a), str(b)


def run_compare(*args, timeout=180):
    return run_script("compare.py", *args, timeout=timeout)


def all_floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from all_floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from all_floats(v)


# ----- the metrics, against NumPy ---------------------------------------------------------


def numpy_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    """The same figures, written independently from their definitions."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = a - b
    ra, rb = (a, b) if a.ndim == 2 else (a[None], b[None])
    cosines = (ra * rb).sum(1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
    out = {
        "mean_abs_diff": np.abs(d).mean(),
        "max_abs_diff": np.abs(d).max(),
        "std_diff": d.std(ddof=1),
        "mean_row_cosine": cosines.mean(),
        "mean_row_distance": np.linalg.norm(ra - rb, axis=1).mean(),
        "relative_change": np.linalg.norm(d) / np.linalg.norm(a),
    }
    if d.ndim == 2:
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        out["stable_rank"] = s2.sum() / s2.max()
        out["rank_90"] = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9) + 1)
    return out


@pytest.mark.parametrize("chunk", [1 << 22, 60], ids=["whole", "in-chunks"])
@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (50,)])
def test_each_metric_equals_numpy(shape, chunk, monkeypatch):
    monkeypatch.setattr("minigpt2.analysis.compare.CHUNK_ELEMENTS", chunk)  # 60: two or three rows at a time
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=g)
    b = a + 0.1 * torch.randn(shape, generator=g) + 0.3  # an offset too: the chunked std must combine means
    ours = tensor_metrics(a, b)
    for key, expected in numpy_metrics(a.numpy(), b.numpy()).items():
        assert ours[key] == pytest.approx(expected, rel=1e-6, abs=0), key
    if len(shape) == 1:
        assert ours["stable_rank"] is None and ours["rank_90"] is None


def test_a_planted_rank_2_update_is_rank_2():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(96, 64, generator=g)
    u, _ = torch.linalg.qr(torch.randn(96, 2, generator=g))  # orthonormal: two equal singular values
    v, _ = torch.linalg.qr(torch.randn(64, 2, generator=g))
    m = tensor_metrics(a, a + 0.01 * u @ v.T)
    assert m["rank_90"] == 2
    assert m["stable_rank"] == pytest.approx(2.0, rel=1e-4)
    noise = tensor_metrics(a, a + 0.01 * torch.randn(96, 64, generator=g))
    assert noise["rank_90"] > 30  # white noise needs most directions (39 of 64 here)


def test_identical_checkpoints_give_exact_zeros(tmp_path, test_data):
    a, _ = tiny_pair(tmp_path, test_data)
    copy = shutil.copytree(a, tmp_path / "copy")
    result = compare(a, str(copy), prompts=["今天的天气"])
    for t in result["weights"]["tensors"]:
        assert t["mean_abs_diff"] == t["max_abs_diff"] == t["std_diff"] == t["mean_row_distance"] == 0.0
        assert t["relative_change"] == 0.0 and t["mean_row_cosine"] == 1.0, t["name"]
        if len(t["shape"]) == 2:
            assert t["rank_90"] == 0 and t["stable_rank"] == 0.0
    assert all(b["cosine"] == 1.0 and b["relative_diff"] == 0.0 for b in result["activations"][0]["blocks"])
    assert result["activations"][0]["kl_a_b"] == 0.0
    assert not any(math.isnan(x) or math.isinf(x) for x in all_floats(result))


def test_a_hub_model_against_the_same_weights_in_another_layout(hub_gpt2, tmp_path):
    from checkpoints import write_official_layout

    # "gpt2" from the (offline, fake) hub cache: official layout, no prefix, mask buffers;
    # the local copy: save_model's layout, with the transformer. prefix and no buffers.
    local = save_model(load_model("gpt2"), tmp_path / "local")
    bare = write_official_layout(hub_gpt2, tmp_path / "bare", with_config=False) / "model.safetensors"
    for other in (local, bare):
        result = compare("gpt2", str(other), prompts=["Hello"])
        assert all(t["relative_change"] == 0 for t in result["weights"]["tensors"])
        assert len(result["weights"]["tensors"]) == 2 + 2 * 12 + 2
        assert result["activations"][0]["kl_a_b"] == 0.0


def test_a_change_planted_in_one_tensor_is_ranked_first(tmp_path, test_data):
    def change(model):  # nn.Linear (out, in): the official tensor is its transpose
        model.h[1].mlp.c_proj.weight.add_(0.001 * torch.randn_like(model.h[1].mlp.c_proj.weight))

    a, b = tiny_pair(tmp_path, test_data, change=change)
    weights = compare_weights(a, b)
    ranked = sorted(weights["tensors"], key=lambda t: -t["relative_change"])
    assert ranked[0]["name"] == "h.1.mlp.c_proj.weight" and ranked[0]["shape"] == [128, 32]  # (in, out)
    assert ranked[0]["relative_change"] > 0 and all(t["relative_change"] == 0 for t in ranked[1:])
    assert [r["layer"] for r in weights["layers"] if r["norm_diff"]] == ["h.1"]
    assert weights["layers"][3]["most_changed_kind"] == "mlp.c_proj"  # wte, wpe, h.0, h.1
    cells = weights["heatmap"]["relative_change"]
    assert cells[1][5] > 0 and sum(v > 0 for row in cells for v in row) == 1


def test_the_official_orientation_is_used_for_row_metrics(tmp_path, test_data):
    def change(model):
        model.h[0].attn.c_attn.weight.mul_(1.5)

    a, b = tiny_pair(tmp_path, test_data, change=change)
    ma, mb = load_model(a), load_model(b)
    t = next(t for t in compare_weights(a, b)["tensors"] if t["name"] == "h.0.attn.c_attn.weight")
    wa, wb = ma.h[0].attn.c_attn.weight.T, mb.h[0].attn.c_attn.weight.T  # official (in, out) = (32, 96)
    assert is_conv1d(t["name"]) and t["shape"] == list(wa.shape) == [32, 96]
    distance = torch.norm(wa.double() - wb.double(), dim=1).mean().item()
    assert t["mean_row_distance"] == pytest.approx(distance, rel=1e-9)


# ----- activations ------------------------------------------------------------------------


def test_a_change_in_block_7_shows_as_activation_drift_from_block_7(tmp_path, test_data):
    def change(model):
        model.h[7].mlp.c_fc.weight.add_(0.05 * torch.randn_like(model.h[7].mlp.c_fc.weight))

    config = GPTConfig(n_layer=9, n_head=2, n_embd=32, n_positions=32)
    a, b = tiny_pair(tmp_path, test_data, config=config, change=change)
    result = compare(a, b, prompts=["The weather today", "今天的天气"])
    for act in result["activations"]:
        blocks = act["blocks"]
        assert [x["block"] for x in blocks] == [f"h.{i}" for i in range(9)]
        assert all(x["relative_diff"] == 0.0 and x["cosine"] == 1.0 for x in blocks[:7])
        assert all(x["relative_diff"] > 1e-4 and x["cosine"] < 1.0 for x in blocks[7:])
        assert act["kl_a_b"] > 0 and len(act["top5_a"]) == len(act["top5_b"]) == 5
    top = next(t for t in result["weights"]["tensors"] if t["relative_change"] > 0)
    assert top["name"] == "h.7.mlp.c_fc.weight"


def test_activation_figures_match_a_separate_forward_pass(tmp_path, test_data):
    a, b = tiny_pair(tmp_path, test_data, change=lambda m: m.h[2].ln_1.weight.mul_(1.3))
    result = compare(a, b, prompts=["Hello world, again"])
    enc = encoding_from_files(*(tokenizer_dir(test_data) / n for n in ("vocab.json", "merges.txt")))
    ids = torch.tensor([enc.encode("Hello world, again")])
    hidden = {}
    for side, source in (("a", a), ("b", b)):
        model = load_model(source)
        x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
        for block in model.h:
            x = block(x)
        hidden[side] = x[0].double()
        hidden[side + "_logits"] = model(ids)[0, -1].double()
    ha, hb = hidden["a"], hidden["b"]  # the last block's output
    last = result["activations"][0]["blocks"][-1]
    assert last["relative_diff"] == pytest.approx((torch.norm(ha - hb) / torch.norm(ha)).item(), rel=1e-6)
    cosine = ((ha * hb).sum(1) / (ha.norm(dim=1) * hb.norm(dim=1))).mean().item()
    assert last["cosine"] == pytest.approx(cosine, rel=1e-9)
    pa, pb = torch.softmax(hidden["a_logits"], -1), torch.softmax(hidden["b_logits"], -1)
    assert result["activations"][0]["kl_a_b"] == pytest.approx((pa * (pa / pb).log()).sum().item(), rel=1e-5)
    assert [t["id"] for t in result["activations"][0]["top5_b"]] == pb.topk(5).indices.tolist()


def test_hooks_are_always_removed(tmp_path, test_data):
    a, _ = tiny_pair(tmp_path, test_data)
    model = load_model(a)
    hiddens, logits = block_outputs(model, torch.tensor([[1, 2, 3]]))
    assert len(hiddens) == 3 and hiddens[0].shape == (3, 32) and logits.shape == (50257,)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="context"):
        block_outputs(model, torch.zeros(1, 40, dtype=torch.long))  # longer than the 32-token context
    assert not any(m._forward_hooks for m in model.modules())


def test_partial_utf8_tokens_are_shown_escaped(test_data):
    enc = encoding_from_files(*(tokenizer_dir(test_data) / n for n in ("vocab.json", "merges.txt")))
    partial = [t for t in enc.encode("鲁迅") if not _is_utf8(enc.decode_single_token_bytes(t))]
    assert partial, "expected a Chinese character split over tokens"
    shown = token_text(enc, partial[0])
    assert "\\x" in shown and "\ufffd" not in shown
    assert token_text(enc, enc.encode(" Hello")[0]) == " Hello"
    assert token_text(enc, enc.encode("\n")[0]) == "\\n"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----- behaviour on text ------------------------------------------------------------------


def test_text_figures_equal_a_separate_forward_pass(tmp_path, test_data):
    a, b = tiny_pair(tmp_path, test_data, change=lambda m: m.h[0].mlp.c_fc.weight.mul_(0.9))
    text = (test_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:150]
    path = tmp_path / "sample.txt"
    path.write_text(text, encoding="utf-8")
    result = compare(a, b, texts=[str(path)])
    enc = encoding_from_files(*(tokenizer_dir(test_data) / n for n in ("vocab.json", "merges.txt")))
    ids = enc.encode(text)
    (row,) = result["behaviour"]
    assert row["tokens"] == row["tokens_in_file"] == len(ids) and not row["capped"]
    assert row["characters"] == len(text) == count_characters(enc, ids)
    seq = torch.tensor([enc.eot_token] + ids)
    for side, source in (("a", a), ("b", b)):
        model = load_model(source)
        nats = 0.0
        with torch.no_grad():
            for start in range(0, len(ids), 32):  # windows of the 32-token context, the last one short
                end = min(start + 32, len(ids))
                _, loss = model(seq[start:end][None], seq[start + 1 : end + 1][None])
                nats += loss.item() * (end - start)
        assert result["behaviour"][0][side]["loss"] == pytest.approx(nats / len(ids), rel=1e-5)
        assert result["behaviour"][0][side]["perplexity"] == pytest.approx(math.exp(nats / len(ids)), rel=1e-5)
        assert result["behaviour"][0][side]["bits_per_char"] == pytest.approx(
            nats / (math.log(2) * len(text)), rel=1e-5
        )

    capped = compare(a, b, texts=[str(path)], max_eval_tokens=40)["behaviour"][0]
    assert capped["tokens"] == 40 and capped["capped"] and capped["characters"] == count_characters(enc, ids[:40])


# ----- output files -----------------------------------------------------------------------


def test_json_round_trips_and_is_never_overwritten_unasked(tmp_path, test_data):
    a, b = tiny_pair(tmp_path, test_data, change=lambda m: m.ln_f.bias.add_(0.1))
    text = tmp_path / "t.txt"
    text.write_text("Hello world. It is a fine day.", encoding="utf-8")
    result = compare(a, b, prompts=["Hi"], texts=[str(text)])
    out = write_json(result, tmp_path / "r.json")
    assert json.loads(out.read_text(encoding="utf-8")) == finite(result)
    assert json.loads(to_json(result))["weights"]["tensors"][-1]["name"] == "ln_f.bias"

    out.write_text("precious", encoding="utf-8")
    with pytest.raises(MiniGPT2Error, match="already exists"):
        write_json(result, out)
    assert out.read_text(encoding="utf-8") == "precious"
    write_json(result, out, force=True)
    assert json.loads(out.read_text(encoding="utf-8"))["b"]["source"] == b


def test_infinite_relative_change_is_null_in_json(tmp_path, test_data):
    def zero(model):
        model.h[0].ln_1.bias.zero_()

    a, b = tiny_pair(tmp_path, test_data, change=zero)
    result = compare(b, a)  # A has the zero tensor: ||A - B|| / ||A|| is infinite
    t = next(t for t in result["weights"]["tensors"] if t["name"] == "h.0.ln_1.bias")
    assert t["relative_change"] == math.inf
    assert json.loads(to_json(result))["weights"]["tensors"][3]["relative_change"] is None
    assert "1 tensor is all zeros in A, so the relative change is infinite (not ranked): h.0.ln_1.bias" in render(
        result
    )
    assert "inf" in render(result)  # in the per-layer and per-kind tables


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, test_data, monkeypatch):
    a, _ = tiny_pair(tmp_path, test_data)
    result = compare(a, a)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MiniGPT2Error, match="pip install matplotlib"):
        write_plot(result, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


# ----- a real fine-tuning run, end to end -------------------------------------------------

PROBE = "今天的天气"
FINETUNE_STEPS, SNAPSHOT_EVERY = 15, 5


def train(model, ids: torch.Tensor, steps: int, *, lr: float, seed: int, batch: int = 4, on_step=None):
    """A plain AdamW loop on random windows of `ids` (not minigpt2's trainer, on purpose)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    T = model.config.n_positions
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(ids) - T - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + T] for s in starts])  # (batch, T)
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step:
            on_step(step)
    model.eval()


def make_finetuned_run(test_data: Path, root: Path) -> tuple[Path, Path, Path]:
    """START: a tiny GPT-2 taught some English (Shakespeare); RUN: START fine-tuned on Chinese by
    minigpt2's own trainer, set up as train.py sets it up (so the run directory compare.py reads is
    the one the trainer writes: run.json, log.jsonl, snapshots.jsonl, step-*/, final/); and a
    held-out stretch of the same English text, the "old data" to check forgetting.

    A model this small, trained for seconds, only knows the few thousand tokens it saw, so the
    English it is evaluated on must be the same kind of English: Shakespeare it has not seen."""
    enc = encoding_from_files(*(tokenizer_dir(test_data) / n for n in ("vocab.json", "merges.txt")))
    shakespeare = (test_data / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    english = torch.tensor(enc.encode(shakespeare[:60_000]))
    held_out = root / "shakespeare-held-out.txt"
    held_out.write_text(shakespeare[-30_000:], encoding="utf-8")
    chinese = root / "红楼梦-start.txt"
    chinese.write_text((test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=32))
    train(model, english, 20, lr=1e-2, seed=1)
    start = save_model(model, root / "start", tokenizer_source=tokenizer_dir(test_data))

    options = {
        "data": [str(chinese)],
        "model": str(start),
        "steps": FINETUNE_STEPS,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 1e-2,
        "warmup": 0,
        "weight_decay": 0.0,
        "eval_every": 0,
        "eval_tokens": 64,
        "save_every": 10,
        "snapshot_every": SNAPSHOT_EVERY,
        "probe": PROBE,
        "device": "cpu",
        "cache_dir": str(root / "tokens"),
    }
    run = root / "run"
    given = TrainOptions(**options, out=str(run))
    setup = launch.setup(given, launch.SavedRun(None, None), lambda record: None, distributed.setup("cpu"))
    for _ in setup.trainer.run():
        pass
    setup.run.unlock()
    return start, run, held_out


@pytest.fixture(scope="module")
def finetuned(test_data, tmp_path_factory):
    return make_finetuned_run(test_data, tmp_path_factory.mktemp("finetune"))


@pytest.mark.slow
def test_a_finetuned_model_against_its_start(finetuned, test_data, tmp_path):
    start, run, en = finetuned
    zh = test_data / "zh" / "鲁迅小说集.txt"
    out = run_compare(
        start,
        run,
        "--prompt",
        PROBE,
        "--prompt",
        "It is a truth",
        "--text",
        zh,
        "--text",
        en,
        "--max-eval-tokens",
        "2048",
        "--top",
        "5",
        "--json",
        tmp_path / "r.json",
        "--plot",
        tmp_path / "r.png",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    chinese, english = report["behaviour"]
    assert chinese["b"]["loss"] < chinese["a"]["loss"]  # learned the new language
    assert english["b"]["loss"] > english["a"]["loss"]  # and forgot some of the old one
    assert chinese["tokens"] == english["tokens"] == 2048 and chinese["capped"]
    assert report["b"]["checkpoint"] == str(run / "final")
    for heading in (
        "== Weights: the 5 most changed",
        "== Weights per layer",
        "== Weights per module kind",
        "== Activations, prompt 1",
        "== Behaviour on text",
        "== Drift over steps",
    ):
        assert heading in out.stdout, heading
    assert out.stdout.count("\n") > 60 and "鲁迅小说集.txt" in out.stdout

    (drift,) = report["runs"]
    assert [s["step"] for s in drift["steps"]] == list(range(0, FINETUNE_STEPS + 1, SNAPSHOT_EVERY))
    first, last = drift["steps"][0], drift["steps"][-1]
    assert all(v == 0 for v in first["weight_drift"].values())
    assert last["activation_drift"]["h.1"] > 0 and drift["probe"] == PROBE
    # the last snapshot is the final checkpoint: pooled with the start's norms, the drift per layer
    # is the per-layer figure of the weights table
    assert drift["pooled"]
    for layer in report["weights"]["layers"]:
        assert last["weight_drift"][layer["layer"]] == pytest.approx(layer["relative_change"], rel=1e-4)
    snap = RunDir(run).read_snapshots()[-1]["weights"]
    h0 = [v for k, v in snap.items() if k.startswith("h.0.")]
    assert run_drift(RunDir(run).read_snapshots())["steps"][-1]["weight_drift"]["h.0"] == pytest.approx(
        sum(h0) / len(h0)
    )
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_run_alone_compares_its_start_and_end(finetuned):
    start, run, _ = finetuned
    result = compare(str(run))
    assert result["a"]["checkpoint"] == str(start) and result["b"]["checkpoint"] == str(run / "final")
    assert result["runs"][0]["side"] == "B"
    top = max(result["weights"]["tensors"], key=lambda t: t["relative_change"])
    assert top["relative_change"] > 0.01


def test_a_snapshot_line_cut_short_is_skipped(tmp_path):
    (tmp_path / "snapshots.jsonl").write_text('{"step": 0, "weights": {}}\n{"step": 5, "wei', encoding="utf-8")
    assert [s["step"] for s in RunDir(tmp_path).read_snapshots()] == [0]  # a crash mid-write loses one line


# ----- bad input, as a user meets it -----------------------------------------------------


@pytest.mark.slow
def test_bad_inputs_give_one_clear_message(tmp_path, test_data):
    from safetensors.torch import load_file, save_file

    a, b = tiny_pair(tmp_path, test_data)
    other = save_model(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=32)), tmp_path / "other")
    assert_clean_error(run_compare(a, other), "different architectures", "layers 3 vs 2", "width 32 vs 64")

    tensors = load_file(str(Path(b) / "model.safetensors"))
    del tensors["transformer.h.1.attn.c_attn.weight"]
    (tmp_path / "missing").mkdir()
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"))
    shutil.copy(Path(b) / "config.json", tmp_path / "missing")
    assert_clean_error(run_compare(a, tmp_path / "missing"), "B: ", "missing tensors: h.1.attn.c_attn.weight")

    assert_clean_error(run_compare(a, b, "--text", tmp_path / "nope.txt"), "cannot read text file", "nope.txt")

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("abcé".encode("latin-1"))
    assert_clean_error(run_compare(a, b, "--text", latin1), "latin1.txt", "not valid UTF-8", "at offset 3")

    (tmp_path / "exists.json").write_text("{}")
    assert_clean_error(run_compare(a, b, "--json", tmp_path / "exists.json"), "already exists", "--force")
    assert (tmp_path / "exists.json").read_text() == "{}"


# ----- the plot ---------------------------------------------------------------------------


def png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk: width, then height


def test_the_plot_shows_what_it_cost_and_leaves_no_panel_empty(tmp_path, test_data):
    from matplotlib.figure import Figure

    from minigpt2.analysis.report import _step_axis, cjk_font, cost_bars, missing_font_note

    a, b = tiny_pair(tmp_path, test_data, change=lambda m: m.ln_f.bias.add_(0.1))
    text = tmp_path / "鲁迅.txt"
    text.write_text("我翻开历史一查，这历史没有年代。" * 10, encoding="utf-8")
    weights_only = compare(a, b)
    write_plot(weights_only, tmp_path / "w.png")
    assert png_height(tmp_path / "w.png") == 500  # the heatmap alone: no "no --prompt given" quarter
    with_text = compare(a, b, texts=[str(text)], layers=False)  # the transplants and lens add a row: below
    cost = cost_bars(with_text)
    assert cost["names"] == ["鲁迅.txt"] and list(cost["bars"]) == ["A", "B"]
    assert cost["bars"]["B"] == [with_text["behaviour"][0]["b"]["bits_per_char"]]
    write_plot(with_text, tmp_path / "t.png")
    assert png_height(tmp_path / "t.png") == 500  # heatmap and what it cost, side by side
    write_plot(compare(a, b, texts=[str(text)]), tmp_path / "l.png")
    assert png_height(tmp_path / "l.png") == 1000  # then the text's transplant shares and logit lens

    # Without --text, a run's own eval sets say what it cost: its first and last evaluation.
    evals = {"val": [{"step": 0, "bpc": 12.0}, {"step": 1, "bpc": 11.0}], "鲁迅": [{"step": 0, "bpc": 9.0}]}
    curves = {"train": [{"step": 1, "tokens": 64, "loss": 10.0}], "eval": evals}
    with_run = weights_only | {"runs": [{"side": "B", "path": "run", "steps": [], "layers": [], "curves": curves}]}
    cost = cost_bars(with_run)
    assert cost["title"] == "run B: bits per character on its eval sets (lower is better)"
    assert cost["names"] == ["val", "鲁迅"] and list(cost["bars"]) == ["step 0", "step 1"]
    assert cost["bars"]["step 0"] == [12.0, 9.0] and cost["bars"]["step 1"][0] == 11.0
    assert math.isnan(cost["bars"]["step 1"][1])  # 鲁迅 was not evaluated at step 1
    write_plot(with_run, tmp_path / "r.png")
    assert png_height(tmp_path / "r.png") == 1000  # curves, then heatmap and cost

    ax = Figure().add_subplot()  # a run stopped after one step: a step either side, not -0.045..0.045
    ax.plot([1], [11.0])
    _step_axis(ax, [1])
    assert ax.get_xlim() == (0, 2)

    assert missing_font_note(with_run, None) and "fonts-noto-cjk" in missing_font_note(with_run, None)
    drawn = "the plot draws its Chinese names with the font 'Noto Sans CJK SC'"  # said on stderr either way
    assert missing_font_note(with_run, "Noto Sans CJK SC") == drawn
    assert missing_font_note(weights_only, None) is None  # nothing Chinese to draw
    if cjk_font() is not None:  # found by name or by a glyph of 中
        from matplotlib import font_manager

        assert cjk_font() in {f.name for f in font_manager.fontManager.ttflist}


def test_progress_says_what_and_how_far_without_noise():
    """compare.py's phases on a log (not a terminal): a line once a phase has run `after` seconds,
    printed by a timer even while the phase is silent, then one every `every` seconds with an
    estimate; a quick phase, or one ended by an error, prints nothing."""
    import io
    import time

    from minigpt2.console import PhaseProgress

    err = io.StringIO()
    progress = PhaseProgress(io.StringIO(), err, after=0.05, every=0.05)
    progress("scoring A on luxun.txt", 0, 4, "passes")
    time.sleep(0.5)
    assert err.getvalue() == "progress: scoring A on luxun.txt: 0/4 passes (0m00s so far)\n"
    progress("scoring A on luxun.txt", 2, 4, "passes")
    last = err.getvalue().splitlines()[-1]
    assert last == "progress: scoring A on luxun.txt: 2/4 passes (0m00s so far, about 0m00s left)"
    lines = len(err.getvalue().splitlines())
    progress("loading B", 0, 1)
    progress.finish()  # done (or failed) before `after`: no line, and the timer is cancelled
    time.sleep(0.3)
    assert len(err.getvalue().splitlines()) == lines


def test_revision_is_refused_only_where_no_model_comes_from_the_hub(tmp_path):
    from minigpt2.analysis.compare import check_revision_applies

    local = tmp_path / "ck"
    local.mkdir()
    hub_run, local_run = tmp_path / "hub-run", tmp_path / "local-run"
    for run, start in ((hub_run, "gpt2"), (local_run, str(local))):
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"model": start}))
    check_revision_applies(["gpt2", str(local)], "v2")  # A from the hub: it applies
    check_revision_applies([str(hub_run)], "v2")  # a run that started from the hub
    check_revision_applies([str(local), str(local)], None)
    for sources in ([str(local), str(local)], [str(local_run)], [str(local), str(local_run)]):
        with pytest.raises(MiniGPT2Error, match="drop --revision"):
            check_revision_applies(sources, "v2")
