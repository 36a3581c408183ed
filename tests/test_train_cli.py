"""`python train.py` as a user runs it (tests/clis.py: its main(argv), or a process of its own where a
test signals it), offline, with the shared texts."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from clis import assert_clean_error, offline_env, run_script, start_script

from minigpt2 import load_model
from minigpt2.device import auto_dtype

pytestmark = pytest.mark.slow  # whole training runs of train.py

TINY = ["--init-preset", "gpt2", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--context", "64"]


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def env_for(hf_home, token_cache):
    return offline_env(hf_home, MINIGPT2_CACHE=str(token_cache))


def run_train(*args, hf_home, token_cache, timeout=240):
    return run_script("train.py", *args, env=env_for(hf_home, token_cache), timeout=timeout)


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("天气很好\n".encode() + b"caf\xe9\n")
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "notes.md").write_text("hi")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "run.json").write_text("{}")
    (tmp_path / "ok.txt").write_text("天气很好。" * 100)
    return {
        "missing": (["--data", tmp_path / "nope.txt"], ["nope.txt' does not exist"]),
        "empty": (["--data", tmp_path / "empty.txt"], ["empty.txt' is empty"]),
        "binary": (["--data", tmp_path / "image.txt"], ["image.txt' looks like a binary file"]),
        "not utf-8": (
            ["--data", tmp_path / "latin1.txt"],
            ["latin1.txt' is not valid UTF-8: byte 0xe9 at offset 16", "--encoding-errors replace"],
        ),
        "no .txt": (["--data", tmp_path / "no-text"], ["no-text' holds no .txt files"]),
        "no match": (["--data", tmp_path / "*.csv"], ["matches no files"]),
        "bad eval data": (
            ["--data", tmp_path / "ok.txt", "--eval-data", tmp_path / "gone.txt"],
            ["gone.txt' does not exist"],
        ),
        "existing out": (
            ["--data", tmp_path / "ok.txt", "--out", tmp_path / "used"],
            ["already holds a run", "continue it with --resume"],
        ),
        "resume nothing": (["--out", tmp_path / "fresh", "--resume"], ["nothing to resume", "no run.json"]),
        "bad regex": (["--data", tmp_path / "ok.txt", "--drop-lines", "(("], ["not a valid regular expression"]),
    }


def test_every_bad_input_fails_before_any_model_is_loaded(tmp_path, token_cache):
    # --model gpt2 with an empty, offline Hugging Face cache: had the model (or its tokenizer) been
    # loaded first, the error would be about the cache instead. The cases run side by side.
    procs, cases = {}, bad_inputs(tmp_path)
    for case, (args, _needles) in cases.items():
        if "--out" not in args:
            args = [*args, "--out", tmp_path / f"run-{case}"]
        procs[case] = start_script(
            "train.py", *args, "--model", "gpt2", env=env_for(tmp_path / "empty-hf", token_cache)
        )
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert_clean_error(result, *cases[case][1])
        assert not (tmp_path / f"run-{case}").exists(), case


def test_fine_tune_evaluate_snapshot_save_resume(hub_gpt2, hf_home, test_data, tmp_path, token_cache):
    run = tmp_path / "run"
    (tmp_path / "latin1.txt").write_bytes("天气很好。\n".encode() * 50 + b"caf\xe9\n")
    args = [
        "--data",
        test_data / "zh" / "西游记.txt",
        tmp_path / "latin1.txt",
        "--encoding-errors",
        "replace",
        "--eval-data",
        test_data / "en" / "sherlock_holmes.txt",
        "--model",
        "gpt2",
        "--out",
        run,
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--snapshot-every",
        "3",
        "--eval-tokens",
        "256",
        "--log-every",
        "2",
        "--device",
        "cpu",
    ]
    result = run_train(*args, "--steps", "6", hf_home=hf_home, token_cache=token_cache)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tokens per character" in out and "train loss" in out and "tokens/s" in out
    assert "eval step     3 | val: loss" in out and "sherlock_holmes: loss" in out and "bpc" in out
    assert "progress: step 6/6 (100%)" in result.stderr  # not a TTY: plain progress lines
    assert "evaluating val, batch 1 of " in result.stderr and "left in this evaluation" in result.stderr
    assert f"precision: float32 (--dtype auto: {auto_dtype(torch.device('cpu'), True)[1]})" in out or (
        auto_dtype(torch.device("cpu"), True)[0] == torch.bfloat16 and "precision: bfloat16 (--dtype auto: " in out
    )
    assert "estimated time left: " in out and ", at the speed so far" in out

    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["model"] == "gpt2" and info["config"]["n_positions"] == 128 and info["args"]["steps"] == 6
    records = log(run)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {r["set"] for r in records if r["type"] == "eval"} == {"val", "sherlock_holmes"}
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(("json", "jsonl"))) == [
        ".lock",
        "final",
        "step-000003",
    ]
    snaps = [json.loads(line) for line in (run / "snapshots.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["step"] for s in snaps] == [0, 3, 6] and "h.1.mlp.c_proj.weight" in snaps[-1]["weights"]
    final = load_model(run / "final")
    assert (run / "final" / "vocab.json").is_file()

    # An unchanged corpus is found in the cache; a finished run resumes only to a larger step count.
    again = run_train(*args, "--steps", "6", "--resume", hf_home=hf_home, token_cache=token_cache)
    assert_clean_error(again, "already reached step 6")
    more = run_train("--out", run, "--resume", "--steps", "8", hf_home=hf_home, token_cache=token_cache)
    assert more.returncode == 0, more.stderr
    assert "from the cache" in more.stdout and "resuming at step 6 of 8" in more.stdout
    assert [r["step"] for r in log(run) if r["type"] == "train"] == list(range(1, 9))
    assert load_model(run / "final").state_dict()["h.0.attn.c_attn.weight"].ne(final.h[0].attn.c_attn.weight).any()
    changed = run_train(
        "--out", run, "--resume", "--steps", "9", "--seq-len", "16", hf_home=hf_home, token_cache=token_cache
    )
    assert_clean_error(changed, "--seq-len cannot change when a run is resumed")


def test_sigterm_saves_a_checkpoint_and_resume_finishes(test_data, tmp_path, token_cache):
    run = tmp_path / "run"
    args = [
        "--data",
        test_data / "zh" / "三国演义.txt",
        *TINY,
        "--tokenizer",
        test_data / "gpt2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-tokens",
        "64",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--device",
        "cpu",
        "--out",
        run,
    ]
    proc = start_script("train.py", *args, "--steps", "100000", env=env_for(tmp_path / "hf", token_cache))
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if (run / "log.jsonl").exists() and sum(r["type"] == "train" for r in log(run)) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"train.py ended early: {proc.communicate()}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr and "--resume" in stderr
    assert "--save-every 0: no checkpoints along the way, but the final one is always written (about " in stderr
    stopped = [r for r in log(run) if r["type"] == "stopped"][-1]
    checkpoint = Path(stopped["checkpoint"])
    assert checkpoint.name == f"step-{stopped['step']:06d}" and stopped["step"] >= 3
    load_model(checkpoint)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary folders left
    # sampling the run names the checkpoint it stands for: the newest, as there is no final one yet
    sampled = run_script("sample.py", "天", "--model", run, "--max-new-tokens", "2", "--device", "cpu",
                         env=env_for(tmp_path / "hf", token_cache), timeout=120)  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert f"sampling its newest checkpoint (no final one yet), {checkpoint.name}" in sampled.stderr

    result = run_train(
        "--out", run, "--resume", "--steps", stopped["step"] + 2, hf_home=tmp_path / "hf", token_cache=token_cache
    )
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in log(run) if r["type"] == "train"] == list(range(1, stopped["step"] + 3))
    load_model(run / "final")
