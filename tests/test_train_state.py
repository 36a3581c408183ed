"""The checkpoint component on its own: `Checkpointer` saves and restores a `TrainingState` it is
handed (no trainer), and every field it reads back is checked, so damage is a `CheckpointError`
(then set aside and fallen back past by `resume`), never a crash further on."""

import json

import pytest
import torch
from checkpoints import tiny_gpt
from safetensors.torch import load_file, save_file

from minigpt2.errors import CheckpointError
from minigpt2.training.checkpoint import Checkpointer, TrainingState
from minigpt2.training.distributed import Dist
from minigpt2.training.rundir import STATE_JSON, STATE_TENSORS, RunDir
from minigpt2.training.trainer import TrainConfig, param_groups


def state_of(seed=0):
    model = tiny_gpt(vocab_size=300, n_positions=16, seed=seed).train()
    groups = param_groups(model, 0.1)
    names = [n for g in groups for n in g.pop("names")]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainingState(model, optimizer, scaler, params, names, TrainConfig(steps=10, seq_len=8))


def one_step(states):
    x = torch.randint(0, 300, (2, 9))
    _, loss = states.model(x[:, :-1], x[:, 1:])
    loss.backward()
    states.optimizer.step()
    states.optimizer.zero_grad()


@pytest.fixture
def saved(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    # every checkpoint keeps its optimizer state here (keep_state=0): these tests fall back past several
    checkpointer = Checkpointer(run, dist=Dist(device=torch.device("cpu")), device="cpu", keep_last=0, keep_state=0)
    states = state_of()
    for step in (1, 2, 3):
        one_step(states)
        checkpointer.save(states, step, step * 16)
    return run, checkpointer, states


def test_a_fresh_state_resumes_to_the_saved_one(saved):
    run, checkpointer, states = saved
    other = state_of(seed=1)
    step, tokens = checkpointer.load(other, run.path / "step-000003")
    assert (step, tokens) == (3, 48)
    a, b = states.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = states.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def edit_json(folder, **fields):
    state = json.loads((folder / STATE_JSON).read_text())
    state.update(fields)
    (folder / STATE_JSON).write_text(json.dumps(state))


def edit_tensors(folder, change):
    tensors = load_file(str(folder / STATE_TENSORS))
    change(tensors)
    save_file(tensors, str(folder / STATE_TENSORS))


def first_moment(tensors, suffix="exp_avg_sq"):
    return next(k for k in tensors if k.endswith(suffix))


DAMAGE = {
    "negative step": (lambda f: edit_json(f, step=-3), '"step" is -3, not a step of this run (0 to 10)'),
    "huge step": (lambda f: edit_json(f, step=10**9), '"step" is 1000000000'),
    "step of another folder": (lambda f: edit_json(f, step=2), '"step" is 2, but the checkpoint is step-000003'),
    "text tokens": (lambda f: edit_json(f, tokens="many"), "\"tokens\" is 'many'"),
    "NaN lr": (
        lambda f: edit_json(f, param_groups=[{"params": [0], "lr": float("nan"), "betas": [0.9, 0.95]}]),
        "optimizer group",
    ),  # fmt: skip
    "NaN rng": (
        lambda f: edit_tensors(f, lambda t: t.update({"rng.torch_cpu": torch.full((5056,), float("nan"))})),
        "rng.torch_cpu is torch.float32",
    ),  # fmt: skip
    "short rng": (
        lambda f: edit_tensors(f, lambda t: t.update({"rng.torch_cpu": t["rng.torch_cpu"][:100]})),
        "rng.torch_cpu is torch.uint8 (100,)",
    ),  # fmt: skip
    "NaN moment": (lambda f: edit_tensors(f, lambda t: t[first_moment(t)].fill_(float("nan"))), "is not finite"),
    "negative second moment": (lambda f: edit_tensors(f, lambda t: t[first_moment(t)].fill_(-1.0)), "negative"),
    "moment of another shape": (
        lambda f: edit_tensors(f, lambda t: t.update({first_moment(t): torch.zeros(3, 3)})),
        "has shape (3, 3), but the parameter has",
    ),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_a_checkpoint_error_and_changes_nothing(saved, how):
    run, checkpointer, _ = saved
    damage, why = DAMAGE[how]
    damage(run.path / "step-000003")
    other = state_of(seed=1)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        checkpointer.load(other, run.path / "step-000003")
    assert why in str(e.value) and "damaged" in str(e.value), str(e.value)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


@pytest.mark.parametrize(
    "text, why",
    [("[" * 100_000, "nested too deeply"), ('{"step": ' + "9" * 5000 + "}", "4300 digits")],
    ids=["nested 100,000 deep", "a 5000-digit step"],
)
def test_json_that_defeats_json_loads_is_a_checkpoint_error(saved, text, why):
    """RecursionError and int-size ValueError are not JSONDecodeError: both must still read as damage."""
    run, checkpointer, _ = saved
    (run.path / "step-000003" / STATE_JSON).write_text(text)
    with pytest.raises(CheckpointError) as e:
        checkpointer.load(state_of(seed=1), run.path / "step-000003")
    assert f"{STATE_JSON} cannot be read" in str(e.value) and why in str(e.value), str(e.value)


def test_resume_sets_damaged_checkpoints_aside_and_falls_back(saved):
    run, checkpointer, _ = saved
    DAMAGE["negative step"][0](run.path / "step-000003")
    DAMAGE["NaN rng"][0](run.path / "step-000002")
    found = checkpointer.resume(state_of(seed=1))
    assert found.path == run.path / "step-000001" and (found.step, found.tokens) == (1, 16)
    assert [s["kept_as"] for s in found.skipped] == [
        str(run.path / "step-000003.damaged-1"),
        str(run.path / "step-000002.damaged-1"),
    ]
    assert (run.path / "step-000003.damaged-1").is_dir() and not (run.path / "step-000003").exists()


def test_only_the_newest_two_steps_keep_the_optimizer_state_and_the_fallback_still_resumes(tmp_path):
    """AdamW's moments stay where a resume can use them: the newest checkpoint and the one it falls
    back to; older ones keep their weights (loadable as models) and are no resume candidates."""
    from minigpt2.io.weights import load_model

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    checkpointer = Checkpointer(run, dist=Dist(device=torch.device("cpu")), device="cpu", keep_last=0)
    states = state_of()
    for step in (1, 2, 3, 4):
        one_step(states)
        checkpointer.save(states, step, step * 16)
    checkpointer.save(states, 4, 64, "final")
    has_state = {p.name: (p / STATE_TENSORS).is_file() for p in run.path.iterdir() if not p.name.startswith(".")}
    has_state = {k: v for k, v in has_state.items() if k.startswith(("step-", "final"))}
    assert has_state == {"step-000001": False, "step-000002": False, "step-000003": True, "step-000004": True,
                         "final": True}  # fmt: skip
    assert load_model(run.path / "step-000001").config == states.model.config  # still a model
    for name in ("final", "step-000004"):  # the newest damaged: the fallback is the step before
        (run.path / name / STATE_JSON).write_text("{")
    found = checkpointer.resume(state_of(seed=1))
    assert found.path == run.path / "step-000003" and found.step == 3
    assert [s["path"] for s in found.skipped] == [str(run.path / "final"), str(run.path / "step-000004")]
