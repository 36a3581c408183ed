"""The run directory in-process: the lock, the tolerant log, listing, replacement, recovery and pruning."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minigpt2 import GPT, GPTConfig, load_model, save_model
from minigpt2.errors import CheckpointError
from minigpt2.training.rundir import (
    CHECKPOINT_FILES,
    STATE_JSON,
    RunDir,
    RunDirError,
    check_writable,
    other_checkpoints_hint,
    step_name,
)


def fake_checkpoint(folder, step, marker=""):
    """A folder with every checkpoint file (contents do not matter to the listing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        (folder / name).write_text(marker)
    (folder / STATE_JSON).write_text(json.dumps({"step": step, "marker": marker}))
    return folder


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = RunDir(tmp_path / "run")
    first.lock()
    with pytest.raises(RunDirError, match=rf"in use by another training process \(pid {os.getpid()} on "):
        RunDir(tmp_path / "run").lock()
    first.unlock()
    second = RunDir(tmp_path / "run")
    second.lock()  # released: free again
    second.unlock()


def test_the_lock_dies_with_its_process(tmp_path):
    code = (
        "import sys; from minigpt2.training.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
        "import os; os.kill(os.getpid(), 9)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True)
    assert result.returncode == -9
    assert "pid" in (tmp_path / "run" / ".lock").read_text()  # the holder's note is still there...
    RunDir(tmp_path / "run").lock()  # ...but the OS lock went with the process


def test_log_reading_skips_a_line_cut_short(tmp_path):
    run = RunDir(tmp_path)
    run.log({"type": "train", "step": 1})
    run.log({"type": "train", "step": 2})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # the process died mid-write
    assert [r["step"] for r in run.read_log()] == [1, 2]
    run.forget_after(1)
    assert [r["step"] for r in run.read_log()] == [1]


def test_listing_finds_a_checkpoint_in_the_middle_of_its_replacement(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoint(tmp_path / "step-000002", 2)
    fake_checkpoint(tmp_path / ".final.old-123", 4, "old")  # final/ was moved aside...
    fake_checkpoint(tmp_path / ".final.tmp-123", 6, "new")  # ...the new one not yet moved in
    (tmp_path / ".step-000008.tmp-77").mkdir()  # a save that died while writing
    assert [(c.step, c.path.name) for c in run.checkpoints()] == [(2, "step-000002"), (6, ".final.tmp-123")]
    assert run.model_checkpoint().name == ".final.tmp-123"
    messages = run.recover()
    assert any("restored final/ from a complete save" in m for m in messages)
    assert any(".step-000008.tmp-77" in m and "incomplete" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step-000002"]
    assert json.loads((tmp_path / "final" / STATE_JSON).read_text())["marker"] == "new"


def test_recover_puts_back_the_old_copy_when_the_new_one_is_incomplete(tmp_path):
    fake_checkpoint(tmp_path / ".final.old-9", 4, "old")
    (tmp_path / ".final.tmp-9").mkdir()
    RunDir(tmp_path).recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((tmp_path / "final" / STATE_JSON).read_text())["marker"] == "old"


@pytest.mark.parametrize("stage", ["written", "moved-old-aside", "moved-new-in"])
def test_an_exception_at_any_stage_of_a_replacement_leaves_a_complete_checkpoint(tmp_path, stage):
    def fail(name):
        if name == stage:
            raise RuntimeError(f"crash at {name}")

    fake_checkpoint(tmp_path / "final", 4, "old")
    run = RunDir(tmp_path, fault=fail)
    with pytest.raises(RuntimeError):
        run.save("final", lambda folder: fake_checkpoint(folder, 6, "new"))
    found = run.checkpoints()
    assert found and found[-1].step in (4, 6)
    RunDir(tmp_path).recover()
    assert [c.path.name for c in RunDir(tmp_path).checkpoints()] == ["final"]


def test_prune_keeps_the_newest_and_final(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path / f"step-{step:06d}", step)
    fake_checkpoint(tmp_path / "final", 4)
    removed = RunDir(tmp_path).prune(2)
    assert sorted(p.name for p in removed) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step-000003", "step-000004"]


def test_unwritable_folders_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_writable(tmp_path / "file", "the run directory")
    with pytest.raises(RunDirError, match="cannot write to the token cache folder '/proc/minigpt2'"):
        check_writable("/proc/minigpt2", "the token cache folder")  # a read-only filesystem, even for root


def test_a_damaged_checkpoint_of_a_run_names_the_others(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64))
    for step in (2, 4):
        save_model(model, tmp_path / "run" / step_name(step))
    weights = tmp_path / "run" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    for source in (tmp_path / "run", tmp_path / "run" / "step-000004", weights):
        with pytest.raises(CheckpointError, match=r"truncated .* The run has other checkpoints \(step-000002\)"):
            load_model(source)
    assert load_model(tmp_path / "run" / "step-000002").config.n_layer == 1
    assert other_checkpoints_hint(tmp_path / "run" / "step-000002") == (
        " The run has other checkpoints (step-000004): load one of those folders instead, or resume the training, "
        "which sets a damaged checkpoint aside and goes on from the newest good one."
    )
    assert other_checkpoints_hint(tmp_path) == ""  # not a run


def test_out_is_judged_before_anything_is_written(tmp_path):
    from minigpt2.training.setup_run import judge_out

    assert judge_out(tmp_path / "new") == "missing" and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert judge_out(tmp_path / "empty") == "empty"
    run = tmp_path / "run"
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "model.safetensors").write_bytes(b"x")
    (run / "log.jsonl").write_text("")
    (run / "step-000001.damaged-1").mkdir()
    (run / "step-000001.damaged-1" / "trainer_state.json").write_text("{")
    assert judge_out(run) == "run"
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds files that are not a training run's \(notes.txt\)"):
        judge_out(run)
    mine = tmp_path / "mine"
    (mine / "step-000001").mkdir(parents=True)
    (mine / "step-000001" / "draft.md").write_text("mine")
    with pytest.raises(RunDirError, match=r"\(step-000001\)"):
        judge_out(mine)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="holds a model checkpoint"):
        judge_out(tmp_path / "ckpt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        judge_out(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "file", "mine", "run"]  # nothing added
