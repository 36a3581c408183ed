"""train.py against what goes wrong on real machines (kills and signals in a real process of its own):
a second process on the same run, a kill at every stage of a checkpoint save, damaged checkpoints, a
run killed before its first save, signals (Ctrl-C during an evaluation, SIGHUP), and CPU defaults."""

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from clis import ROOT, offline_env, run_script, start_script
from safetensors.torch import load_file, save_file

from minigpt2 import load_model
from minigpt2.training.rundir import STATE_TENSORS, RunDir

TINY = ["--init-preset", "gpt2", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--context", "64"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return offline_env(tmp_path_factory.mktemp("hf"), MINIGPT2_CACHE=str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def base_args(test_data):
    return [
        "--data",
        str(test_data / "zh" / "西游记.txt"),
        *TINY,
        "--tokenizer",
        str(test_data / "gpt2"),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-tokens",
        "64",
        "--device",
        "cpu",
    ]


def train(*args, env, timeout=240):
    return run_script("train.py", *args, env=env, timeout=timeout)


def start(*args, env, fresh=False):
    return start_script("train.py", *args, env=env, fresh=fresh)


def wait_for(run: Path, proc, predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate(RunDir(run).read_log()):
            return
        if proc.poll() is not None:
            pytest.fail(f"train.py ended early: {proc.communicate()}")
        time.sleep(0.1)
    pytest.fail("timed out waiting for train.py")


def trained_steps(log):
    return sum(r["type"] == "train" for r in log)


def one_error_line(result, *needles):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_a_second_process_on_the_same_run_is_refused_at_once(base_args, env, tmp_path):
    run = tmp_path / "run"
    first = start(*base_args, "--steps", "100000", "--eval-every", "0", "--out", run, env=env)
    try:
        wait_for(run, first, lambda log: trained_steps(log) >= 1)
        fresh = train(*base_args, "--steps", "10", "--out", run, env=env)
        again = train("--out", run, "--resume", env=env)
        for result in (fresh, again):
            one_error_line(result, "in use by another training process", f"pid {first.pid} on ")
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGINT
    assert RunDir(run).checkpoints()  # the holder's run is intact and saved


KILL = (
    "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import train\n"
    "from minigpt2.training import distributed, setup_run as launch\n"
    "stage, argv = sys.argv[2], sys.argv[3:]\n"
    "from minigpt2.training.options import TrainOptions\n"
    "given = TrainOptions(**vars(train.parser().parse_args(argv)))\n"
    "saved = launch.read_saved(given.out) if given.resume else launch.SavedRun(None, None)\n"
    "s = launch.setup(given, saved, lambda r: None, distributed.setup('cpu'))\n"
    "def fault(name):\n"
    "    if name == stage: os.kill(os.getpid(), signal.SIGKILL)\n"
    "s.trainer.run_dir.fault = fault\n"
    "for record in s.trainer.run(): pass\n"
)


STAGES = ["weights-written", "written", "moved-old-aside", "moved-new-in", "done"]


def test_a_kill_at_any_stage_of_replacing_final_leaves_a_loadable_checkpoint_and_a_resumable_run(
    base_args, env, tmp_path
):
    # One run of 3 steps, copied once per stage; each copy is extended to 5 steps, and that run's
    # only save (replacing final/) is SIGKILLed at its stage. The copies run side by side.
    first = tmp_path / "first"
    args = [*base_args, "--eval-every", "0", "--save-every", "0"]
    assert train(*args, "--steps", "3", "--out", first, env=env).returncode == 0
    before = load_file(str(first / "final" / "model.safetensors"))
    runs = {stage: tmp_path / stage for stage in STAGES}
    for run in runs.values():
        shutil.copytree(first, run)
    program = tmp_path / "kill_at.py"
    program.write_text(KILL)
    one = ["--threads", "1"]  # five runs side by side on a few cores: two threads each would only wait for each other
    killed = {stage: start_script(program, ROOT, stage, "--out", run, "--resume", "--steps", "5", *one, env=env)
              for stage, run in runs.items()}  # fmt: skip
    for stage, proc in killed.items():
        stderr = proc.communicate(timeout=240)[1]
        assert proc.returncode == -signal.SIGKILL, (stage, stderr)
        found = RunDir(runs[stage]).checkpoints()
        assert found and found[-1].step in (3, 5), stage
        assert load_model(runs[stage]).config.n_layer == 2  # the run stands for a complete checkpoint
    resumed = {stage: start("--out", run, "--resume", "--steps", "6", *one, env=env) for stage, run in runs.items()}
    for stage, proc in resumed.items():
        stdout, stderr = proc.communicate(timeout=240)
        run = runs[stage]
        assert proc.returncode == 0 and "Traceback" not in stderr, (stage, stderr)
        if stage != "done":
            assert "note: " in stderr and "interrupted save" in stderr, (stage, stderr)  # named
        assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".lock"], stage
        assert [r["step"] for r in RunDir(run).read_log() if r["type"] == "train"][-1] == 6, stage
        after = load_file(str(run / "final" / "model.safetensors"))
        assert any(not before[k].equal(v) for k, v in after.items()), stage


def damage(checkpoint: Path, how: str) -> None:
    state = checkpoint / "trainer_state.safetensors"
    if how == "bad json":
        (checkpoint / "trainer_state.json").write_text('{"step": 7, "tokens"')
    elif how == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif how == "missing key":
        tensors = load_file(str(state))
        tensors.pop(next(k for k in tensors if k.endswith("exp_avg_sq")))
        save_file(tensors, str(state))
    elif how in ("negative step", "huge step"):  # issue 20 B: a ZeroDivisionError, and advice for a damaged file
        fields = json.loads((checkpoint / "trainer_state.json").read_text())
        fields["step"] = -3 if how == "negative step" else 1_000_000_000
        (checkpoint / "trainer_state.json").write_text(json.dumps(fields))
    elif how == "nan tensors":  # issue 20 B: "Invalid mt19937 state"
        save_file({k: torch.full_like(v, float("nan"), dtype=torch.float32) for k, v in load_file(str(state)).items()},
                  str(state))  # fmt: skip


def test_resume_falls_back_past_damaged_checkpoints_and_ends_bit_equal(base_args, env, tmp_path):
    args = [
        *base_args,
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--save-every",
        "1",
        "--keep-last",
        "0",
        "--dropout",
        "0.1",
    ]
    full, broken = tmp_path / "full", tmp_path / "broken"
    first = [start(*args, "--out", full, env=env), start(*args, "--out", broken, env=env)]
    for proc in first:
        proc.communicate(timeout=240)
        assert proc.returncode == 0
    # the optimizer state is kept in the newest two steps only (final/ at 8, step-000007): older
    # checkpoints are weights only, still models, no resume candidates (issue 31 A4)
    assert [n for n in range(1, 8) if (broken / f"step-{n:06d}" / STATE_TENSORS).is_file()] == [7]
    assert all((broken / f"step-{n:06d}" / "model.safetensors").is_file() for n in range(1, 8))
    damage(broken / "final", "bad json")  # the newest damaged: the fallback, step 7, resumes bit for bit
    resumed = train("--out", broken, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped checkpoint {broken / 'final'}: trainer_state.json cannot be read" in resumed.stderr
    assert (broken / "final.damaged-1").is_dir()  # kept for inspection, and the note says where
    assert f"It is kept as {broken / 'final'}.damaged-1, for inspection." in resumed.stderr
    assert "resuming at step 7 of 8" in resumed.stdout
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(broken / "final" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)  # bit for bit, dropout included
    losses = [[r["loss"] for r in RunDir(d).read_log() if r["type"] == "train"] for d in (full, broken)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(base_args, env, tmp_path):
    run = tmp_path / "run"
    args = [*base_args, "--steps", "6", "--eval-every", "0", "--save-every", "0", "--out", run]
    proc = start(*args, "--log-every", "1", env=env)
    wait_for(run, proc, lambda log: trained_steps(log) >= 2)
    proc.kill()
    proc.communicate()
    assert not RunDir(run).checkpoints()
    refused = train(*args, env=env)  # a fresh start would overwrite it: refused, pointing to resume
    one_error_line(refused, "already holds a run")
    resumed = train(*args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint" in resumed.stderr and "starting from step 0" in resumed.stderr
    assert [r["step"] for r in RunDir(run).read_log() if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    load_model(run / "final")


def test_ctrl_c_during_an_evaluation_stops_within_seconds(test_data, shared_data, env, tmp_path):
    # Every CPU default, except the model (random 124M weights cannot be downloaded here: a tiny one
    # keeps the test short) and an evaluation made long on purpose: the whole of Lu Xun, 200k tokens.
    run = tmp_path / "run"
    proc = start(
        "--data",
        test_data / "zh" / "西游记.txt",
        *TINY,
        "--tokenizer",
        test_data / "gpt2",
        "--eval-data",
        shared_data / "zh" / "鲁迅小说集.txt",
        "--eval-tokens",
        "200000",
        "--out",
        run,
        env=env,
    )
    wait_for(run, proc, lambda log: any(r["type"] == "eval" and r["set"] == "val" for r in log))
    time.sleep(0.5)  # inside the long evaluation of the second set now
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.time() - sent
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert seconds < 10, seconds
    assert "stopped by SIGINT before the first step: nothing to save" in stderr
    assert "defaults for this cpu: --batch-size 4, --seq-len 64, --steps 500, --eval-every 50" in stdout
    assert not any(r["type"] == "eval" and r["set"] == "鲁迅小说集" for r in RunDir(run).read_log())  # discarded


def test_ctrl_c_after_a_step_with_cpu_defaults_saves_within_seconds(test_data, env, tmp_path):
    # Every CPU default but the model (tiny, with a 64-token context: the default 128-token
    # sequences are capped to it).
    run = tmp_path / "run"
    proc = start("--data", test_data / "zh" / "西游记.txt", *TINY, "--tokenizer", test_data / "gpt2", "--out", run,
                 env=env)  # fmt: skip
    wait_for(run, proc, lambda log: trained_steps(log) >= 1)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert time.time() - sent < 10
    assert "defaults for this cpu: --batch-size 4, --seq-len 64, --steps 500" in stdout
    stopped = [r for r in RunDir(run).read_log() if r["type"] == "stopped"][-1]
    assert f"stopped by SIGINT at step {stopped['step']}: saved" in stderr
    assert load_model(run).config.n_positions == 64


def test_sighup_saves_like_sigterm(base_args, env, tmp_path):
    run = tmp_path / "run"
    proc = start(*base_args, "--steps", "100000", "--eval-every", "0", "--out", run, env=env)
    wait_for(run, proc, lambda log: trained_steps(log) >= 2)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    stopped = [r for r in RunDir(run).read_log() if r["type"] == "stopped"][-1]
    assert stopped["reason"] == "SIGHUP" and Path(stopped["checkpoint"]).name == f"step-{stopped['step']:06d}"
    load_model(stopped["checkpoint"])


def test_training_goes_on_when_stdout_goes_away(base_args, env, tmp_path):
    run = tmp_path / "run"
    proc = start(*base_args, "--steps", "8", "--eval-every", "4", "--log-every", "1", "--out", run, env=env, fresh=True)
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`: the reader is gone
    proc.wait(timeout=240)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert [r["type"] for r in RunDir(run).read_log()][-1] == "done"


def test_an_unwritable_run_or_cache_folder_fails_before_tokenizing(base_args, env, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for args, needle in (
        ([*base_args, "--out", tmp_path / "a-file"], "is a file, not a folder"),
        (
            [*base_args, "--out", tmp_path / "run", "--cache-dir", "/proc/minigpt2"],
            "cannot write to the token cache folder",
        ),
    ):
        result = train(*args, "--steps", "2", env=env)
        one_error_line(result, needle)
        assert "data:" not in result.stdout  # nothing was tokenized
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_damaged_token_cache_is_named_and_rebuilt(base_args, env, tmp_path):
    cache = tmp_path / "cache"
    args = [*base_args, "--steps", "1", "--eval-every", "0", "--cache-dir", cache]
    assert train(*args, "--out", tmp_path / "a", env=env).returncode == 0
    entry = next(p for p in cache.iterdir() if (p / "meta.json").is_file())
    tokens = (entry / "train.bin").read_bytes()
    (entry / "train.bin").write_bytes(tokens[: len(tokens) // 3])
    result = train(*args, "--out", tmp_path / "b", env=env)
    assert result.returncode == 0, result.stderr
    assert "could not be trusted" in result.stderr and "train.bin holds" in result.stderr
    assert (entry / "train.bin").read_bytes() == tokens
    assert (
        json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train_tokens"]
        == json.loads((tmp_path / "b" / "run.json").read_text())["data"]["train_tokens"]
    )


# ----- a full disk or a file size limit: one line naming the file, nothing earlier lost ----------


def limited(kilobytes: int) -> list[str]:
    """A launcher that runs the script with its files limited to `kilobytes` KB (bash's `ulimit -f`,
    RLIMIT_FSIZE: writing past it fails with EFBIG, as a full disk fails with ENOSPC; for root too)."""
    return ["bash", "-c", f'ulimit -f {kilobytes} && exec "$0" "$@"', sys.executable]


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_keeps_the_earlier_one(base_args, env, tmp_path):
    run = tmp_path / "run"
    assert train(*base_args, "--eval-every", "0", "--steps", "2", "--out", run, env=env).returncode == 0
    before = {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()}
    result = run_script("train.py", *base_args, "--out", run, "--resume", "--steps", "3", "--eval-every", "0",
                        env=env, timeout=240, launcher=limited(64))  # fmt: skip
    one_error_line(result, "could not save checkpoint final", "model.safetensors", "File too large", "needs about")
    assert {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()} == before  # nothing lost
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]  # no temp folder left


def test_a_token_cache_that_cannot_be_written_names_the_cache(base_args, tmp_path):
    cache = tmp_path / "tokens"
    env = offline_env(tmp_path / "hf", MINIGPT2_CACHE=str(cache))
    result = run_script("train.py", *base_args, "--out", tmp_path / "run", "--steps", "2", env=env, timeout=240,
                        launcher=limited(64))  # fmt: skip
    one_error_line(result, f"cannot write '{cache}'", "File too large", "--cache-dir")
    assert not any(cache.iterdir())  # no half-written entry


def test_compare_json_that_cannot_be_written_names_the_file(base_args, env, tmp_path):
    run = tmp_path / "run"
    assert train(*base_args, "--eval-every", "0", "--steps", "1", "--out", run, env=env).returncode == 0
    out = tmp_path / "diff.json"
    result = run_script("compare.py", run / "final", run / "final", "--json", out, env=env, timeout=240,
                        launcher=limited(1))  # fmt: skip
    one_error_line(result, f"cannot write '{out}'", "File too large")
    assert not out.exists() and not any(p.name.startswith(".diff.json") for p in tmp_path.iterdir())


def test_a_set_up_that_never_finished_leaves_a_folder_the_same_command_uses(base_args, env, tmp_path):
    """issue 31 C1: RUN/tokenizer/ and RUN/grown-base/ are written before run.json; after a stop in
    between, neither the same command nor --resume may answer "is not a training run"."""
    run = tmp_path / "run"
    args = [*base_args, "--extend-vocab", "30", "--eval-every", "0", "--out", run]
    refused = train(*args, "--epochs", "0.002", "--embed-warmup", "50", env=env)  # refused after the merges
    one_error_line(refused, "--embed-warmup")
    assert not run.exists()  # nothing left behind: the corrected command starts here
    # what a SIGKILL in set-up leaves (it cannot clean up): the next start clears it, saying so
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "vocab.json").write_text("{")
    (run / "grown-base").mkdir()
    (run / "tensorboard").mkdir()
    (run / ".lock").write_text("")
    ok = train(*args, "--steps", "2", "--resume", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "stopped during its set-up" in ok.stderr and "starting from step 0" in ok.stderr
    assert json.loads((run / "run.json").read_text())["train"]["steps"] == 2
    assert json.loads((run / "tokenizer" / "vocab.json").read_text())  # the run's own, learned again
    inside = train(*base_args, "--steps", "2", "--out", tmp_path / "r2", "--tensorboard", tmp_path / "r2" / "tb",
                   env=env)  # fmt: skip
    one_error_line(inside, "--tensorboard", "is inside the run folder")
    assert not (tmp_path / "r2").exists()


def test_resuming_the_new_recipes(base_args, env, tmp_path):
    """issue 31 C6: a longer run with a longer embedding warm-up resumes; adding or dropping the
    warm-up names the option; a damaged grown-base/ is written again, said in one line."""
    run = tmp_path / "run"
    args = [*base_args, "--extend-vocab", "30", "--eval-every", "0", "--sample-tokens", "0", "--out", run]
    first = train(*args, "--steps", "4", "--embed-warmup", "2", env=env)
    assert first.returncode == 0, first.stderr
    longer = train(*args, "--resume", "--steps", "8", "--embed-warmup", "6", env=env)
    assert longer.returncode == 0, longer.stderr
    assert json.loads((run / "run.json").read_text())["train"]["steps"] == 8
    dropped = train(*args, "--resume", "--steps", "9", "--embed-warmup", "0", env=env)
    one_error_line(dropped, "--embed-warmup cannot be dropped from a resumed run")
    assert json.loads((run / "run.json").read_text())["train"]["steps"] == 8  # refused: run.json as it was
    lora = tmp_path / "lora"
    largs = [*base_args, "--extend-vocab", "30", "--lora", "2", "--eval-every", "0", "--sample-tokens", "0"]
    assert train(*largs, "--steps", "2", "--out", lora, env=env).returncode == 0
    added = train(*largs, "--steps", "3", "--out", lora, "--resume", "--new-token-lr", "1e-3", env=env)
    assert added.returncode == 0, added.stderr  # (LoRA keeps the new rows apart anyway)
    weights = lora / "grown-base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    repaired = train(*largs, "--steps", "4", "--out", lora, "--resume", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert "grown-base' was damaged" in repaired.stderr
    (lora / "grown-base" / "config.json").unlink()
    repaired = train(*largs, "--steps", "5", "--out", lora, "--resume", env=env)
    assert repaired.returncode == 0 and "config.json missing" in repaired.stderr, repaired.stderr
    load_model(lora / "grown-base")
