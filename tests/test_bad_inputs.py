"""Bad input anywhere: one clear `error:` line, never a traceback, never a silent wrong answer.

One table, one row per bad input, each run as a real process of sample.py, compare.py or
train.py (forked from a Python that imported torch: tests/zygote.py). Every row must exit non-zero
with exactly one line starting with `error:` that names the culprit, print no traceback, and leave
every file already in the test folder byte-identical. The rows run two at a time, in forks: on 2
cores that beat one after another in the tests' process (~70-110 s against ~78 s, measured loaded).

A second table holds valid but unusual inputs that must work.
"""

import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from checkpoints import official_state_dict, random_hf_model, write_official_layout
from clis import ROOT, offline_env, run_script, start_script
from safetensors.torch import save_file

NAN, INF = float("nan"), float("inf")
PARALLEL = 2  # runs at once: the cores of the machine the suite is sized for


# ----- the checkpoints and files the rows use -------------------------------------------------


def tokenizer_files(directory: Path, test_data: Path) -> Path:
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(test_data / "gpt2" / name, directory / name)
    return directory


def tampered(model, directory: Path, test_data: Path, *, tensors=None, config=None, with_config=True) -> Path:
    """A copy of `model` in the official layout, with some tensors or config.json fields replaced."""
    directory.mkdir(parents=True)
    state = official_state_dict(model)
    state.update(tensors or {})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if with_config:
        hf = json.loads(model.config.to_json_string())
        hf.update(config or {})
        (directory / "config.json").write_text(json.dumps(hf))  # allow_nan: NaN is what a broken file holds
    return tokenizer_files(directory, test_data)


@pytest.fixture(scope="module")
def world(tmp_path_factory, test_data, hub_gpt2):
    root = tmp_path_factory.mktemp("bad inputs")
    model = random_hf_model(n_layer=2, n_head=2, n_embd=64, n_positions=32, seed=5)
    good = tokenizer_files(write_official_layout(model, root / "good"), test_data)
    wte = official_state_dict(model)["wte.weight"]
    w = {"root": root, "good": good}
    w["nan"] = tampered(model, root / "nan", test_data, tensors={"h.1.mlp.c_fc.weight": torch.full((64, 256), NAN)})
    inf_row = wte.clone().index_fill_(0, torch.tensor([7]), INF)
    w["inf"] = tampered(model, root / "inf", test_data, tensors={"wte.weight": inf_row})
    int_gain = torch.ones(64, dtype=torch.int32)
    w["int"] = tampered(model, root / "int", test_data, tensors={"h.0.ln_1.weight": int_gain})
    w["noconfig"] = tampered(model, root / "noconfig", test_data, with_config=False)
    w["eps-neg"] = tampered(model, root / "eps-neg", test_data, config={"layer_norm_epsilon": -1e-5})
    w["eps-nan"] = tampered(model, root / "eps-nan", test_data, config={"layer_norm_epsilon": NAN})
    w["eps-str"] = tampered(model, root / "eps-str", test_data, config={"layer_norm_epsilon": "1e-5"})
    w["head-str"] = tampered(model, root / "head-str", test_data, config={"n_head": "2"})
    w["layer-bool"] = tampered(model, root / "layer-bool", test_data, config={"n_layer": True})
    w["drop-2"] = tampered(model, root / "drop-2", test_data, config={"resid_pdrop": 2.0})
    small = random_hf_model(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=1000, seed=6)
    w["small-vocab"] = tokenizer_files(write_official_layout(small, root / "small-vocab"), test_data)
    # tokenizer files present but wrong (issue 20 A): never replaced by GPT-2's without a word
    for name, vocab, merges in _damaged_tokenizers(test_data):
        w[name] = shutil.copytree(good, root / name)
        for file, content in (("vocab.json", vocab), ("merges.txt", merges)):
            if content is None:
                (w[name] / file).unlink()
            elif content is not True:
                (w[name] / file).write_bytes(content)
    w["grown"], w["grown-bare"], w["grown-cut"] = _grown(root, test_data)
    w["huge-layers"] = tampered(model, root / "huge-layers", test_data, config={"n_layer": 10_000_000})
    w["wide"] = tampered(model, root / "wide", test_data, config={"n_embd": 1 << 20, "n_head": 1 << 14})
    nan_file = root / "nan.safetensors"
    shutil.copyfile(w["nan"] / "model.safetensors", nan_file)
    w["nan-file"] = nan_file
    (root / "text.txt").write_text("天气很好。今天的天气不错。\n\n" * 50, encoding="utf-8")
    (root / "prompt.txt").write_text("你好", encoding="utf-8")
    (root / "a-file").write_text("not a folder")
    (root / "readonly").mkdir()
    (root / "exists.json").write_text("{}")
    # --out folders that are not runs (issue 20 E): the user's own texts, even with a step-000001/ of theirs
    (root / "my-texts" / "step-000001").mkdir(parents=True)
    (root / "my-texts" / "chapter.txt").write_text("第一回\n", encoding="utf-8")
    (root / "my-texts" / "step-000001" / "notes.md").write_text("mine")
    # run.json damaged in the ways a resume used to crash on (issue 20 B)
    for name, args in {"args-list": [1, 2], "args-lr-text": {"lr": "fast"}, "args-batch-0": {"batch_size": 0},
                       "args-data-number": {"data": 5}}.items():  # fmt: skip
        (root / f"run-{name}").mkdir()
        (root / f"run-{name}" / "run.json").write_text(json.dumps({"args": args}))
    # JSON that json.loads fails on with RecursionError or a plain ValueError, not JSONDecodeError (attacks)
    deep, huge = "[" * 100_000, '{"args": {"steps": ' + "9" * 5000 + "}}"
    for name, content in {"deeply-nested": '{"args": ' + deep, "huge-int": huge}.items():
        (root / f"run-{name}").mkdir()
        (root / f"run-{name}" / "run.json").write_text(content)
    # issue 31 C: values read back from run.json that a typed option could never hold
    damage = {"sample-tokens-huge": {"sample_tokens": 10**9}, "prompt-surrogate": {"sample_prompt": ["a\ud800"]}}
    for name, args in damage.items():
        (root / f"run-{name}").mkdir()
        (root / f"run-{name}" / "run.json").write_text(json.dumps({"args": {"data": ["x.txt"], **args}}))
    os.mkfifo(root / "fifo.html")  # an output path that is not a regular file (issue 31 C8)
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text("天气很好。\n" * 50, encoding="utf-8")
    (root / "mixed" / "b.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    w["deep-config"] = tampered(model, root / "deep-config", test_data)
    (w["deep-config"] / "config.json").write_text(deep)
    rows = root / "rows"  # --data in other containers, broken (issue 21)
    rows.mkdir()
    good_row = '{"text": "天气很好。今天的天气不错。"}\n'
    (rows / "bad.jsonl").write_text(good_row * 3 + '{"text": "x"\n', encoding="utf-8")
    (rows / "field.jsonl").write_text(good_row + '{"body": "x"}\n', encoding="utf-8")
    (rows / "number.jsonl").write_text('{"text": 12}\n', encoding="utf-8")
    (rows / "empty.jsonl").write_text("\n", encoding="utf-8")
    (rows / "blank.txt").write_text("\n\n  \n", encoding="utf-8")
    (rows / "one-char.txt").write_text("好", encoding="utf-8")
    (rows / "crlf-only.txt").write_bytes(b"\r\n" * 100)
    (rows / "nul.txt").write_bytes("今天".encode() * 500 + b"\x00" * 100)
    (rows / "rows.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    (rows / "cut.parquet").write_bytes(b"PAR1" + b"\x00" * 20)
    packed = gzip.compress(good_row.encode() * 2000)
    (rows / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (rows / "lonely.parquet").mkdir()  # a folder named like a file
    run = root / "run"  # a training run: its final checkpoint and its log
    shutil.copytree(good, run / "final")
    (run / "log.jsonl").write_text(
        json.dumps({"type": "eval", "step": 0, "set": "val", "loss": 10.8, "bpc": 30.1}) + "\n"
    )
    w["run"] = run
    return w


def _damaged_tokenizers(test_data: Path):
    """(name, vocab.json bytes, merges.txt bytes) of damaged pairs; None: the file deleted, True: kept."""
    vocab = json.loads((test_data / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    merges = (test_data / "gpt2" / "merges.txt").read_text(encoding="utf-8").splitlines()
    past = dict(vocab, **{"<|endoftext|>": 60_000})  # an id the 50,257-row model does not have
    return [
        ("tok-garbage", b"\x8b\x00 not json at all", True),
        ("tok-list", b"[1, 2, 3]", True),
        ("tok-one-merge", True, "\n".join(merges[:2]).encode()),
        ("tok-id-past", json.dumps(past).encode(), True),
        ("tok-no-merges", True, None),
    ]


def _grown(root: Path, test_data: Path) -> tuple[Path, Path, Path]:
    """A checkpoint whose vocabulary was grown by 8 merges (as --extend-vocab does) with its own
    tokenizer files; a copy without them; a copy whose merges.txt lost its new merges."""
    from minigpt2.io.bpe import learn_merges
    from minigpt2.io.tokenizer import encoding_from_files
    from minigpt2.training.vocab import write_tokenizer_files

    gpt2 = test_data / "gpt2"
    enc = encoding_from_files(gpt2 / "vocab.json", gpt2 / "merges.txt")
    merges = learn_merges(["天气很好。今天的天气不错。" * 20], enc, 8)
    model = random_hf_model(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=50257 + 8, seed=7)
    grown = write_official_layout(model, root / "grown")
    write_tokenizer_files(grown, gpt2 / "vocab.json", gpt2 / "merges.txt", merges)
    bare = shutil.copytree(grown, root / "grown-bare")
    for name in ("vocab.json", "merges.txt"):
        (bare / name).unlink()
    cut = shutil.copytree(grown, root / "grown-cut")
    shutil.copyfile(gpt2 / "merges.txt", cut / "merges.txt")  # the base merges only: 8 tokens unexplained
    return grown, bare, cut


def rows(w):
    """(name, script, args, culprit, extra env): every bad input and the text that must name it."""
    r, good, text = w["root"], str(w["good"]), str(w["root"] / "text.txt")
    sample = [  # sampling options: refused while parsing, before a model is loaded
        ("temperature nan", ["hi", "--temperature", "nan"], "--temperature"),
        ("temperature inf", ["hi", "--temperature", "inf"], "--temperature"),
        ("temperature -1", ["hi", "--temperature", "-1"], "--temperature must be 0 or more"),
        ("temperature 1e-30", ["hi", "--temperature", "1e-30"], "--temperature"),
        ("temperature word", ["hi", "--temperature", "hot"], "--temperature must be a number"),
        ("top-p nan", ["hi", "--top-p", "nan"], "--top-p"),
        ("top-p 0", ["hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        ("top-p 2", ["hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
        ("top-k -1", ["hi", "--top-k", "-1"], "--top-k"),
        ("top-k 1.5", ["hi", "--top-k", "1.5"], "--top-k must be an integer"),
        ("repetition penalty nan", ["hi", "--repetition-penalty", "nan"], "--repetition-penalty"),
        ("repetition penalty 0", ["hi", "--repetition-penalty", "0"], "--repetition-penalty"),
        ("repetition penalty -inf", ["hi", "--repetition-penalty", "-inf"], "--repetition-penalty"),
        ("num-samples 0", ["hi", "--num-samples", "0"], "--num-samples"),
        ("num-samples -2", ["hi", "--num-samples", "-2"], "--num-samples"),
        ("max-new-tokens -1", ["hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
        ("seed -1", ["hi", "--seed", "-1"], "--seed"),
        ("seed 2**64", ["hi", "--seed", str(2**64)], "--seed"),
        ("max-new-tokens 100 million", ["hi", "--max-new-tokens", "100000000"], "--max-new-tokens"),
        ("prompt file with NUL bytes", ["--prompt-file", str(r / "rows" / "nul.txt")], "binary file"),
        ("unknown option", ["hi", "--temprature", "1"], "--temprature"),
        ("dtype", ["hi", "--dtype", "float8"], "--dtype"),
        # checkpoints trusted too far
        ("NaN weights", ["hi", "--model", str(w["nan"])], "h.1.mlp.c_fc.weight"),
        ("NaN weights, bare file", ["hi", "--model", str(w["nan-file"])], "non-finite"),
        ("inf weights", ["hi", "--model", str(w["inf"])], "wte.weight"),
        ("integer tensor", ["hi", "--model", str(w["int"])], "h.0.ln_1.weight holds int32"),
        ("directory without config.json", ["hi", "--model", str(w["noconfig"])], "no config.json"),
        ("negative layer_norm_epsilon", ["hi", "--model", str(w["eps-neg"])], "layer_norm_epsilon"),
        ("NaN layer_norm_epsilon", ["hi", "--model", str(w["eps-nan"])], "layer_norm_epsilon"),
        ("string layer_norm_epsilon", ["hi", "--model", str(w["eps-str"])], "layer_norm_epsilon"),
        ("string n_head", ["hi", "--model", str(w["head-str"])], "n_head"),
        ("boolean n_layer", ["hi", "--model", str(w["layer-bool"])], "n_layer"),
        ("dropout 2 in config.json", ["hi", "--model", str(w["drop-2"])], "resid_pdrop"),
        ("config.json nested 100,000 deep", ["hi", "--model", str(w["deep-config"])], "nested too deeply"),
        ("vocabulary smaller than the tokenizer's", ["hi", "--model", str(w["small-vocab"])], "vocabulary of 1000"),
        ("a file where a checkpoint folder should be", ["hi", "--model", str(r / "a-file")], "a-file"),
        ("prompt file is a folder", ["--prompt-file", str(r), "--model", good], "prompt file"),
        ("prompt file is an endless device", ["--prompt-file", "/dev/zero", "--model", good], "not a regular file"),
        ("prompt file /dev/null-like missing", ["--prompt-file", str(r / "gone.txt"), "--model", good], "gone.txt"),
        ("samples that cannot fit in memory", ["hi", "--model", good, "--num-samples", str(10**8)], "--num-samples"),
        ("unknown device", ["hi", "--model", good, "--device", "tpu"], "device"),
        # tokenizer files that do not belong (issue 20 A)
        ("garbage vocab.json", ["hi", "--model", str(w["tok-garbage"])], "tok-garbage/vocab.json"),
        ("vocab.json not an object", ["hi", "--model", str(w["tok-list"])], "tok-list/vocab.json"),
        ("merges.txt cut to one merge", ["hi", "--model", str(w["tok-one-merge"])], "tok-one-merge/merges.txt"),
        ("vocab.json id past the model's", ["hi", "--model", str(w["tok-id-past"])], "past the model's vocabulary"),
        ("merges.txt deleted", ["hi", "--model", str(w["tok-no-merges"])], "tok-no-merges/merges.txt' is missing"),
        ("grown model without its tokenizer", ["hi", "--model", str(w["grown-bare"])], "was grown"),
        ("grown model, merges.txt damaged", ["hi", "--model", str(w["grown-cut"])], "grown-cut/merges.txt"),
        # sizes checked against the tensors before anything is built (issue 20 D)
        ("config.json n_layer 10000000", ["hi", "--model", str(w["huge-layers"])], "n_layer 10000000"),
        ("config.json n_embd 2**20", ["hi", "--model", str(w["wide"])], "n_embd 1048576"),
    ]
    compare = [
        ("compare: top -1", [good, good, "--top", "-1"], "--top"),
        (
            "compare: --html onto a FIFO, forced",
            [good, good, "--html", str(r / "fifo.html"), "--force"],
            "is not a regular file",
        ),  # fmt: skip
        ("compare: sample-tokens a billion", [good, good, "--sample-tokens", str(10**9)], "--sample-tokens"),
        (
            "compare: a prompt that is not UTF-8",
            [good, good, "--prompt", "\udcff", "--html", str(r / "p.html")],
            "--prompt is not valid UTF-8",
        ),  # fmt: skip
        ("compare: empty prompt", [good, good, "--prompt", " "], "--prompt is empty"),
        (
            "compare: a one-character text",
            [good, good, "--text", str(r / "rows" / "one-char.txt")],
            "too little to measure anything",
        ),
        (
            "compare: a text of line ends",
            [good, good, "--text", str(r / "rows" / "crlf-only.txt")],
            "holds only blank lines and spaces",
        ),
        ("compare: a text with NUL bytes", [good, good, "--text", str(r / "rows" / "nul.txt")], "binary file"),
        ("compare: plot not a .png", [good, good, "--plot", str(r / "plot.txt")], "ending in .png"),
        ("compare: revision of local models", [good, good, "--revision", "v2"], "drop --revision"),
        ("compare: max-eval-tokens 0", [good, good, "--max-eval-tokens", "0"], "--max-eval-tokens"),
        ("compare: max-eval-tokens nan", [good, good, "--max-eval-tokens", "nan"], "--max-eval-tokens"),
        ("compare: NaN weights in B", [good, str(w["nan"])], "h.1.mlp.c_fc.weight"),
        ("compare: inf weights in A", [str(w["inf"]), good], "wte.weight"),
        ("compare: integer tensor", [good, str(w["int"])], "int32"),
        ("compare: no config.json", [good, str(w["noconfig"])], "no config.json"),
        ("compare: bad config field", [str(w["eps-neg"]), good], "layer_norm_epsilon"),
        ("compare: json into a missing folder", [good, good, "--json", str(r / "nowhere" / "x.json")], "nowhere"),
        ("compare: json under a file", [good, good, "--json", str(r / "a-file" / "x.json")], "a-file"),
        ("compare: json exists", [good, good, "--json", str(r / "exists.json")], "--force"),
        ("compare: json is a folder", [good, good, "--json", str(r / "readonly")], "is a directory"),
        ("compare: plot into a missing folder", [good, good, "--plot", str(r / "nowhere" / "p.png")], "nowhere"),
        ("compare: text is an endless device", [good, good, "--text", "/dev/zero"], "not a regular file"),
        ("compare: text is /dev/null's cousin, a folder", [good, good, "--text", str(r)], "text file"),
        ("compare: missing model", [good, str(r / "gone")], "gone"),
        ("compare: grown B without its tokenizer", [good, str(w["grown-bare"]), "--text", text], "was grown"),
        ("compare: grown B, merges damaged", [good, str(w["grown-cut"]), "--text", text], "grown-cut/merges.txt"),
        ("compare: garbage vocab.json in A", [str(w["tok-garbage"]), good, "--text", text], "vocab.json"),
        ("compare: garbage vocab.json in B, weights only", [good, str(w["tok-garbage"])], "vocab.json"),
        ("compare: n_layer 10000000", [good, str(w["huge-layers"])], "n_layer 10000000"),
        ("compare: window 0", [good, good, "--text", text, "--window", "0"], "--window"),
        ("compare: window past the context", [good, good, "--text", text, "--window", "64"], "--window is 64"),
        # an output never replaces an input of the same command, even with --force
        *[
            (
                f"compare: {what} is an input, with --force",
                [good, str(w["run"]), "--text", text, flag, path, "--force"],
                "one of this command's inputs",
            )
            for what, flag, path in [
                ("json onto B's config.json", "--json", str(w["run"] / "final" / "config.json")),
                ("json onto A's weights", "--json", str(Path(good) / "model.safetensors")),
                ("html onto A's vocab.json", "--html", str(Path(good) / "vocab.json")),
                ("json onto the run's log", "--json", str(w["run"] / "log.jsonl")),
                ("json onto the --text file", "--json", text),
            ]
        ],  # fmt: skip
        (
            "compare: plot onto A's vocab.json, with --force",
            [good, good, "--plot", str(Path(good) / "vocab.json"), "--force"],
            "ending in .png",
        ),
        (
            "compare: json and plot the same file",
            [good, good, "--json", str(r / "o.png"), "--plot", str(r / "o.png")],
            "--json and --plot both name",
        ),  # fmt: skip
    ]
    data = [
        "--data",
        text,
        "--init-preset",
        "gpt2",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--context",
        "16",
        "--tokenizer",
        good,
        "--cache-dir",
        str(r / "token-cache"),
        "--device",
        "cpu",
    ]
    train = [
        (f"train: {flag} {value}", [*data, flag, value], flag)
        for flag, value in [
            ("--lr", "nan"),
            ("--lr", "inf"),
            ("--lr", "0"),
            ("--min-lr", "nan"),
            ("--min-lr", "-1"),
            ("--weight-decay", "nan"),
            ("--grad-clip", "nan"),
            ("--grad-clip", "-1"),
            ("--seed", "-1"),
            ("--log-every", "0"),
            ("--dropout", "2"),
            ("--dropout", "nan"),
            ("--save-every", "-1"),
            ("--eval-every", "-1"),
            ("--snapshot-every", "-1"),
            ("--seq-len", "0"),
            ("--batch-size", "0"),
            ("--steps", "0"),
            ("--warmup", "-1"),
            ("--eval-tokens", "0"),
            ("--val-fraction", "1"),
            ("--val-fraction", "nan"),
            ("--epochs", "nan"),
            ("--epochs", "0"),
            ("--tokens", "inf"),
            ("--grad-accum", "0"),
            ("--n-layer", "0"),
            ("--context", "-4"),
            ("--steps", "1e3"),
        ]
    ] + [
        ("train: --data /dev/null", ["--data", os.devnull, *data[2:]], "not a regular file"),
        ("train: --drop-lines . leaves only blank lines", [*data, "--drop-lines", "."], "nothing is left"),
    ]
    train += [
        ("train: --vocab-from without --extend-vocab", [*data, "--vocab-from", text], "--vocab-from only says where"),
        ("train: --val-fraction with --val-data", [*data, "--val-data", text, "--val-fraction", "0.1"],
         "--val-fraction holds out a share"),
        ("train: --batch-size that cannot fit in memory", [*data, "--batch-size", "10000000"],
         "--batch-size 10000000 at sequence length 16 needs at least"),
    ]  # fmt: skip
    train += [
        (" ".join(["train: --data", name, *extra]), ["--data", str(r / "rows" / name), *data[2:], *extra], needle)
        for name, extra, needle in [
            ("bad.jsonl", [], "bad.jsonl' line 4 is not valid JSON"),
            ("field.jsonl", [], "line 2 has no field 'text' (its fields: 'body'); choose the field with --text-field"),
            ("field.jsonl", ["--text-field", "body"], "line 1 has no field 'body'"),
            ("number.jsonl", [], "line 1: the field 'text' holds a number, not text"),
            ("empty.jsonl", [], "empty.jsonl' holds no rows"),
            ("blank.txt", [], "blank.txt' holds no text, only blank lines"),
            ("one-char.txt", [], "one-char.txt' is only 3 token(s) long: too little to learn from"),
            ("rows.csv", [], "no column 'text' (its header: 'id', 'body')"),
            ("cut.parquet", [], "cut.parquet' cannot be read as Parquet"),
            ("cut.jsonl.gz", [], "cut.jsonl.gz' is not a valid gzip stream"),
            ("lonely.parquet", [], "holds no .txt files"),
        ]
    ] + [
        ("train: --text-field ''", [*data, "--text-field", ""], "--text-field must name a field"),
        ("train: --eval-data of one character", [*data, "--eval-data", str(r / "rows" / "one-char.txt")],
         "--eval-data '" + str(r / "rows" / "one-char.txt") + "' is only 3 token(s) long"),
        ("train: --data hf:missing folder", ["--data", f"hf:{r / 'gone'}", *data[2:]], "does not exist"),
        ("train: --data hf:not cached", ["--data", "hf:someone/nothing-here", *data[2:]], "someone/nothing-here"),
        ("train: --eval-data bad row", [*data, "--eval-data", str(r / "rows" / "number.jsonl")], "number.jsonl"),
        ("train: --sample-tokens a billion", [*data, "--sample-tokens", str(10**9)], "--sample-tokens"),
        ("train: --sample-prompt not UTF-8", [*data, "--sample-prompt", "\udcff\udcfe"], "is not valid UTF-8"),
        ("train: --text-field with only .txt data", [*data, "--text-field", "body"], "--text-field names the field"),
        ("train: --data hf:a/b@", ["--data", "hf:a/b@", *data[2:]], "names no split after '@'"),
        ("train: --data a folder of .txt and .jsonl", ["--data", str(r / "mixed"), *data[2:]], "also .jsonl files"),
    ]  # fmt: skip
    out_rows = [  # --out judged before anything is written into it: nothing created, not even .lock
        ("train: --out is empty (an unset shell variable)", [*data, "--out", ""], "is empty"),
        ("train: --out is a checkpoint folder", [*data, "--out", good], "holds a model checkpoint"),
        ("train: --out is the user's folder with a step-000001/", [*data, "--out", str(r / "my-texts")],
         "holds files that are not a training run's (chapter.txt, step-000001)"),
        ("train: --out is a folder of the user's files", [*data, "--out", str(r)], "is not a training run"),
        ("train: --resume into a checkpoint folder", [*data, "--out", good, "--resume"], "holds a model checkpoint"),
    ] + [
        (f"train: --resume with run.json {name}", ["--out", str(r / f"run-{name}"), "--resume"], "run.json' is damaged")
        for name in ("args-list", "args-lr-text", "args-batch-0", "args-data-number")
    ] + [
        ("train: --resume with run.json nested 100,000 deep", ["--out", str(r / "run-deeply-nested"), "--resume"],
         "nested too deeply"),
        ("train: --resume with a 5000-digit integer in run.json", ["--out", str(r / "run-huge-int"), "--resume"],
         "run.json"),
        ("train: --resume with sample_tokens a billion in run.json", ["--out", str(r / "run-sample-tokens-huge"),
         "--resume"], '"args"."sample_tokens" must be an integer in [0, 1000000]'),
        ("train: --resume with a lone surrogate in run.json", ["--out", str(r / "run-prompt-surrogate"), "--resume"],
         '"args"."sample_prompt" holds the escape \\ud800'),
        ("train: --tensorboard inside --out", [*data, "--tensorboard", str(r / "runs" / "tb-inside" / "tb"), "--out",
         str(r / "runs" / "tb-inside")], "is inside the run folder"),
    ]  # fmt: skip
    train += [
        ("train: --tokenizer missing folder", [*data, "--tokenizer", str(r / "no-such-dir")], "no-such-dir"),
    ] + [
        (f"train: --model {name}", ["--data", text, "--model", str(w[name]), *data[14:]], needle)
        for name, needle in [
            ("tok-garbage", "tok-garbage/vocab.json"),
            ("tok-one-merge", "tok-one-merge/merges.txt"),
            ("tok-id-past", "past the model's vocabulary"),
            ("grown-bare", "was grown"),
            ("grown-cut", "grown-cut/merges.txt"),
            ("huge-layers", "n_layer 10000000"),
        ]
    ]
    offline = {"HF_HOME": str(r / "empty-hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    return (
        [(name, "sample.py", args, needle, {}) for name, args, needle in sample]
        + [
            (
                "no network, no cache: fails fast",
                "sample.py",
                ["hi", "--model", "gpt2"],
                "could not be reached",
                offline,
            )
        ]
        + [(name, "compare.py", args, needle, {}) for name, args, needle in compare]
        + [
            (name, "train.py", [*args, "--out", str(r / "runs" / name.replace(" ", "_"))], needle, {})
            for name, args, needle in train
        ]
        + [(name, "train.py", args, needle, {}) for name, args, needle in out_rows]
    )


# ----- running them ---------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "token-cache" not in p.parts
    }


@pytest.mark.slow
def test_every_bad_input_is_one_clear_error_line(world, hf_home):
    table = rows(world)
    assert len(table) >= 60
    before = tree_digest(world["root"])
    failures = []

    def run(row):
        return run_script(row[1], *row[2], env=offline_env(hf_home, **row[4]), timeout=180)

    with ThreadPoolExecutor(PARALLEL) as pool:
        for (name, script, _, needle, _), result in zip(table, pool.map(run, table)):
            stderr = result.stderr
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            problems = []
            if result.returncode == 0:
                problems.append("exit status 0")
            if "Traceback" in stderr:
                problems.append("a traceback")
            if len(errors) != 1:
                problems.append(f"{len(errors)} error: lines")
            elif needle not in errors[0]:
                problems.append(f"{needle!r} not in the error line")
            if problems:
                failures.append(f"{name} ({script}): {', '.join(problems)}\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert tree_digest(world["root"]) == before  # nothing that was there changed
    assert (world["root"] / "fifo.html").is_fifo()  # not replaced by a file, --force or not


@pytest.mark.slow
def test_no_network_fails_in_seconds(world):
    import time

    env = {"HF_HOME": str(world["root"] / "empty-hf-2"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    began = time.monotonic()
    proc = start_script("sample.py", "hi", "--model", "gpt2", env=offline_env(world["root"] / "empty-hf-2", **env))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.monotonic() - began < 20, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [stderr.strip()], stderr  # one line, no retries


@pytest.mark.slow
def test_closed_pipe_ends_quietly(world, hf_home):
    """`sample.py ... | head -c 10`: the reader leaves early; no traceback, no 'Exception ignored'."""
    cmd = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'sample.py'))} '' "
        f"--model {shlex.quote(str(world['good']))} --max-new-tokens 2000 --no-utf8-guard | head -c 10"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode in (0, 141), proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert len(proc.stdout.encode()) == 10


# ----- valid but unusual inputs that must work ------------------------------------------------


@pytest.mark.slow
def test_unusual_but_valid_inputs_work(world, hf_home, test_data):
    from transformers import GPT2LMHeadModel

    r = world["root"] / "unusual"
    r.mkdir()
    model = GPT2LMHeadModel.from_pretrained(world["good"])
    half = tokenizer_files(write_official_layout(model.half(), r / "float16"), test_data)
    bf16 = tokenizer_files(write_official_layout(model.float().to(torch.bfloat16), r / "bfloat16"), test_data)
    model.float().save_pretrained(r / "save_pretrained")
    tokenizer_files(r / "save_pretrained", test_data)
    spaced = shutil.copytree(world["good"], r / "with spaces 和汉字")
    long_prompt = r / "long prompt.txt"
    long_prompt.write_text("天气很好。" * 40, encoding="utf-8")  # > 32 tokens: longer than the context
    bare = r / "bare 模型.safetensors"
    shutil.copyfile(world["good"] / "model.safetensors", bare)
    cases = {
        "float16": ["hi", "--model", half],
        "bfloat16": ["hi", "--model", bf16],
        "save_pretrained": ["hi", "--model", r / "save_pretrained"],
        "spaces and CJK": ["你好", "--model", spaced],
        "long prompt": ["--prompt-file", long_prompt, "--model", world["good"]],
        "bare file, shape inferred": ["hi", "--model", bare],
    }
    procs = {
        name: start_script("sample.py", *args, "--max-new-tokens", "4", "--seed", "0", env=offline_env(hf_home))
        for name, args in cases.items()
    }
    results = {name: (proc, *proc.communicate(timeout=180)) for name, proc in procs.items()}
    for name, (proc, stdout, stderr) in results.items():
        assert proc.returncode == 0, f"{name}: {stderr}"
        assert "[4 tokens" in stdout, f"{name}: {stdout}"
        assert "error:" not in stderr and "Traceback" not in stderr, f"{name}: {stderr}"
    assert "longer than the 32-token context" in results["long prompt"][2]
    assert "shape was inferred" in results["bare file, shape inferred"][2]
    # no tokenizer files beside it and GPT-2's vocabulary: GPT-2's tokenizer, said once (issue 20 A)
    notes = [
        line
        for line in results["bare file, shape inferred"][2].splitlines()
        if line.startswith("note:") and "tokenizer" in line
    ]
    assert len(notes) == 1 and "using GPT-2's own tokenizer" in notes[0], notes
    assert not any(line.startswith("note:") for line in results["spaces and CJK"][2].splitlines())


@pytest.mark.slow
def test_a_cache_entry_copied_over_another_corpus_is_rebuilt(tmp_path, test_data, hf_home):
    """Issue 20 H: an entry copied over another corpus's key (same name, other tokens) is never
    used for it: the run says so and tokenizes its own text again."""
    cache = tmp_path / "cache"
    texts = {"zh": "天气很好。今天的天气不错。\n\n" * 60, "en": "The weather is fine today.\n\n" * 60}
    args = ["--init-preset", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context", "16",
            "--steps", "1", "--tokenizer", test_data / "gpt2", "--cache-dir", cache, "--device", "cpu"]  # fmt: skip

    def train(name: str, out: str):
        (tmp_path / f"{name}.txt").write_text(texts[name], encoding="utf-8")
        proc = start_script("train.py", "--data", tmp_path / f"{name}.txt", *args, "--out", tmp_path / out,
                            env=offline_env(hf_home))  # fmt: skip
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        return stdout + stderr

    train("en", "run-en")
    (en_entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    first = train("zh", "run-zh")
    (zh_entry,) = [p for p in cache.iterdir() if not p.name.startswith(".") and p != en_entry]
    shutil.rmtree(zh_entry)
    shutil.copytree(en_entry, zh_entry)  # the English tokens under the Chinese corpus's key
    again = train("zh", "run-zh-2")
    assert "could not be trusted (it was built from other input (en.txt)" in again, again
    tokens = [line for line in (first + again).splitlines() if line.startswith("data:")]
    assert len(tokens) == 2 and tokens[0].split(" tokens")[0] == tokens[1].split(" tokens")[0], tokens  # zh's own
    assert json.loads((zh_entry / "meta.json").read_text())["files"] == [str(tmp_path / "zh.txt")]


# ----- the scripts' boundary: closed streams, narrow encodings, Ctrl-C at any moment ----------


@pytest.mark.slow
def test_the_boundary_holds_for_streams_and_ctrl_c(world, hf_home):
    """A closed stdout, an ASCII-only or C locale output, and Ctrl-C while Python imports torch:
    the work goes on (or stops) with one line, never a traceback."""
    good = str(world["good"])
    sample = [sys.executable, str(ROOT / "sample.py"), "你好·", "--model", good, "--max-new-tokens", "3", "--seed", "0"]
    c_env = {k: v for k, v in offline_env(hf_home, LC_ALL="C", LANG="C").items() if k != "PYTHONIOENCODING"}
    runs = {  # four fresh interpreters (what Python sets up as it starts is the point), side by side
        "closed": (["bash", "-c", shlex.join([sys.executable, str(ROOT / "compare.py"), good, good, "--json",
                                              str(world["root"] / "closed.json")]) + " >&-"],
                   offline_env(hf_home)),  # compare.py ... >&-
        "ascii": (sample, offline_env(hf_home, PYTHONIOENCODING="ascii")),
        "C locale": (sample, c_env),
        # C locale with UTF-8 mode off: ASCII output with surrogateescape, and the prompt arrives as
        # escaped bytes; it must still be read as 你好 (the header shows it escaped, \\u4f60\\u597d)
        "strict C": (sample, {**c_env, "PYTHONUTF8": "0"}),
    }  # fmt: skip
    started = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
               for name, (argv, env) in runs.items()}  # fmt: skip
    done = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in started.items()}

    (stdout, stderr), code = done["closed"]
    assert code == 0 and b"Traceback" not in stderr, stderr
    assert b"standard output is closed" in stderr and (world["root"] / "closed.json").is_file()
    (stdout, stderr), code = done["ascii"]
    stdout, stderr = stdout.decode("ascii"), stderr.decode("ascii")  # ASCII it must be
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "\\u4f60\\u597d\\xb7" in stdout and stderr.count("cannot show some characters") == 1, stderr
    (stdout, stderr), code = done["C locale"]
    assert code == 0 and b"Traceback" not in stderr, stderr
    assert "你好" in stdout.decode("utf-8", errors="replace") or b"\\u4f60" in stdout
    (stdout, stderr), code = done["strict C"]
    assert code == 0 and b"Traceback" not in stderr, stderr
    assert b"\\u4f60\\u597d\\xb7" in stdout, stdout


def _importing_torch(proc: subprocess.Popen) -> bool:
    """torch's shared library is mapped: the process is inside `import torch`, or past it."""
    try:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample.py", "compare.py", "train.py"])
def test_ctrl_c_while_importing_prints_interrupted(world, hf_home, script):
    """Ctrl-C as soon as torch's library is mapped, and 0.3 s later, deep in `import torch` (~2 s
    on an idle machine): what a user who regrets the command at once meets. (Python's own start,
    before the script's first line, is out of the script's reach.)"""
    import signal
    import time

    good, out = str(world["good"]), world["root"] / f"ctrl-c-{script}"
    args = {"sample.py": ["hi", "--model", good], "compare.py": [good, good],
            "train.py": ["--data", world["root"] / "text.txt", "--model", good, "--out", out]}  # fmt: skip
    for later in (0.0, 0.3):
        proc = start_script(script, *args[script], env=offline_env(hf_home), fresh=True)
        deadline = time.monotonic() + 60
        while not _importing_torch(proc) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(later)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr
        assert not out.exists() or not list(out.glob("step-*"))  # nothing trained, nothing half saved
    # `kill` (SIGTERM) or a closed terminal (SIGHUP) at the same moment: one line, exit 128+N
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = start_script(script, *args[script], env=offline_env(hf_home), fresh=True)
        deadline = time.monotonic() + 60
        while not _importing_torch(proc) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        said = f"stopped by {sig.name} while starting (nothing was written)"
        assert proc.returncode == 128 + sig and stderr.strip() == said, (proc.returncode, stderr)
        assert not out.exists() or not list(out.glob("step-*"))


@pytest.mark.slow
def test_sigterm_while_sampling_stops_like_ctrl_c(world, hf_home):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) while sample.py decodes: one line, 128+N."""
    import signal
    import time

    args = ["hi", "--model", str(world["good"]), "--max-new-tokens", "1000000", "--no-cache", "--seed", "0"]
    started = {sig: start_script("sample.py", *args, env=offline_env(hf_home), fresh=True)  # side by side
               for sig in (signal.SIGTERM, signal.SIGHUP)}  # fmt: skip
    for sig, proc in started.items():
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # until the sample has started
            line = proc.stdout.readline()
            if line.startswith("==="):
                break
        time.sleep(0.5)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig and "Traceback" not in stderr, (proc.returncode, stderr)
        assert stderr.strip().endswith(f"stopped by {sig.name}"), stderr


@pytest.mark.slow
def test_a_damaged_log_costs_its_lines_not_the_report(world, hf_home, tmp_path):
    """issue 31 C3: records that are valid JSON of the wrong shape are left out, named in one note."""
    run = shutil.copytree(world["run"], tmp_path / "run")
    good = [
        {"type": "train", "step": 1, "loss": 10.0},
        {"type": "eval", "step": 1, "set": "val", "loss": 9.0, "bpc": 3},
    ]
    bad = [{"type": "train", "step": 2}, {"type": "eval", "step": 2, "loss": 9.0},
           {"type": "samples", "step": "3", "samples": []}, {"type": "samples", "step": 3, "samples": "x"},
           {"type": "train", "step": 4, "loss": "1"}]  # fmt: skip
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "[1]\n{cut")
    (run / "snapshots.jsonl").write_text('{"step": 1, "weights": {"wte.weight": "x"}}\n{"step": "2"}\n')
    result = run_script("compare.py", world["good"], run, "--html", tmp_path / "r.html", "--json",
                        tmp_path / "r.json", env=offline_env(hf_home), timeout=180)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "note: log.jsonl: lines 3, 4, 5, 6, 7, 8 left out" in result.stdout, result.stdout
    assert "note: snapshots.jsonl: lines 1, 2 left out" in result.stdout
    curves = json.loads((tmp_path / "r.json").read_text())["runs"][0]["curves"]
    assert [p["step"] for p in curves["train"]] == [1] and list(curves["eval"]) == ["val"]
    assert "lines 3, 4, 5, 6, 7, 8 left out" in (tmp_path / "r.html").read_text()
    for targets in (5, [1, 2]):  # a LoRA run's final/adapter/adapter_config.json, damaged
        (run / "final" / "adapter").mkdir(exist_ok=True)
        (run / "final" / "adapter" / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
        refused = run_script("compare.py", world["good"], run / "final", env=offline_env(hf_home), timeout=180)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("error:") and '"target_modules" is ' in refused.stderr, refused.stderr


EXIT_PATH = """
import atexit, os, sys, time
from minigpt2.cli import run_script, start_script
start_script()
def body():
    atexit.register(time.sleep, 30)  # an exit path that takes a while (threads joined, files closed)
    print("done", flush=True)
    return 0
sys.exit(run_script(body))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_on_the_exit_path_ends_the_script_in_one_line(sig):
    """issue 31 C7: the work is over; a signal while the process exits (an atexit callback) said
    "Exception ignored in atexit callback ... Stopped" and exited 0."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT_PATH], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "done\n"
    time.sleep(1.0)  # in the atexit callback by now
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 128 + sig, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr
    assert stderr.strip() == ("interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}")
