"""What a new user meets in the first hour (issue 31 B): what the start lines and the progress line
say, and that the advice given works. Real subprocess runs of train.py on tiny models."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
from clis import assert_clean_error, offline_env, run_script, start_script

from minigpt2.training.rundir import STATE_TENSORS, RunDir

TINY = ["--init-preset", "gpt2", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--context", "64"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return offline_env(tmp_path_factory.mktemp("hf"), MINIGPT2_CACHE=str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def base_args(test_data):
    return ["--data", test_data / "zh" / "西游记.txt", *TINY, "--tokenizer", test_data / "gpt2", "--batch-size", 2,
            "--seq-len", 16, "--eval-tokens", 64, "--device", "cpu"]  # fmt: skip


def train(*args, env, timeout=300):
    return run_script("train.py", *args, env=env, timeout=timeout)


def mb(text: str) -> float:
    value, unit = text.split()
    return float(value) * (1000 if unit == "GB" else 1)


def test_the_start_line_says_the_disk_use_and_the_files_hold_it(base_args, env, tmp_path):
    run = tmp_path / "run"
    result = train(*base_args, "--steps", 6, "--save-every", 1, "--keep-last", 3, "--eval-every", 0, "--out", run,
                   env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = re.search(r"checkpoints: ([\d.]+ [MG]B) of weights each, \+ ([\d.]+ [MG]B) of optimizer state in the "
                     r"newest two only \(for --resume\); about ([\d.]+ [MG]B) in all \(4 checkpoints: --keep-last 3, "
                     r"and final/\)", result.stdout)  # fmt: skip
    assert line, result.stdout
    weights, state, total = map(mb, line.groups())
    folders = [p for p in run.iterdir() if p.name == "final" or p.name.startswith("step-")]
    assert sorted(p.name for p in folders) == ["final", "step-000003", "step-000004", "step-000005"]
    assert sorted(p.name for p in folders if (p / STATE_TENSORS).is_file()) == ["final", "step-000005"]
    sizes = {p.name: {f.name: f.stat().st_size / 1e6 for f in p.iterdir()} for p in folders}
    assert sizes["final"]["model.safetensors"] == pytest.approx(weights, rel=0.02)
    assert sizes["final"][STATE_TENSORS] == pytest.approx(state, rel=0.02)
    on_disk = sum(s.get("model.safetensors", 0) + s.get(STATE_TENSORS, 0) for s in sizes.values())
    assert on_disk == pytest.approx(total, rel=0.02)
    assert RunDir(run).model_checkpoint().name == "final"
    # every file with the user's umask (model.safetensors was 0600, the others 0644)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (run / "final").iterdir() if f.is_file()}
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def wait_for(run, proc, predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate(RunDir(run).read_log()):
            return
        assert proc.poll() is None, "the run ended before it was stopped"
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_ctrl_c_before_the_first_step_gives_advice_that_works(base_args, env, test_data, tmp_path):
    """Stopped during the step-0 evaluation: nothing saved, and the same command then works (it was
    refused as "already holds a run")."""
    run = tmp_path / "run"
    args = [*base_args, "--eval-data", test_data / "zh" / "鲁迅小说集.txt", "--eval-tokens", 4000, "--steps", 2,
            "--out", run]  # fmt: skip
    proc = start_script("train.py", *args, env=env)
    wait_for(run, proc, lambda log: any(r["type"] == "eval" and r["set"] == "val" for r in log))
    time.sleep(0.3)  # inside the long evaluation of the second set
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT before the first step: nothing to save" in stderr
    assert f"note: '{run}' is empty again (the run had not started): run the same command to start it" in stderr
    assert run.is_dir() and not any(run.iterdir())
    again = run_script("train.py", *args, env=env, timeout=600)  # the same command
    assert again.returncode == 0, again.stderr
    assert (run / "final" / "model.safetensors").is_file()


def test_sampling_a_run_that_has_not_saved_says_whether_it_is_still_training(tmp_path):
    run = RunDir(tmp_path / "run")
    run.lock()  # as a training process holds it
    (run.path / "run.json").write_text("{}")
    try:
        training = run_script("sample.py", "x", "--model", run.path, timeout=120)
    finally:
        run.unlock()
    assert_clean_error(training, "has no checkpoint yet: it is still training and has not saved yet")
    stopped = run_script("sample.py", "x", "--model", run.path, timeout=120)
    assert_clean_error(stopped, "has no checkpoint yet: it stopped before its first save")


def test_compare_names_each_vocabulary_and_no_empty_drift_section(hub_gpt2, test_data, tmp_path):
    """A grown B: the architecture line says both vocabularies (it said 50257 for a B of 50,287);
    a run that took no snapshots gets no "(snapshots.jsonl holds no snapshots)" section."""
    run = tmp_path / "grown"
    trained = run_script("train.py", "--data", test_data / "zh" / "西游记.txt", "--model", "gpt2", "--extend-vocab", 30,
                         "--seq-len", 32, "--batch-size", 2, "--steps", 2, "--eval-every", 0, "--val-fraction", 0,
                         "--device", "cpu", "--out", run, timeout=600)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert not (run / "snapshots.jsonl").exists()
    result = run_script("compare.py", "gpt2", run, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "vocabulary A 50,257, B 50,287 (30 new rows in B), context 128" in result.stdout, result.stdout
    assert "holds no snapshots" not in result.stdout and "Drift over steps" not in result.stdout


def test_embed_warmup_names_its_phase_and_logs_the_rate_of_what_trains(base_args, env, tmp_path):
    result = train(*base_args, "--extend-vocab", 20, "--embed-warmup", 2, "--new-token-lr", 3e-3, "--steps", 4,
                   "--eval-every", 0, "--log-every", 1, "--out", tmp_path / "run", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "note: steps 1-2 train only the grown vocabulary's new rows (--embed-warmup 2; learning rate up to 3.00e-03, "
        "the rate the log shows); from step 3 everything trains (learning rate 3.00e-04, with a warm-up and cosine "
        "of its own)"
    ) in result.stderr, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s+[12] \|", line)]
    assert len(rows) == 2 and "0.00e+00" not in "".join(rows), result.stdout


def cjk_test_font(path, family="Test CJK Sans", characters="中国文"):
    """A real TrueType font (fontTools) with a glyph of its own for each of `characters`."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef", *(f"uni{ord(c):04X}" for c in characters)]
    glyphs = {}
    for i, name in enumerate(names):
        pen = TTGlyphPen(None)
        pen.moveTo((50, 0)), pen.lineTo((50, 100 + 50 * i)), pen.lineTo((500, 700)), pen.closePath()
        glyphs[name] = pen.glyph()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in characters})
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (600, 50) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))
    return path


def test_a_font_that_only_claims_chinese_is_not_picked_and_a_new_real_one_is_found(tmp_path):
    """matplotlib's Last Resort font maps every character to a box: never the CJK font. With no CJK
    font in matplotlib's list, one installed since in a font folder is found and added."""
    import matplotlib
    from matplotlib import font_manager

    from minigpt2.analysis.report import cjk_font, draws_chinese

    last_resort = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "LastResortHE-Regular.ttf"
    assert last_resort.is_file() and not draws_chinese(last_resort)
    assert cjk_font(folders=()) != "Last Resort High-Efficiency"
    boxes_only = cjk_test_font(tmp_path / "boxes.ttf", "Boxes Only", characters="中")  # claims one, not three
    assert not draws_chinese(boxes_only)
    folder = tmp_path / "fonts"
    folder.mkdir()
    real = cjk_test_font(folder / "cjk.ttf")
    assert draws_chinese(real)
    if cjk_font(folders=()) is None:  # this machine has none installed: the folder's is found and added
        assert cjk_font(folders=(str(folder),)) == "Test CJK Sans"
        assert str(real) in {f.fname for f in font_manager.fontManager.ttflist}
        assert cjk_font(folders=()) == "Test CJK Sans"  # in the list from now on


def test_sampling_at_an_evaluation_is_shown_and_ctrl_c_stops_it_within_seconds(test_data, env, tmp_path):
    """Samples of many tokens on a model wide enough that they take a while: the progress line says
    it samples, and Ctrl-C ends the draw between tokens (it waited for the whole draw: 13.7 s)."""
    run = tmp_path / "run"
    proc = start_script("train.py", "--data", test_data / "zh" / "西游记.txt", "--init-preset", "gpt2", "--n-layer", 2,
                        "--n-head", 4, "--n-embd", 256, "--context", 1024, "--tokenizer", test_data / "gpt2",
                        "--batch-size", 1, "--seq-len", 16, "--eval-tokens", 64, "--sample-tokens", 1000, "--steps", 2,
                        "--device", "cpu", "--out", run, env=env)  # fmt: skip
    wait_for(run, proc, lambda log: any(r["type"] == "eval" for r in log))
    time.sleep(1.0)  # drawing the samples now (a thousand tokens of each prompt)
    assert proc.poll() is None
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    seconds = time.time() - sent
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "step 0/2: sampling 2 prompts (1000 new tokens each; Ctrl-C stops it)" in stderr, stderr
    assert "stopped by SIGINT before the first step" in stderr
    assert seconds < 4, seconds  # the draw ends between two tokens; then the exit


def test_the_html_drift_chart_has_a_colour_per_layer_and_is_never_scaled_up():
    from minigpt2.analysis.htmlreport import CSS, PALETTE, line_chart, series_colours

    layers = ["wte", *(f"h.{i}" for i in range(12)), "ln_f"]  # 124M's drift chart: 14 series
    svg = line_chart([(name, [0, 10], [0.0, i + 1.0]) for i, name in enumerate(layers)], xlabel="step", ylabel="%")
    strokes = re.findall(r'<path d="[^"]*" fill="none" stroke="(#[0-9a-f]{6})"', svg)
    assert len(strokes) == 14 and len(set(strokes)) == 14, strokes  # wte and h.8 shared tab10's blue
    assert "stroke-dasharray" not in svg
    assert series_colours(3) == list(PALETTE[:3])  # as the PNG, where tab10 suffices
    width = re.search(r'<svg viewBox="0 0 (\d+) ', svg).group(1)
    assert f"svg{{width:100%;max-width:{width}px;" in CSS  # its 14px text never grows past its neighbours'
