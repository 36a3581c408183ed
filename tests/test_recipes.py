"""The levers combined: LoRA on a grown vocabulary (the new rows train, every old row stays frozen,
PEFT reads the adapter), the new rows' own learning rate and warm-up phase, and the refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from clis import run_script
from safetensors.torch import load_file

from minigpt2 import MiniGPT2Error
from minigpt2.io.adapter import adapter_base
from minigpt2.io.tokenizer import encoding_from_files, load_tokenizer
from minigpt2.io.weights import load_model
from minigpt2.model.lora import (
    LEGACY_STATE_PREFIX,
    PEFT_PREFIX,
    TARGETS,
    adapter_state,
    add_trainable_tokens,
    apply_lora,
    load_adapter_state,
    merged_state_dict,
    trainable_tokens,
)
from minigpt2.training.rundir import STATE_TENSORS
from minigpt2.training.setup_run import start_model
from minigpt2.training.vocab import grow_model

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32}
NEW = 40  # new tokens learned in these runs


@pytest.fixture(scope="module")
def zh_text(test_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("zh") / "zh.txt"
    path.write_text((test_data / "zh" / "西游记.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


def tiny_args(test_data, text, cache):
    return ["--data", text, "--init-preset", "gpt2", "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--context", 32,
            "--tokenizer", test_data / "gpt2", "--extend-vocab", NEW, "--batch-size", 2, "--steps", 4,
            "--save-every", 2, "--eval-every", 0, "--val-fraction", 0, "--keep-last", 0, "--dropout", 0.1,
            "--cache-dir", cache, "--device", "cpu"]  # fmt: skip


def train(*args) -> str:
    result = run_script("train.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def same_files(a, b, name="model.safetensors") -> bool:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_twice(args, tmp_path):
    """The run in one go ("full"), and again stopped at step 2 and resumed ("split")."""
    train(*args, "--out", tmp_path / "full")
    train(*args, "--out", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "final")  # as if it had stopped at step 2
    resumed = train("--out", tmp_path / "split", "--resume")
    assert "resuming at step 2 of 4" in resumed
    return tmp_path / "full"


@pytest.fixture(scope="module")
def lora_grown(test_data, zh_text, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-grown")
    args = tiny_args(test_data, zh_text, tmp / "cache")
    args += ["--lora", 2, "--lora-alpha", 4, "--lora-dropout", 0.1, "--lr", 1e-2, "--new-token-lr", 3e-2]
    return run_twice(args, tmp), tmp


@pytest.mark.slow
def test_lora_on_a_grown_vocabulary_trains_the_new_rows_and_freezes_every_old_one(lora_grown):
    run, tmp = lora_grown
    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    base_dir = run / "grown-base"
    assert config["base_model_name_or_path"] == "../../grown-base"  # relative: the run can move
    assert Path(adapter_base(run / "final" / "adapter")[0]).resolve() == base_dir.resolve()
    assert config["trainable_token_indices"] == list(range(50257, 50257 + NEW))
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(run / "final" / "model.safetensors"))
    wte = "transformer.wte.weight"
    assert base[wte].shape == merged[wte].shape == (50257 + NEW, 32)
    assert torch.equal(merged[wte][:50257], base[wte][:50257])  # old rows: bit-identical
    assert (merged[wte][50257:] - base[wte][50257:]).abs().amax(dim=1).min() > 0  # every new row moved
    adapted = [f"transformer.h.0.{t}.weight" for t in TARGETS]  # every target by default
    assert all(not torch.equal(merged[k], base[k]) for k in adapted)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in adapted and k != wte)
    adapter = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    rows = adapter[PEFT_PREFIX + "wte.token_adapter.trainable_tokens_delta"]
    assert torch.equal(rows, merged[wte][50257:])
    # The trainer state: the same adapter tensors under the same names, and moments for them alone.
    state = load_file(str(run / "final" / STATE_TENSORS))
    assert {k for k in state if k.startswith(PEFT_PREFIX)} == set(adapter)
    moments = {k.rsplit(".", 1)[0].removeprefix("optimizer.") for k in state if k.startswith("optimizer.")}
    assert {PEFT_PREFIX + m for m in moments} == set(adapter)


@pytest.mark.slow
def test_peft_on_the_grown_base_computes_the_merged_model(lora_grown):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    run, _ = lora_grown
    final = run / "final"
    enc = load_tokenizer(final)
    ids = enc.encode_ordinary("却说那悟空与八戒行者道：师父")[:28] + [50257, 50258, 50257 + NEW - 1]
    idx = torch.tensor([ids])
    assert idx.max() >= 50257
    with torch.no_grad():
        merged = GPT2LMHeadModel.from_pretrained(final).eval()(idx).logits
        ours = load_model(final).eval()(idx)
        base = GPT2LMHeadModel.from_pretrained(adapter_base(final / "adapter")[0])
        peft = PeftModel.from_pretrained(base, final / "adapter").eval()(idx).logits
        plain = GPT2LMHeadModel.from_pretrained(adapter_base(final / "adapter")[0]).eval()(idx).logits
    assert merged.shape[-1] == 50257 + NEW
    assert (peft - merged).abs().max() <= 1e-4
    assert (ours - merged).abs().max() <= 1e-4
    assert (plain - merged)[..., 50257:].abs().max() > 100 * (peft - merged).abs().max()  # the new rows count


@pytest.mark.slow
def test_lora_on_a_grown_vocabulary_resumes_bit_for_bit(lora_grown):
    _, tmp = lora_grown
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert same_files(tmp / "full" / "final", tmp / "split" / "final", name), name


@pytest.mark.slow
def test_embed_warmup_trains_the_new_rows_alone_first_and_resumes_bit_for_bit(test_data, zh_text, tmp_path):
    args = tiny_args(test_data, zh_text, tmp_path / "cache") + ["--embed-warmup", 3, "--new-token-lr", 1e-2]
    run = run_twice(args, tmp_path)
    assert same_files(tmp_path / "full" / "final", tmp_path / "split" / "final")
    # The start: the seeded preset, grown with the run's tokenizer, as the run built it.
    enc = encoding_from_files(test_data / "gpt2" / "vocab.json", test_data / "gpt2" / "merges.txt")
    new_enc = load_tokenizer(run / "tokenizer")
    start = grow_model(start_model(None, "gpt2", TINY, seed=0, dropout=0.1), enc, new_enc).state_dict()
    during, after = load_model(run / "step-000002").state_dict(), load_model(run / "final").state_dict()
    assert torch.equal(during["wte.weight"][:50257], start["wte.weight"][:50257])
    assert not torch.equal(during["wte.weight"][50257:], start["wte.weight"][50257:])
    body = [k for k in start if k not in ("wte.weight", "lm_head.weight") and not k.endswith(".attn.bias")]
    assert all(torch.equal(during[k], start[k]) for k in body)  # phase 1: the new rows alone
    assert not torch.equal(after["wte.weight"][:50257], start["wte.weight"][:50257])  # phase 2: everything
    assert sum(not torch.equal(after[k], start[k]) for k in body) == len(body)
    lrs = [r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
    # the rate of what trains: the new rows' in phase 1 (it showed the frozen body's 0.0), then the body's
    assert all(0 < lr <= 1e-2 for lr in lrs[:3]) and 0 < lrs[3] <= 3e-4, lrs


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--new-token-lr", "1e-3"],
            "error: --new-token-lr only applies to the new tokens of a grown vocabulary: give --extend-vocab N too",
        ),  # fmt: skip
        (["--embed-warmup", "2"], "error: --embed-warmup only applies to the new tokens"),
        (["--extend-vocab", "20", "--embed-warmup", "4"], "error: --embed-warmup must be fewer than the 4 steps"),
    ],
)
@pytest.mark.slow
def test_new_row_options_are_refused_where_they_cannot_work(test_data, zh_text, tmp_path, extra, message):
    args = ["--data", zh_text, "--init-preset", "gpt2", "--n-layer", 1, "--n-head", 2, "--n-embd", 32,
            "--context", 32, "--tokenizer", test_data / "gpt2", "--steps", 4, "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "run", *extra]  # fmt: skip
    result = run_script("train.py", *args, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_set_dropout_leaves_the_lora_dropout_alone():
    model = apply_lora(start_model(None, "gpt2", TINY), 2, dropout=0.1)
    model.set_dropout(0.3)
    assert model.drop.p == 0.3 and model.config.dropout == 0.3
    lora = [m.dropout for n, m in model.named_modules() if n.endswith(".attn.c_attn")]
    assert lora == [0.1]


def test_trainable_tokens_merge_to_the_plain_layout_and_load_from_old_state_names():
    model = start_model(None, "gpt2", TINY)
    apply_lora(model, 2)
    add_trainable_tokens(model, range(50250, 50257))
    with pytest.raises(MiniGPT2Error, match="already has trainable tokens"):
        add_trainable_tokens(model, range(3))
    rows = trainable_tokens(model).token_adapter.trainable_tokens_delta
    with torch.no_grad():
        rows.add_(1.0)
    merged = merged_state_dict(model)
    assert list(merged) == list(start_model(None, "gpt2", TINY).state_dict())
    assert merged["wte.weight"] is merged["lm_head.weight"]
    assert torch.equal(merged["wte.weight"][50250:], rows) and torch.equal(
        merged["wte.weight"][:50250], model.wte.base.weight[:50250]
    )
    logits = model(torch.tensor([[1, 50251, 50256]]))
    plain = start_model(None, "gpt2", TINY)
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits, plain(torch.tensor([[1, 50251, 50256]])), rtol=0, atol=1e-5)
    # a trainer state written before one name was used: the adapters under "lora.<name>"
    legacy = {LEGACY_STATE_PREFIX + k.removeprefix(PEFT_PREFIX): v + 1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, {**legacy, "rng.torch_cpu": torch.zeros(3)})
    assert all(torch.equal(v, legacy[LEGACY_STATE_PREFIX + k.removeprefix(PEFT_PREFIX)]) for k, v in
               adapter_state(model).items())  # fmt: skip


@pytest.mark.slow
def test_the_recipes_benchmark_runs_in_quick_mode_and_resumes_per_recipe_and_budget(tmp_path):
    """benchmarks/bench_recipes.py --quick: a tiny base, the five recipes at one CPU budget, the
    table, compare.py's several-models table and plot, and the verdict line. Run again with one
    more budget, it trains only what is new (each recipe resumes its run)."""
    bench = ["benchmarks/bench_recipes.py", "--quick", "--dir", tmp_path, "--budgets", 0.5]
    result = run_script(*bench, timeout=900)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[1:2] == ["0.5"]}
    assert set(rows) == {"full", "full+vocab", "vocab-phase", "lora", "lora+vocab"}
    assert float(rows["lora"][-1]) < float(rows["full"][-1]) / 10  # trainer state: adapters only
    assert (tmp_path / "tradeoff-0.5.png").stat().st_size > 10_000
    assert lines[-1].startswith("on held-out Chinese: full+vocab ") and "(budgets 0.5 CPU-s)" in lines[-1]
    first = json.loads((tmp_path / "results" / "lora+vocab@0.5.json").read_text())
    assert first["cpu_s"] >= 0.5 and first["step"] >= 1
    log = (tmp_path / "runs" / "lora" / "log.jsonl").read_text()
    again = run_script(*bench, 1.0, "--recipes", "lora", timeout=900)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "results" / "lora+vocab@0.5.json").read_text()) == first  # kept, not rerun
    later = json.loads((tmp_path / "results" / "lora@1.json").read_text())
    assert later["cpu_s"] >= 1.0 and (tmp_path / "runs" / "lora" / "log.jsonl").read_text().startswith(log)
