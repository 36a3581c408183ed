"""train.py's options as one typed object: the parser is made from it, resolution happens once
(command line, then the saved run, then the device's defaults), run.json's options are checked."""

import argparse
import re
from dataclasses import fields

import pytest

from minigpt2.errors import MiniGPT2Error, OptionError, user_message
from minigpt2.training.options import (
    FIXED_ON_RESUME,
    FLAGS,
    TrainOptions,
    build_parser,
    check_combinations,
    parse,
    resolve,
    saved_options,
)

BASE = ["--data", "a.txt", "--out", "run"]


def test_the_parser_has_one_flag_per_option_and_keeps_their_spellings():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    options = {f.name for f in fields(TrainOptions) if "help" in f.metadata}
    assert flags == {FLAGS[name] for name in options}
    for flag in ("--seq-len", "--batch-size", "--extend-vocab", "--activation-checkpointing", "--context", "--lora"):
        assert flag in flags
    assert "ranks" not in options  # set by resolve, never typed


def test_values_are_checked_while_parsing():
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--lr", "nan"])
    o = parse([*BASE, "--lr", "1e-3", "--data", "b.txt", "--compile"])
    assert o.lr == 1e-3 and o.data == ["a.txt", "b.txt"] and o.compile is True and o.shard is None


def test_a_fresh_run_takes_the_device_defaults_and_names_them():
    cpu = resolve(parse(BASE), None, "cpu")
    assert (cpu.options.steps, cpu.options.seq_len, cpu.options.eval_tokens, cpu.options.ranks) == (500, 128, 4096, 1)
    assert cpu.defaults_used == ["batch_size", "seq_len", "steps", "eval_every", "eval_tokens", "save_every"]
    gpu = resolve(parse([*BASE, "--batch-size", "8"]), None, "cuda", ranks=2)
    assert gpu.options.steps is None and gpu.options.eval_tokens == 65536 and gpu.options.ranks == 2
    assert gpu.defaults_used == ["eval_tokens", "save_every"]  # given and undecided ones are not shown
    assert resolve(parse([*BASE, "--epochs", "2"]), None, "cpu").options.steps is None  # epochs replace the default


def test_a_resumed_run_keeps_its_saved_options_and_refuses_changing_a_fixed_one():
    saved = resolve(parse([*BASE, "--seq-len", "64", "--lr", "1e-3", "--steps", "10"]), None, "cpu").options.to_json()
    assert "out" not in saved and "resume" not in saved and saved["ranks"] == 1
    again = resolve(parse(["--out", "run", "--resume", "--steps", "20"]), saved, "cpu")
    assert (again.options.seq_len, again.options.lr, again.options.steps, again.defaults_used) == (64, 1e-3, 20, [])
    epochs = resolve(parse(["--out", "run", "--resume", "--epochs", "3"]), saved, "cpu").options
    assert epochs.steps is None and epochs.epochs == 3  # a new length replaces the saved one
    assert "seq_len" in FIXED_ON_RESUME and "lr" not in FIXED_ON_RESUME
    with pytest.raises(OptionError, match="cannot change when a run is resumed") as e:
        resolve(parse(["--out", "run", "--resume", "--seq-len", "32"]), saved, "cpu")
    assert user_message(e.value).startswith("--seq-len cannot change")
    with pytest.raises(OptionError, match="global batch of 4"):
        resolve(parse(["--out", "run", "--resume", "--batch-size", "2"]), saved, "cpu")


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(OptionError) as e:
        resolve(parse([*BASE, "--val-data", "v.txt", "--val-fraction", "0.1"]), None, "cpu")
    assert user_message(e.value).startswith("--val-fraction holds out") and "--val-data" in user_message(e.value)
    with pytest.raises(OptionError) as e:
        check_combinations(resolve(parse([*BASE, "--vocab-from", "x.txt"]), None, "cpu").options)
    assert "--extend-vocab N" in user_message(e.value)
    check_combinations(resolve(parse([*BASE, "--vocab-from", "x.txt", "--extend-vocab", "8"]), None, "cpu").options)
    with pytest.raises(MiniGPT2Error, match="only apply to a preset"):
        check_combinations(resolve(parse([*BASE, "--n-layer", "2"]), None, "cpu").options)


@pytest.mark.parametrize(
    "args, why",
    [
        ([1, 2], 'its "args" should be an object'),
        ({"lr": "fast"}, '"args"."lr" is \'fast\', not a number'),
        ({"lr": float("nan")}, '"args"."lr" is nan'),
        ({"batch_size": 0}, '"args"."batch_size" must be an integer >= 1'),
        ({"seed": True}, '"args"."seed" is True, not an integer'),
        ({"data": ["a.txt", 3]}, '"args"."data"'),
        ({"encoding_errors": "ignore"}, '"args"."encoding_errors" is \'ignore\', not one of strict, replace'),
        ({"ranks": 0}, '"args"."ranks" is 0'),
    ],
)
def test_a_damaged_saved_option_names_run_json(args, why, tmp_path):
    with pytest.raises(MiniGPT2Error) as e:
        saved_options(args, tmp_path / "run.json")
    assert str(e.value).startswith(f"'{tmp_path / 'run.json'}' is damaged: {why}"), str(e.value)


def test_saved_options_keep_valid_values_and_drop_unknown_names(tmp_path):
    saved = saved_options({"lr": 1e-3, "data": ["a.txt"], "from_the_future": 1, "ranks": 2}, tmp_path / "run.json")
    assert saved == {"lr": 1e-3, "data": ["a.txt"], "ranks": 2}


def test_the_help_shows_every_group():
    text = build_parser("doc").format_help()
    for title in ("data:", "model:", "LoRA:", "training (CPU", "hardware:"):
        assert title in text
    assert isinstance(build_parser(), argparse.ArgumentParser)


@pytest.mark.parametrize("script", ["train.py", "sample.py", "compare.py"])
def test_help_and_a_mistyped_option_answer_before_torch_is_imported(script):
    # A newcomer's first commands (--help, a typo) answer in a fraction of a second: parsing the
    # options must not import torch (a few seconds on a laptop, far more on a busy one).
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    for args in (["--help"], ["--no-such-option"]):
        result = subprocess.run([sys.executable, "-c", probe, str(root / script), *args], capture_output=True,
                                text=True, cwd=root, timeout=120)  # fmt: skip
        assert result.stdout.strip().endswith("torch not imported"), (args, result.stdout[-300:], result.stderr)


def test_a_prompt_typed_under_a_c_locale_is_read_as_the_text_typed():
    from minigpt2.checks import text_arg

    typed = "你好".encode().decode("ascii", "surrogateescape")  # what argv holds under LC_ALL=C
    assert typed != "你好" and text_arg(typed) == "你好" and text_arg("hello") == "hello"
    # not UTF-8, or a lone surrogate: refused where it is read (issue 31 C4), not kept to fail as a
    # UnicodeEncodeError when run.json, the merges or the HTML page are written
    for bad, where in (("\udcff", "byte 0xff at byte 0"), ("a\udced\udca0\udc80", "byte 0xed at byte 1"),
                       ("a\ud800", "\\ud800 at character 1")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=f"is not valid UTF-8 text \\({re.escape(where)}\\)"):
            text_arg(bad)


def test_the_trainer_config_takes_its_defaults_and_checks_from_the_options(capsys):
    """One owner per default and rule: `TrainConfig` in Python and train.py cannot drift apart."""
    from minigpt2.training.options import defaults_for
    from minigpt2.training.trainer import TrainConfig

    config, cpu = TrainConfig(steps=10), defaults_for("cpu")
    for name in ("batch_size", "seq_len", "grad_accum", "lr", "weight_decay", "grad_clip", "snapshot_every", "seed"):
        assert getattr(config, name) == cpu[name], name
    assert config.eval_tokens == defaults_for("cuda")["eval_tokens"]
    # the same rule refuses the same value in the same words, from Python and on the command line
    for name, bad in [("lr", float("nan")), ("batch_size", 0), ("weight_decay", -1.0), ("seed", -1)]:
        with pytest.raises(OptionError) as refused:
            TrainConfig(steps=10, **{name: bad})
        assert refused.value.option == name
        with pytest.raises(SystemExit):
            parse([*BASE, FLAGS[name], str(bad)])
        assert capsys.readouterr().err == f"error: {FLAGS[name]} {refused.value.detail}\n"
    # and the help text shows each default from its one declaration
    help_text = " ".join(build_parser().format_help().split())
    assert "peak learning rate (default 3e-4)" in help_text and "(default 0.1)" in help_text
