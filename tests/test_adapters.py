"""A LoRA run's adapter folder is a model to the project's tools: sample.py and compare.py take it
(its base with the adapter applied and merged), also once the run is moved, and a lone adapter
copied elsewhere whose base is a hub model. Real runs of train.py in the tests' fake hub."""

import json
import shutil

import pytest
import torch
from clis import assert_clean_error, run_script

from minigpt2.io.adapter import adapter_base
from minigpt2.io.weights import load_model

NEW = 30


def train(*args):
    result = run_script("train.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def sample(model, *extra):
    result = run_script("sample.py", "他走进屋里", "--model", model, "--greedy", "--max-new-tokens", 8, "--json",
                        "--device", "cpu", *extra, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["text"] for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def zh(test_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter-zh") / "zh.txt"
    path.write_text((test_data / "zh" / "西游记.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hub_lora_run(hub_gpt2, zh, tmp_path_factory):
    """A LoRA run on the hub's gpt2 (its base a hub name)."""
    run = tmp_path_factory.mktemp("hub-lora") / "run"
    train("--data", zh, "--model", "gpt2", "--lora", 2, "--lr", 1e-2, "--seq-len", 32, "--batch-size", 2,
          "--steps", 2, "--eval-every", 0, "--val-fraction", 0, "--device", "cpu", "--out", run)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def grown_lora_run(test_data, zh, tmp_path_factory):
    """A LoRA run on a grown vocabulary: its base is the run's own grown-base/."""
    run = tmp_path_factory.mktemp("grown-lora") / "run"
    train("--data", zh, "--init-preset", "gpt2", "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--context", 32,
          "--tokenizer", test_data / "gpt2", "--extend-vocab", NEW, "--lora", 2, "--lr", 1e-2, "--batch-size", 2,
          "--steps", 2, "--eval-every", 0, "--val-fraction", 0, "--device", "cpu", "--out", run)  # fmt: skip
    return run


def test_a_base_inside_the_run_is_stored_relative_and_the_adapter_is_the_merged_model(grown_lora_run):
    adapter = grown_lora_run / "final" / "adapter"
    stored = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == "../../grown-base", stored
    assert adapter_base(adapter)[0] == str(adapter / "../../grown-base")
    idx = torch.tensor([[1, 2, 3, 50257, 50257 + NEW - 1]])
    with torch.no_grad():
        ours, merged = load_model(adapter)(idx), load_model(grown_lora_run / "final")(idx)
    assert ours.shape[-1] == 50257 + NEW
    assert (ours - merged).abs().max() <= 1e-5


def test_sample_takes_the_adapter_folder_also_in_a_moved_run(grown_lora_run, tmp_path):
    adapter = grown_lora_run / "final" / "adapter"
    expected = sample(grown_lora_run / "final")
    assert sample(adapter) == expected
    moved = tmp_path / "moved"
    shutil.copytree(grown_lora_run, moved)
    (moved / "final" / "model.safetensors").unlink()  # the adapter alone, applied to the moved grown-base/
    assert sample(moved / "final" / "adapter") == expected


def test_a_lone_adapter_of_a_hub_model_samples_and_compares(hub_lora_run, tmp_path):
    adapter = hub_lora_run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "gpt2"
    lone = tmp_path / "lone-adapter"
    shutil.copytree(adapter, lone)
    assert sample(lone) == sample(hub_lora_run / "final")
    compared = run_script("compare.py", "gpt2", adapter, "--device", "cpu", timeout=300)
    assert compared.returncode == 0, compared.stderr
    assert "c_attn" in compared.stdout and "LoRA (r=2," in compared.stdout, compared.stdout
    # a lone adapter has no merged file for the per-tensor comparison: the error says what to do
    result = run_script("compare.py", "gpt2", lone, "--device", "cpu", timeout=300)
    assert_clean_error(result, f"'{lone}' is a LoRA adapter of 'gpt2' with no merged model beside it", "save_model")
