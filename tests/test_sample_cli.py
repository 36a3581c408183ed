"""`python sample.py` as a user runs it (tests/clis.py: its main(argv), or a process of its own where
the test needs one), no network."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import write_official_layout
from clis import assert_clean_error, offline_env, run_script

from minigpt2 import load_model, load_tokenizer
from minigpt2.generation.generate import Sampling
from minigpt2.generation.sampling import generate_text


def run_sample(*args, hf_home, timeout=120, env=None):
    return run_script("sample.py", *args, env=offline_env(hf_home, **(env or {})), timeout=timeout)


def test_sample_from_the_hub_cache(hub_gpt2, hf_home):
    result = run_sample(
        "今天的天气", "--model", "gpt2", "--greedy", "--max-new-tokens", "12", "--device", "cpu", hf_home=hf_home
    )
    assert result.returncode == 0, result.stderr
    # the same continuation as the library computes in-process
    expected = generate_text(load_model("gpt2"), load_tokenizer("gpt2"), ["今天的天气"], 12, Sampling(greedy=True))[0]
    lines = result.stdout.splitlines()
    assert lines[0] == "=== gpt2 · prompt 1 ==="
    assert "\n".join(lines[1:-1]) == "今天的天气" + expected.text
    assert re.fullmatch(r"\[12 tokens · [\d.]+ tok/s · CJK \d+% · length\]", lines[-1])


@pytest.mark.skipif(not Path("/proc/stat").is_file() or (os.cpu_count() or 1) < 2, reason="Linux, 2 cores or more")
def test_a_busy_machine_decodes_with_fewer_threads_and_says_so(hub_gpt2, hf_home):
    """Other processes holding every core while sample.py loads its model: it decodes with one
    thread (fewer threads wait less for busy cores: docs/speed.md) and says why, once."""
    spin = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(min(os.cpu_count(), 8))]
    try:
        time.sleep(0.3)  # they are spinning
        result = run_sample("hi", "--model", "gpt2", "--max-new-tokens", "2", "--seed", "0", hf_home=hf_home)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert result.returncode == 0, result.stderr
    busy = [line for line in result.stderr.splitlines() if line.startswith("the machine is busy")]
    assert len(busy) == 1 and "decoding with 1 thread, as fewer threads wait less" in busy[0], result.stderr
    assert re.search(rf"other work keeps [\d.]+ of {os.cpu_count()} cores busy", busy[0]), busy[0]


@pytest.mark.slow
def test_json_records_for_several_prompts_samples_and_models(hub_gpt2, hf_home, tmp_path):
    local = write_official_layout(hub_gpt2, tmp_path / "local")
    result = run_sample(
        "今天的天气",
        "Hello",
        "--model",
        "gpt2",
        "--model",
        str(local),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
        "--json",
        hf_home=hf_home,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    order = [(r["prompt"], r["model"], r["sample"]) for r in records]
    assert order == [(p, m, i) for p in ("今天的天气", "Hello") for m in ("gpt2", str(local)) for i in (0, 1)]
    for r in records:
        assert r["tokens"] == 8 and r["finish_reason"] == "length" and 0 <= r["cjk_share"] <= 1
        assert "\ufffd" not in r["text"]
    # the same weights and seed under two names give the same samples: base and fine-tuned line up
    assert records[0]["text"] == records[2]["text"] and records[1]["text"] == records[3]["text"]


@pytest.mark.slow
def test_sampling_with_a_seed_is_reproducible(hub_gpt2, hf_home):
    runs = [run_sample("Hello", "--seed", "3", "--max-new-tokens", "15", hf_home=hf_home) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout.split("[")[0] == runs[1].stdout.split("[")[0]
    other = run_sample("Hello", "--seed", "4", "--max-new-tokens", "15", hf_home=hf_home)
    assert other.stdout.split("[")[0] != runs[0].stdout.split("[")[0]


@pytest.mark.slow
def test_cache_and_no_cache_agree_past_the_context(hub_gpt2, hf_home):
    args = ["", "--greedy", "--max-new-tokens", "200", "--json"]  # context 128: the window slides twice
    cached, uncached = run_sample(*args, hf_home=hf_home), run_sample(*args, "--no-cache", hf_home=hf_home)
    assert cached.returncode == 0, cached.stderr
    a, b = json.loads(cached.stdout), json.loads(uncached.stdout)
    assert a["text"] == b["text"] and a["tokens"] == 200


@pytest.mark.slow
def test_long_prompt_keeps_its_end(hub_gpt2, hf_home, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("天" * 200, encoding="utf-8")  # 200+ tokens, context 128
    result = run_sample("--prompt-file", str(prompt), "--max-new-tokens", "5", hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    assert "longer than the 128-token context; using its end" in result.stderr


def test_offline_with_an_empty_cache(tmp_path):
    result = run_sample("今天的天气", hf_home=tmp_path / "empty-hf-home")
    assert_clean_error(
        result, "openai-community/gpt2", "HF_HUB_OFFLINE=1", "not in the Hugging Face cache", alone=False
    )


def test_unknown_model_name(tmp_path):
    assert_clean_error(
        run_sample("hi", "--model", "gpt5", hf_home=tmp_path), "model 'gpt5' not found", "gpt2-medium", alone=False
    )


def test_bad_checkpoints(tmp_path, hub_gpt2):
    from safetensors.torch import load_file, save_file

    good = write_official_layout(hub_gpt2, tmp_path / "good")
    weights = (good / "model.safetensors").read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights[: len(weights) // 3])
    assert_clean_error(
        run_sample("hi", "--model", str(truncated), hf_home=tmp_path), "truncated or corrupted", alone=False
    )

    tensors = load_file(str(good / "model.safetensors"))
    del tensors["h.1.attn.c_attn.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    assert_clean_error(
        run_sample("hi", "--model", str(tmp_path / "missing.safetensors"), hf_home=tmp_path),
        "missing tensors: h.1.attn.c_attn.weight",
        alone=False,
    )


def test_prompt_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("今天的天气".encode()[:6] + "天气".encode("gbk"))
    result = run_sample("--prompt-file", str(bad), hf_home=tmp_path)
    assert_clean_error(result, str(bad), "not valid UTF-8", "at offset 6", alone=False)
    missing = run_sample("--prompt-file", str(tmp_path / "nope.txt"), hf_home=tmp_path)
    assert_clean_error(missing, "nope.txt", alone=False)


@pytest.mark.slow
def test_compile_without_a_compiler(hub_gpt2, hf_home, tmp_path):
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = run_sample("hi", "--compile", "--device", "cpu", "--max-new-tokens", "3", hf_home=hf_home, env=env)
    assert_clean_error(
        result,
        "torch.compile could not compile the decode step",
        "no-such-g++",
        "without compiling (--compile off)",
        alone=False,
    )


def test_no_prompt_at_all(tmp_path):
    assert_clean_error(run_sample(hf_home=tmp_path), "no prompt given", alone=False)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "-0.5"], "temperature must be 0 or more"),
        (["--top-k", "-3"], "top-k must be 0"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
        (["--num-samples", "0"], "--num-samples"),
        (["--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
    ],
)
def test_bad_options(tmp_path, args, needle):
    result = run_sample("hi", *args, hf_home=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr and needle in result.stderr, result.stderr
