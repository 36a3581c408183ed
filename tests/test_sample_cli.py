"""`python sample.py` as a user runs it: a subprocess, a fresh environment, no network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import write_official_layout

from minigpt2 import generate, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_sample(*args, hf_home, timeout=120):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=ROOT, timeout=timeout)


def test_sample_from_the_hub_cache(hub_gpt2, hf_home):
    result = run_sample("今天的天气", "--model", "gpt2", "--greedy", "--max-new-tokens", "12", "--device", "cpu",
                        hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    # the same continuation as the library computes in-process
    enc = load_tokenizer("gpt2")
    prompt = enc.encode("今天的天气")
    out = generate(load_model("gpt2"), torch.tensor([prompt]), 12, greedy=True)[0, len(prompt):].tolist()
    assert result.stdout == "今天的天气" + enc.decode(out, errors="replace") + "\n"


def test_sampling_with_a_seed_is_reproducible(hub_gpt2, hf_home):
    runs = [run_sample("Hello", "--seed", "3", "--max-new-tokens", "15", hf_home=hf_home) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("Hello")
    other = run_sample("Hello", "--seed", "4", "--max-new-tokens", "15", hf_home=hf_home)
    assert other.stdout != runs[0].stdout


def test_generation_continues_past_the_context(hub_gpt2, hf_home):
    result = run_sample("", "--model", "gpt2", "--max-new-tokens", "300", "--seed", "0", hf_home=hf_home)  # context 128
    assert result.returncode == 0, result.stderr


def assert_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error:") or "error:" in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_offline_with_an_empty_cache(tmp_path):
    result = run_sample("今天的天气", hf_home=tmp_path / "empty-hf-home")
    assert_clean_error(result, "openai-community/gpt2", "HF_HUB_OFFLINE=1", "not in the Hugging Face cache")


def test_unknown_model_name(tmp_path):
    assert_clean_error(run_sample("hi", "--model", "gpt5", hf_home=tmp_path), "model 'gpt5' not found", "gpt2-medium")


def test_bad_checkpoints(tmp_path, hub_gpt2):
    from safetensors.torch import load_file, save_file

    good = write_official_layout(hub_gpt2, tmp_path / "good")
    weights = (good / "model.safetensors").read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights[: len(weights) // 3])
    assert_clean_error(run_sample("hi", "--model", str(truncated), hf_home=tmp_path), "truncated or corrupted")

    tensors = load_file(str(good / "model.safetensors"))
    del tensors["h.1.attn.c_attn.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    assert_clean_error(run_sample("hi", "--model", str(tmp_path / "missing.safetensors"), hf_home=tmp_path),
                       "missing tensors: h.1.attn.c_attn.weight")


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-k", "-3"], "--top-k"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
])
def test_bad_options(tmp_path, args, needle):
    result = run_sample("hi", *args, hf_home=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr and needle in result.stderr, result.stderr
