"""A trial of bad inputs and faults against the three scripts, as a new user and an attacker would try.

    python benchmarks/fault_trial.py                 # every case (~330), two at a time; ~15-30 min on 2 cores
    python benchmarks/fault_trial.py --only tok      # the cases whose name contains "tok"
    python benchmarks/fault_trial.py --list          # the case names

Every case is a real subprocess of `train.py`, `sample.py` or `compare.py` on files made here: a
tiny GPT-2-layout model in a throw-away Hugging Face cache (offline), a small Chinese corpus, a
tiny training run, and damaged copies of each. What a case expects is one of

    error    a non-zero exit with exactly one `error: ...` line on stderr and no traceback
    ok       exit 0
    signal   stopped by the signal it was sent: exit 128+N (130 for Ctrl-C), no traceback

and each case is judged:

    right        as expected
    traceback    a Python traceback reached the user
    silent       exit 0 where an error was expected (a silent wrong answer)
    unclear      failed, but not with one `error:` line (no message, or several)
    hang         still running at the time limit
    lost         a file the user had changed or vanished (every input is checksummed before and after)
    litter       a refused run left a folder or a .lock behind where there was none

The last line counts the verdicts. The case list is data (`cases()`): add a case there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHARED = Path(os.environ.get("MINIGPT2_SHARED_DATA", ROOT.parent / "shared" / "data"))
TIMEOUT = 180


@dataclass
class Case:
    name: str
    script: str
    args: list
    expect: str = "error"  # error | ok | signal
    prep: object = None  # callable(Path case_dir) run before, may return extra args
    send: tuple | None = None  # (signal, seconds after start)
    env: dict = field(default_factory=dict)
    stdout_closed: bool = False
    no_new: tuple = ()  # paths (relative to the case dir) that must not exist after a refusal
    says: str = ""  # an `ok` case must say this (stdout or stderr): e.g. that it fell back past damage
    follow: list | None = None  # then run the same script with these arguments: it must exit 0 (the folder is usable)


# ---------------------------------------------------------------------------------------------
# the fixtures: a model in a fake hub cache, a corpus, a run


def build_fixtures(base: Path) -> None:
    from checkpoints import populate_hub_cache, random_hf_model, write_official_layout

    model = random_hf_model(n_layer=2, n_head=2, n_embd=64, n_positions=64, seed=7)
    gpt2_files = {n: SHARED / "gpt2" / n for n in ("vocab.json", "merges.txt")}
    populate_hub_cache(base / "hf" / "hub", "openai-community/gpt2", model, extra_files=gpt2_files)
    ck = write_official_layout(model, base / "ck")
    for n, p in gpt2_files.items():
        shutil.copy(p, ck / n)
    text = (SHARED / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:60_000]
    (base / "corpus").mkdir()
    (base / "corpus" / "a.txt").write_text(text[:40_000], encoding="utf-8")
    (base / "corpus" / "b.txt").write_text(text[40_000:], encoding="utf-8")
    (base / "eval.txt").write_text((SHARED / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:5_000])
    (base / "en.txt").write_text((SHARED / "en" / "sherlock_holmes.txt").read_text(encoding="utf-8")[:5_000])
    run = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data",
        str(base / "corpus"),
        "--model",
        str(ck),
        "--out",
        str(base / "run"),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-tokens",
        "256",
        "--save-every",
        "2",
        "--cache-dir",
        str(base / "cache"),
    ]
    grown = [*run[:7], str(base / "grown"), *run[8:], "--extend-vocab", "40"]
    grownlora = [*run[:7], str(base / "grownlora"), *run[8:], "--extend-vocab", "40", "--lora", "2"]
    warm = [*run[:7], str(base / "warm"), *run[8:], "--extend-vocab", "40", "--embed-warmup", "2"]
    for command in (run, grown, grownlora, warm):
        result = subprocess.run(command, env=env_for(base), capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SystemExit(f"could not train a fixture run:\n{result.stderr}")


def env_for(base: Path, **extra) -> dict:
    env = {**os.environ, "HF_HOME": str(base / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    env["MINIGPT2_CACHE"] = str(base / "cache")
    return {**env, **extra}


# ---------------------------------------------------------------------------------------------
# damaging files


def truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write(path: Path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


def edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def copy_of(src: str, dst: str = "x"):
    """prep: copy fixture `src` into the case folder as `dst`, then the case damages it."""

    def prep(d: Path, fixtures: Path):
        target = d / dst
        if (fixtures / src).is_dir():
            shutil.copytree(fixtures / src, target)
        else:
            shutil.copy(fixtures / src, target)
        return target

    return prep


def then(prep, damage):
    def both(d: Path, fixtures: Path):
        target = prep(d, fixtures)
        damage(target)

    return both


# ---------------------------------------------------------------------------------------------
# the cases

HUGE_ARGS = '{"args": {"steps": ' + "9" * 5000 + "}}"  # past int()'s 4300-digit limit
BAD_NUMBERS = ["nan", "inf", "-5", "abc", "1e400"]
TRAIN_NUMBERS = [
    "--lr",
    "--min-lr",
    "--steps",
    "--batch-size",
    "--seq-len",
    "--grad-accum",
    "--warmup",
    "--weight-decay",
    "--grad-clip",
    "--seed",
    "--eval-every",
    "--eval-tokens",
    "--save-every",
    "--keep-last",
    "--dropout",
    "--val-fraction",
    "--threads",
    "--lora",
    "--extend-vocab",
]
SAMPLE_NUMBERS = [
    "--num-samples",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--repetition-penalty",
    "--seed",
    "--threads",
]
COMPARE_NUMBERS = ["--max-eval-tokens", "--top"]


def cases() -> list[Case]:
    C = []
    # {F} in an argument is the fixtures folder, {D} the case's own folder
    train_base = ["--data", "{F}/corpus", "--model", "{F}/ck", "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    train_base += ["--eval-tokens", "128", "--cache-dir", "{F}/cache"]

    # --- 1. every numeric option with values that are never right
    for flag in TRAIN_NUMBERS:
        for v in BAD_NUMBERS:
            C.append(
                Case(f"opt/train{flag}={v}", "train.py", [*train_base, "--out", "{D}/run", flag, v], no_new=("run",))
            )
    for flag in SAMPLE_NUMBERS:
        for v in BAD_NUMBERS:
            C.append(Case(f"opt/sample{flag}={v}", "sample.py", ["hi", "--model", "{F}/ck", flag, v]))
    for flag in COMPARE_NUMBERS:
        for v in BAD_NUMBERS:
            C.append(Case(f"opt/compare{flag}={v}", "compare.py", ["{F}/ck", "{F}/run", flag, v]))

    # --- 2. flags: typos, missing values, contradictions
    for script, args in [
        ("train.py", ["--data", "{F}/corpus"]),  # no --out
        ("train.py", [*train_base, "--out", "{D}/run", "--lerning-rate", "1"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--dtype", "float8"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--device", "cuda"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--device", "mps"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--device", "tpu"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--init-preset", "gpt3"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--n-layer", "2"]),  # without --init-preset
        ("train.py", [*train_base, "--out", "{D}/run", "--vocab-from", "{F}/corpus"]),  # without --extend-vocab
        ("train.py", [*train_base, "--out", "{D}/run", "--val-fraction", "0.1", "--val-data", "{F}/eval.txt"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--drop-lines", "("]),
        ("train.py", [*train_base, "--out", "{D}/run", "--drop-lines", "."]),  # drops every line
        ("train.py", [*train_base, "--out", "{D}/run", "--lora-targets", "attn.nope"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--lora-alpha", "2"]),  # without --lora
        ("train.py", [*train_base, "--out", "{D}/run", "--lora", "2", "--lora-targets", "attn.nope"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--seq-len", "100000"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--batch-size", "10000000"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--resume"]),  # nothing to resume
        ("train.py", [*train_base, "--out", "{D}/run", "--model", "nobody/nothing"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--tokenizer", "/nonexistent/dir"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--eval-data", "{D}/missing.txt"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--steps", "1", "--epochs", "1"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--min-lr", "1", "--lr", "0.001"]),
        ("train.py", [*train_base, "--out", ""]),
        ("train.py", [*train_base, "--out", "/dev/null"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--data", ""]),
        ("train.py", [*train_base, "--out", "{D}/run", "--data", "/dev/zero"]),  # endless: must not hang
        ("train.py", [*train_base, "--out", "{D}/run", "--eval-data", "/dev/zero"]),
        ("sample.py", ["hi", "--model", ""]),
        ("sample.py", ["--model", "{F}/ck", "--prompt-file", "/dev/zero"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--text", "/dev/zero"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--top-p", "2"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--temperature", "-1"]),
        ("sample.py", ["hi", "--model", "nobody/nothing"]),
        ("sample.py", ["hi", "--model", "gpt2-xl"]),  # not cached, offline
        ("sample.py", ["hi", "--model", "{D}/missing"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--device", "cuda"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--quantize", "int4"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--prompt-file", "{D}/missing.txt"]),
        ("sample.py", ["--model", "{F}/ck"]),  # no prompt at all
        ("sample.py", ["hi", "--model", "{F}/ck", "--max-new-tokens", "100000000"]),
        ("sample.py", ["hi", "--model", "{F}/ck", "--num-samples", "100000000"]),
        ("compare.py", ["{F}/ck"]),  # A alone, not a run
        ("compare.py", ["{F}/ck", "{D}/missing"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--text", "{D}/missing.txt"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--prompt", ""]),
        ("compare.py", ["{F}/ck", "{F}/run", "--device", "cuda"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--revision", "nope"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--json", "{D}/no/such/dir/x.json"]),
        ("compare.py", ["{F}/ck", "{F}/run", "--plot", "{D}/x.txt"]),
    ]:
        if args[-1] == "--resume":  # a new folder: starts from step 0, saying so (for scripts that always resume)
            C.append(Case(f"flags/{script}/--resume-new", script, args, expect="ok", says="starting from step 0"))
            continue
        name = f"flags/{script}/{' '.join(args[-2:])}"
        if any(c.name == name for c in C):  # the same last two arguments: a case folder of its own
            name = f"flags/{script}/{' '.join(args[-4:])}"
        C.append(Case(name, script, args, no_new=("run",)))

    # --- 3. damaged checkpoints, in each script
    ck_damage = {
        "weights-empty": lambda d: write(d / "model.safetensors", b""),
        "weights-cut-1%": lambda d: truncate(d / "model.safetensors", 0.01),
        "weights-cut-50%": lambda d: truncate(d / "model.safetensors", 0.5),
        "weights-cut-99%": lambda d: truncate(d / "model.safetensors", 0.99),
        "weights-garbage": lambda d: write(d / "model.safetensors", os.urandom(4096)),
        "weights-huge-header": lambda d: write(d / "model.safetensors", (2**60).to_bytes(8, "little") + b"{}"),
        "weights-header-not-json": lambda d: write(d / "model.safetensors", (10).to_bytes(8, "little") + b"not json!!"),
        "weights-missing": lambda d: (d / "model.safetensors").unlink(),
        "weights-pickle": lambda d: write(d / "model.safetensors", b"\x80\x04\x95" + os.urandom(64)),
        "config-empty": lambda d: write(d / "config.json", ""),
        "config-garbage": lambda d: write(d / "config.json", "{not json"),
        "config-list": lambda d: write(d / "config.json", "[1, 2]"),
        "config-missing": lambda d: (d / "config.json").unlink(),
        "config-n_layer-huge": lambda d: edit_json(d / "config.json", n_layer=10_000_000),
        "config-n_embd-string": lambda d: edit_json(d / "config.json", n_embd="64"),
        "config-n_head-3": lambda d: edit_json(d / "config.json", n_head=3),
        "config-vocab-small": lambda d: edit_json(d / "config.json", vocab_size=100),
        "config-negative": lambda d: edit_json(d / "config.json", n_positions=-1),
        "config-nan-eps": lambda d: write(
            d / "config.json", (d / "config.json").read_text().replace("1e-05", "NaN").replace("1e-5", "NaN")
        ),
        "config-deeply-nested": lambda d: write(d / "config.json", "[" * 100_000),
        "config-5000-digit-int": lambda d: write(d / "config.json", '{"n_layer": ' + "9" * 5000 + "}"),
        "weights-header-deeply-nested": lambda d: write(
            d / "model.safetensors", (100_000).to_bytes(8, "little") + b"[" * 100_000
        ),
        "vocab-garbage": lambda d: write(d / "vocab.json", "{garbage"),
        "vocab-list": lambda d: write(d / "vocab.json", "[]"),
        "vocab-id-past-model": lambda d: edit_json(d / "vocab.json", zzzzqqq=99_999),
        "merges-one-line": lambda d: write(d / "merges.txt", "#version: 0.2\nĠ t\n"),
        "merges-empty": lambda d: write(d / "merges.txt", ""),
        "merges-binary": lambda d: write(d / "merges.txt", os.urandom(2000)),
    }
    for name, damage in ck_damage.items():
        prep = then(copy_of("ck"), damage)
        C.append(Case(f"ck/sample/{name}", "sample.py", ["hi", "--model", "{D}/x", "--max-new-tokens", "4"], prep=prep))
        C.append(Case(f"ck/compare-B/{name}", "compare.py", ["{F}/ck", "{D}/x"], prep=prep))
        C.append(
            Case(
                f"ck/train/{name}",
                "train.py",
                [*train_base, "--model", "{D}/x", "--out", "{D}/run"],
                prep=prep,
                no_new=("run",),
            )
        )

    # --- 4. data
    data_damage = {
        "empty-file": lambda d: write(d / "in.txt", ""),
        "blank-lines": lambda d: write(d / "in.txt", "\n\n   \n\n"),
        "binary": lambda d: write(d / "in.txt", os.urandom(5000)),
        "gbk": lambda d: write(d / "in.txt", ("今天的天气很好。" * 200).encode("gbk")),
        "one-bad-byte": lambda d: write(d / "in.txt", ("今天的天气很好。" * 200).encode() + b"\xff" + "好".encode()),
        "utf16": lambda d: write(d / "in.txt", ("今天的天气很好。" * 200).encode("utf-16")),
        "nul-bytes": lambda d: write(d / "in.txt", ("今天" * 500).encode() + b"\x00" * 100),
        "dir-no-text": lambda d: (d / "in.txt").mkdir() or write(d / "in.txt" / "x.bin", os.urandom(10)),
        "dir-empty": lambda d: (d / "in.txt").mkdir(),
        "symlink-loop": lambda d: os.symlink(d / "in.txt", d / "in.txt"),
        "dangling-symlink": lambda d: os.symlink(d / "nowhere", d / "in.txt"),
        "jsonl-as-data": lambda d: write(d / "in.txt", '{"text": "今天"}\n' * 400),
        "tiny-one-char": lambda d: write(d / "in.txt", "好"),
        "crlf-only": lambda d: write(d / "in.txt", "\r\n" * 100),
    }
    for name, damage in data_damage.items():
        # a .txt holding JSON is text; one character beside the corpus is a short document (alone, or
        # as an eval set, it is too little: data-eval/ below, and tests/test_bad_inputs.py)
        expect = "ok" if name in ("jsonl-as-data", "tiny-one-char") else "error"
        eval_expect = "ok" if name == "jsonl-as-data" else "error"  # an eval set of one character measures nothing
        C.append(
            Case(
                f"data/{name}",
                "train.py",
                [*train_base, "--data", "{D}/in.txt", "--out", "{D}/run"],
                prep=lambda d, f, damage=damage: damage(d),
                expect=expect,
                no_new=() if expect == "ok" else ("run",),
            )
        )
        C.append(
            Case(
                f"data-eval/{name}",
                "train.py",
                [*train_base, "--eval-data", "{D}/in.txt", "--out", "{D}/run"],
                prep=lambda d, f, damage=damage: damage(d),
                expect=eval_expect,
                no_new=() if eval_expect == "ok" else ("run",),
            )
        )
        if name not in ("dir-no-text", "dir-empty", "jsonl-as-data"):
            C.append(
                Case(
                    f"data-compare/{name}",
                    "compare.py",
                    ["{F}/ck", "{F}/run", "--text", "{D}/in.txt", "--max-eval-tokens", "64"],
                    prep=lambda d, f, damage=damage: damage(d),
                )
            )
            C.append(
                Case(
                    f"data-prompt-file/{name}",
                    "sample.py",
                    ["--model", "{F}/ck", "--prompt-file", "{D}/in.txt", "--max-new-tokens", "4"],
                    prep=lambda d, f, damage=damage: damage(d),
                    expect="ok" if name in ("crlf-only", "tiny-one-char", "blank-lines") else "error",
                )
            )

    # --- 5. --out and the run folder
    def out_is(kind):
        def prep(d: Path, f: Path):
            target = d / "out"
            if kind == "file":
                write(target, "mine")
            elif kind == "user-folder":
                target.mkdir()
                write(target / "notes.txt", "mine")
            elif kind == "user-step-folder":
                (target / "step-000001").mkdir(parents=True)
                write(target / "step-000001" / "mine.txt", "mine")
            elif kind == "checkpoint":
                shutil.copytree(f / "ck", target)

        return prep

    for kind in ("file", "user-folder", "user-step-folder", "checkpoint"):
        C.append(
            Case(f"out/{kind}", "train.py", [*train_base, "--out", "{D}/out"], prep=out_is(kind), no_new=("out/.lock",))
        )
    C.append(
        Case(
            "out/the-data-folder",
            "train.py",
            [*train_base, "--data", "{D}/out", "--out", "{D}/out"],
            prep=lambda d, f: (d / "out").mkdir() or shutil.copy(f / "corpus" / "a.txt", d / "out"),
            no_new=("out/.lock",),
        )
    )
    C.append(
        Case(
            "out/symlink-to-a-checkpoint",
            "train.py",
            [*train_base, "--out", "{D}/out"],
            prep=lambda d, f: os.symlink(f / "ck", d / "out"),
        )
    )
    C.append(
        Case(
            "data/fifo",
            "train.py",
            [*train_base, "--data", "{D}/fifo", "--out", "{D}/run"],
            prep=lambda d, f: os.mkfifo(d / "fifo"),
            no_new=("run",),
        )
    )
    C.append(
        Case(
            "out/resume-into-a-file",
            "train.py",
            ["--out", "{D}/out", "--resume", "--steps", "6"],
            prep=out_is("file"),
        )
    )
    C.append(Case("out/fresh-into-used-run", "train.py", [*train_base, "--out", "{D}/run"], prep=copy_of("run", "run")))

    # --- 6. a run's own files, damaged, then --resume
    def run_damage(fn):
        return then(copy_of("run", "run"), fn)

    def args_of(run: Path) -> dict:
        return json.loads((run / "run.json").read_text())["args"]

    def newest(run: Path) -> Path:
        return run / "final"

    def edit_state(every=False, **changes):
        """Damage trainer_state.json of the newest checkpoint (or of every one)."""

        def fn(run: Path):
            for ck in [p for p in run.iterdir() if p.is_dir() and (p / "trainer_state.json").exists()]:
                if every or ck.name == "final":
                    edit_json(ck / "trainer_state.json", **changes)

        return fn

    def garbage_state(every=False):
        def fn(run: Path):
            for ck in [p for p in run.iterdir() if p.is_dir() and (p / "trainer_state.json").exists()]:
                if every or ck.name == "final":
                    write(ck / "trainer_state.json", "{x")

        return fn

    # A damaged checkpoint is set aside and the resume falls back to the newest good one, saying so
    # (issue 20 B); with every checkpoint damaged it starts from step 0, saying so. run.json is the
    # run's own record: damaged, it is one clear error.
    skipped = "skipped checkpoint"
    resume_damage = {
        "run.json-garbage": (lambda r: write(r / "run.json", "{nope"), "error"),
        "run.json-args-list": (lambda r: edit_json(r / "run.json", args=[1, 2]), "error"),
        "run.json-missing": (lambda r: (r / "run.json").unlink(), "error"),
        "run.json-empty": (lambda r: write(r / "run.json", ""), "error"),
        "run.json-deeply-nested": (lambda r: write(r / "run.json", '{"args": ' + "[" * 100_000), "error"),
        "run.json-5000-digit-int": (lambda r: write(r / "run.json", HUGE_ARGS), "error"),
        "run.json-args-lr-nan": (lambda r: edit_json(r / "run.json", args={**args_of(r), "lr": float("nan")}), "error"),
        "run.json-args-steps-text": (lambda r: edit_json(r / "run.json", args={**args_of(r), "steps": "6"}), "error"),
        "run.json-is-a-folder": (lambda r: (r / "run.json").unlink() or (r / "run.json").mkdir(), "error"),
        "state-json-deeply-nested": (lambda r: write(newest(r) / "trainer_state.json", "[" * 100_000), "ok"),
        "state-json-5000-digit-step": (
            lambda r: write(newest(r) / "trainer_state.json", '{"step": ' + "9" * 5000 + "}"),
            "ok",
        ),
        "log-deeply-nested-line": (lambda r: write(r / "log.jsonl", "[" * 100_000 + "\n"), "ok"),
        "state-step-negative": (edit_state(step=-3), "ok"),
        "state-step-huge": (edit_state(step=1_000_000_000), "ok"),
        "state-step-string": (edit_state(step="4"), "ok"),
        "state-json-garbage": (garbage_state(), "ok"),
        "every-state-step-negative": (edit_state(every=True, step=-3), "ok"),
        "every-state-step-huge": (edit_state(every=True, step=1_000_000_000), "ok"),
        "every-state-json-garbage": (garbage_state(every=True), "ok"),
        "final-state-nan": (lambda r: nan_state(newest(r)), "ok"),  # falls back to step-000002
        "final-state-garbage": (lambda r: write(newest(r) / "trainer_state.safetensors", os.urandom(300)), "ok"),
        "final-weights-cut": (lambda r: truncate(newest(r) / "model.safetensors", 0.5), "ok"),
        "final-config-garbage": (lambda r: write(newest(r) / "config.json", "{x"), "ok"),
        "log-cut-mid-line": (lambda r: write(r / "log.jsonl", (r / "log.jsonl").read_text()[:-7]), "ok"),
        "log-garbage": (lambda r: write(r / "log.jsonl", os.urandom(200)), "ok"),
        "every-checkpoint-cut": (
            lambda r: [
                truncate(p / "model.safetensors", 0.3) for p in r.iterdir() if (p / "model.safetensors").exists()
            ],
            "ok",  # resumes from step 0, saying so
        ),
    }
    for name, (fn, expect) in resume_damage.items():
        C.append(
            Case(
                f"resume/{name}",
                "train.py",
                ["--out", "{D}/run", "--resume", "--steps", "6"],
                prep=run_damage(fn),
                expect=expect,
                says=skipped if expect == "ok" and not name.startswith("log-") else "",
            )
        )
        if name.startswith("final-"):
            C.append(
                Case(
                    f"run-as-model/{name}",
                    "sample.py",
                    ["hi", "--model", "{D}/run", "--max-new-tokens", "4"],
                    prep=run_damage(fn),
                    # sampling reads the weights only: a damaged trainer state beside intact
                    # weights matters to --resume (which falls back past it), not to sample.py
                    expect="ok" if name.startswith("final-state-") else "error",
                )
            )
    C.append(
        Case(
            "resume/steps-lower",
            "train.py",
            ["--out", "{D}/run", "--resume", "--steps", "2"],
            prep=copy_of("run", "run"),
        )
    )
    C.append(
        Case(
            "resume/change-seq-len",
            "train.py",
            ["--out", "{D}/run", "--resume", "--steps", "6", "--seq-len", "16"],
            prep=copy_of("run", "run"),
        )
    )
    C.append(
        Case(
            "resume/change-data",
            "train.py",
            ["--out", "{D}/run", "--resume", "--steps", "6", "--data", "{F}/eval.txt"],
            prep=copy_of("run", "run"),
        )
    )

    # --- 7. token cache entries copied over each other, damaged
    # --- 8. outputs onto inputs, unwritable outputs
    for target in ("{D}/x/config.json", "{D}/x/model.safetensors", "{F}/eval.txt"):
        C.append(
            Case(
                f"outputs/json-onto-input {target}",
                "compare.py",
                ["{F}/ck", "{D}/x", "--text", "{F}/eval.txt", "--max-eval-tokens", "64", "--json", target, "--force"],
                prep=copy_of("ck"),
            )
        )
        C.append(
            Case(
                f"outputs/plot-onto-input {target}",
                "compare.py",
                ["{F}/ck", "{D}/x", "--plot", target, "--force"],
                prep=copy_of("ck"),
            )
        )
    C.append(Case("outputs/json-is-a-folder", "compare.py", ["{F}/ck", "{F}/run", "--json", "{D}"]))
    C.append(
        Case(
            "outputs/json-exists-no-force",
            "compare.py",
            ["{F}/ck", "{F}/run", "--json", "{D}/x.json"],
            prep=lambda d, f: write(d / "x.json", "{}"),
        )
    )
    C.append(Case("outputs/json-ok", "compare.py", ["{F}/ck", "{F}/run", "--json", "{D}/x.json"], expect="ok"))
    C.append(
        Case(
            "outputs/out-under-a-file",
            "train.py",
            [*train_base, "--out", "{D}/f/run"],
            prep=lambda d, f: write(d / "f", "a file"),
        )
    )
    C.append(
        Case(
            "outputs/cache-dir-is-file",
            "train.py",
            [*train_base, "--out", "{D}/run", "--cache-dir", "{D}/f"],
            prep=lambda d, f: write(d / "f", "a file"),
            no_new=("run",),
        )
    )
    C.append(
        Case(
            "outputs/file-size-limit",
            "train.py",
            [*train_base, "--out", "{D}/run", "--cache-dir", "{D}/cache", "--save-every", "1"],
            env={"MINIGPT2_TRIAL_FSIZE": str(2_000_000)},
        )
    )

    # --- 9. signals, closed streams, encodings
    sample_run = ["hi", "--model", "{F}/ck", "--max-new-tokens", "2000", "--no-cache"]
    for script, args in [
        ("sample.py", sample_run),
        ("compare.py", ["{F}/ck", "{F}/run", "--text", "{F}/eval.txt"]),
        ("train.py", [*train_base, "--out", "{D}/run", "--steps", "200"]),
    ]:
        for t in (0.3, 0.7, 1.5, 3.0, 8.0):
            C.append(Case(f"signal/{script}/SIGINT@{t}", script, args, expect="signal", send=(signal.SIGINT, t)))
        for sig in (signal.SIGTERM, signal.SIGHUP):
            C.append(Case(f"signal/{script}/{sig.name}@4", script, args, expect="signal", send=(sig, 4.0)))
        C.append(
            Case(
                f"stdout-closed/{script}",
                script,
                args[:-2] + ["3"]  # --max-new-tokens 3 (without --no-cache)
                if script == "sample.py"
                else ([*args[:-2], "--steps", "2"] if script == "train.py" else args[:2]),
                expect="ok",
                stdout_closed=True,
            )
        )
    for enc in ("ascii", "latin-1"):
        C.append(
            Case(
                f"encoding/sample/{enc}",
                "sample.py",
                ["你好", "--model", "{F}/ck", "--max-new-tokens", "8"],
                expect="ok",
                env={"PYTHONIOENCODING": enc},
            )
        )
        C.append(
            Case(
                f"encoding/compare/{enc}",
                "compare.py",
                ["{F}/ck", "{F}/run", "--prompt", "你好"],
                expect="ok",
                env={"PYTHONIOENCODING": enc},
            )
        )
        C.append(
            Case(
                f"encoding/train/{enc}",
                "train.py",
                [*train_base, "--out", "{D}/run"],
                expect="ok",
                env={"PYTHONIOENCODING": enc},
            )
        )
    C.append(
        Case(
            "encoding/sample/LC_ALL=C",
            "sample.py",
            ["你好", "--model", "{F}/ck", "--max-new-tokens", "8"],
            expect="ok",
            env={"PYTHONIOENCODING": "", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"},
        )
    )

    # --- 10. a model grown with --extend-vocab, its tokenizer damaged or gone
    grown_damage = {
        "vocab-deleted": lambda r: (r / "final" / "vocab.json").unlink(),
        "merges-deleted": lambda r: (r / "final" / "merges.txt").unlink(),
        "both-deleted": lambda r: [(r / "final" / n).unlink() for n in ("vocab.json", "merges.txt")],
        "merges-cut": lambda r: write(r / "final" / "merges.txt", "#version: 0.2\nĠ t\n"),
        "vocab-garbage": lambda r: write(r / "final" / "vocab.json", "{x"),
    }
    for name, fn in grown_damage.items():
        prep = then(copy_of("grown/final", "g/final"), lambda g, fn=fn: fn(g.parent))
        C.append(
            Case(
                f"grown/sample/{name}",
                "sample.py",
                ["今天", "--model", "{D}/g/final", "--max-new-tokens", "4"],
                prep=prep,
            )
        )
        C.append(
            Case(
                f"grown/compare-text/{name}",
                "compare.py",
                ["{F}/ck", "{D}/g/final", "--text", "{F}/eval.txt", "--max-eval-tokens", "64"],
                prep=prep,
            )
        )
        C.append(
            Case(
                f"grown/train-from/{name}",
                "train.py",
                [*train_base, "--model", "{D}/g/final", "--out", "{D}/run"],
                prep=prep,
                no_new=("run",),
            )
        )
    C.append(Case("grown/compare-prompt", "compare.py", ["{F}/ck", "{F}/grown", "--prompt", "今天的天气"], expect="ok"))
    C.append(
        Case(
            "grown/compare-text",
            "compare.py",
            ["{F}/ck", "{F}/grown", "--text", "{F}/eval.txt", "--max-eval-tokens", "64"],
            expect="ok",
        )
    )
    C.append(Case("grown/sample", "sample.py", ["今天", "--model", "{F}/grown", "--max-new-tokens", "8"], expect="ok"))
    C.append(
        Case(
            "grown/lora-with-grown-model",
            "train.py",
            [*train_base, "--model", "{F}/grown/final", "--lora", "2", "--out", "{D}/run"],
            expect="ok",
        )
    )

    # --- 11. data in other containers, broken
    formats = {
        "jsonl-missing-field": ("x.jsonl", '{"body": "今天的天气"}\n' * 50),
        "jsonl-not-string": ("x.jsonl", '{"text": 5}\n' * 50),
        "jsonl-bad-line": ("x.jsonl", '{"text": "今天的天气"}\n' * 50 + "{oops\n"),
        "json-array-of-numbers": ("x.json", "[1, 2, 3]"),
        "json-garbage": ("x.json", "{"),
        "csv-no-text-column": ("x.csv", "a,b\n1,2\n" * 20),
        "parquet-garbage": ("x.parquet", os.urandom(3000)),
        "gz-garbage": ("x.txt.gz", os.urandom(3000)),
        "bz2-garbage": ("x.txt.bz2", os.urandom(3000)),
        "xz-garbage": ("x.txt.xz", os.urandom(3000)),
        "jsonl-empty": ("x.jsonl", ""),
    }
    for name, (fname, content) in formats.items():
        C.append(
            Case(
                f"format/{name}",
                "train.py",
                [*train_base, "--data", "{D}/" + fname, "--out", "{D}/run"],
                prep=lambda d, f, fname=fname, content=content: write(d / fname, content),
                no_new=("run",),
            )
        )
    for spec in ("hf:nobody/nothing", "hf:", "hf:a/b:c@nosplit", "hf:../../etc"):
        C.append(Case(f"format/{spec}", "train.py", [*train_base, "--data", spec, "--out", "{D}/run"], no_new=("run",)))

    C += new_surfaces(train_base)

    # --- 12. what should simply work
    C.append(Case("works/sample", "sample.py", ["今天", "--model", "{F}/ck", "--max-new-tokens", "8"], expect="ok"))
    C.append(
        Case("works/sample-run", "sample.py", ["今天", "--model", "{F}/run", "--max-new-tokens", "8"], expect="ok")
    )
    C.append(Case("works/compare-run", "compare.py", ["{F}/run"], expect="ok"))
    C.append(Case("works/train", "train.py", [*train_base, "--out", "{D}/run"], expect="ok"))
    return C


# ---------------------------------------------------------------------------------------------
# issue 31: the new surfaces (data formats, watching, the recipes, signals), as a new user and an
# attacker would try them. Their names start with "new/": `--only new/` runs just these.

ROW = '{"text": "今天的天气很好。我们去公园散步，看见了很多花。"}\n'
DEEP = "[" * 100_000
HUGE = "9" * 5000


def gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1)


def big_row(kind: str) -> bytes:
    """A gzip file holding one row of 100 MiB (a 100 KB download): past the 64 MiB row bound."""
    import gzip
    import io

    out = io.BytesIO()
    head, tail = {"jsonl": (b'{"text": "', b'"}\n'), "json": (b'[{"text": "', b'"}]'), "csv": (b"text\n", b"\n")}[kind]
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as f:
        f.write(head)
        for _ in range(100):
            f.write(b"a" * (1 << 20))
        f.write(tail)
    return out.getvalue()


def parquet(path: Path, column, name: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({name: column}), path)


def word_list(path: Path) -> None:
    import random

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(120_000)
    ]
    path.write_text("\n".join(words) + "\n")


def put(name: str, content):
    def prep(d: Path, f: Path):
        target = d / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(target)
        else:
            write(target, content)

    return prep


def new_data_cases(train_base: list) -> list[Case]:
    """Rows, arrays, CSV, Parquet, compression, folders and datasets: broken, odd, hostile."""
    bad = {  # name -> (file name, content), each refused in one line
        "jsonl-deep": ("x.jsonl", ROW * 20 + DEEP + "\n"),
        "jsonl-huge-int": ("x.jsonl", ROW * 20 + '{"text": "a", "n": ' + HUGE + "}\n"),
        "jsonl-surrogate": ("x.jsonl", ROW * 20 + '{"text": "a\\ud800b"}\n'),
        "jsonl-low-surrogate": ("x.jsonl", '{"text": "\\udc00"}\n' + ROW * 20),
        "jsonl-100MiB-row.gz": ("x.jsonl.gz", lambda p: write(p, big_row("jsonl"))),
        "jsonl-list-line": ("x.jsonl", ROW * 20 + "[1, 2]\n"),
        "jsonl-string-line": ("x.jsonl", ROW * 20 + '"text"\n'),
        "jsonl-null-field": ("x.jsonl", ROW * 20 + '{"text": null}\n'),
        "jsonl-list-field": ("x.jsonl", ROW * 20 + '{"text": ["a"]}\n'),
        "jsonl-object-field": ("x.jsonl", ROW * 20 + '{"text": {"a": 1}}\n'),
        "jsonl-latin1": ("x.jsonl", ROW.encode() * 20 + b'{"text": "caf\xe9"}\n'),
        "jsonl-all-blank": ("x.jsonl", '{"text": "  "}\n' * 30),
        "jsonl-nan-literal": ("x.jsonl", ROW * 20 + '{"text": NaN}\n'),
        "jsonl-utf16": ("x.jsonl", (ROW * 20).encode("utf-16")),
        "jsonl-binary": ("x.jsonl", os.urandom(4000)),
        "json-two-arrays": ("x.json", "[" + ROW.strip() + "]\n[" + ROW.strip() + "]"),
        "json-trailing-garbage": ("x.json", "[" + ROW.strip() + "] and more"),
        "json-trailing-comma": ("x.json", "[" + ROW.strip() + ",]"),
        "json-empty-array": ("x.json", "[]"),
        "json-deep": ("x.json", "[" + DEEP),
        "json-deep-in-object": ("x.json", '[{"text": "a", "x": ' + DEEP + "}]"),
        "json-huge-int": ("x.json", '[{"text": "a", "n": ' + HUGE + "}]"),
        "json-surrogate": ("x.json", '[{"text": "\\ud83d"}]'),
        "json-strings": ("x.json", '["a", "b"]'),
        "json-cut": ("x.json", "[" + ROW.strip() + ", " + ROW.strip()[:20]),
        "json-100MiB-object.gz": ("x.json.gz", lambda p: write(p, big_row("json"))),
        "json-object-not-array": ("x.json", '{\n  "text": "a"\n}\n'),
        "csv-unterminated-quote": ("x.csv", 'id,text\n1,"今天\n' + "2,明天\n" * 30),
        "csv-quote-inside": ("x.csv", 'id,text\n1,"今天"x\n'),
        "csv-nul": ("x.csv", "id,text\n1,今天\x00\n" + "2,明天\n" * 30),
        "csv-no-column": ("x.csv", "id,body\n1,今天\n"),
        "csv-header-only": ("x.csv", "id,text\n"),
        "csv-empty": ("x.csv", ""),
        "csv-short-row": ("x.csv", "id,text\n1,今天\n2\n"),
        "csv-latin1": ("x.csv", b"id,text\n1,caf\xe9\n"),
        "csv-100MiB-cell.gz": ("x.csv.gz", lambda p: write(p, big_row("csv"))),
        "tsv-with-commas": ("x.tsv", "id,text\n1,今天\n"),
        "parquet-int-column": ("x.parquet", lambda p: parquet(p, list(range(10)))),
        "parquet-null": ("x.parquet", lambda p: parquet(p, ["今天", None])),
        "parquet-list-column": ("x.parquet", lambda p: parquet(p, [["a"], ["b"]])),
        "parquet-no-column": ("x.parquet", lambda p: parquet(p, ["今天"], "body")),
        "parquet-empty": ("x.parquet", lambda p: parquet(p, __import__("pyarrow").array([], "string"))),
        "parquet-cut": ("x.parquet", lambda p: (parquet(p, ["今天"] * 500), truncate(p, 0.5))),
        "gz-cut": ("x.jsonl.gz", lambda p: (write(p, gz(ROW.encode() * 3000)), truncate(p, 0.5))),
        "gz-empty-inside": ("x.txt.gz", gz(b"")),
        "gz-of-gz": ("x.txt.gz", gz(gz(b"today" * 1000))),
        "zst-garbage": ("x.txt.zst", b"\x28\xb5\x2f\xfd" + os.urandom(2000)),
        "bz2-cut": (
            "x.jsonl.bz2",
            lambda p: (write(p, __import__("bz2").compress(ROW.encode() * 3000)), truncate(p, 0.5)),
        ),
        "xz-garbage": ("x.csv.xz", b"\xfd7zXZ\x00" + os.urandom(2000)),
    }
    C = [
        Case(
            f"new/data/{name}",
            "train.py",
            [*train_base, "--data", "{D}/" + fname, "--out", "{D}/run"],
            prep=put(fname, content),
            no_new=("run",),
        )
        for name, (fname, content) in bad.items()
    ]
    good = {  # name -> (file name, content), each trained on
        "jsonl-bom-crlf": ("x.jsonl", "\ufeff" + ROW.replace("\n", "\r\n") * 40),
        "jsonl-blank-lines": ("x.jsonl", (ROW + "\n\n") * 40),
        "jsonl-some-blank-rows": ("x.jsonl", (ROW + '{"text": " "}\n') * 40),
        "jsonl-nul-escape": ("x.jsonl", ROW * 40 + '{"text": "a\\u0000b"}\n'),
        "jsonl-emoji-pair": ("x.jsonl", ROW * 40 + '{"text": "\\ud83d\\ude00 今天"}\n'),
        "jsonl-many-rows": ("x.jsonl", ROW * 20_000),
        "jsonl-extra-fields": ("x.jsonl", '{"id": 1, "text": "今天的天气很好。", "meta": {"a": [1, 2]}}\n' * 60),
        "json-pretty": ("x.json", "[\n" + ",\n".join([ROW.strip()] * 60) + "\n]\n"),
        "json-trailing-newlines": ("x.json", "[" + ",".join([ROW.strip()] * 60) + "]\n\n  \n"),
        "json-as-lines": ("x.json", ROW * 60),
        "csv-multiline-cell": ("x.csv", "id,text\n" + '1,"今天的天气很好。\n我们去公园。"\n' * 60),
        "csv-crlf-bom": ("x.csv", "\ufeffid,text\r\n" + "1,今天的天气很好。\r\n" * 60),
        "csv-extra-columns": ("x.csv", "id,text,x\n" + "1,今天的天气很好。,y,z\n" * 60),
        "tsv": ("x.tsv", "id\ttext\n" + "1\t今天的天气很好。\n" * 60),
        "parquet-dictionary": (
            "x.parquet",
            lambda p: parquet(p, __import__("pyarrow").array(["今天的天气很好。"] * 60 + ["明天"]).dictionary_encode()),
        ),
        "parquet-large-string": (
            "x.parquet",
            lambda p: parquet(p, __import__("pyarrow").array(["今天的天气很好。"] * 60, "large_string")),
        ),
        "parquet.gz": (
            "x.parquet.gz",
            lambda p: (
                parquet(p.with_suffix(""), ["今天的天气很好。"] * 60),
                write(p, gz(p.with_suffix("").read_bytes())),
            ),
        ),
        "txt-word-list-1MB": ("x.txt", word_list),
        "txt.xz": ("x.txt.xz", __import__("lzma").compress("今天的天气很好。\n".encode() * 300)),
        "txt-crlf-only-ends": ("x.txt", "今天的天气很好。\r\n" * 300),
    }
    C += [
        Case(
            f"new/data-ok/{name}",
            "train.py",
            [*train_base, "--data", "{D}/" + fname, "--out", "{D}/run"],
            prep=put(fname, content),
            expect="ok",
        )
        for name, (fname, content) in good.items()
    ]

    def mixed(d: Path, f: Path):
        (d / "in").mkdir()
        write(d / "in" / "a.txt", "今天的天气很好。\n" * 300)
        write(d / "in" / "b.jsonl", ROW)

    def save_to_disk(d: Path, f: Path):
        import datasets

        datasets.Dataset.from_dict({"text": ["今天的天气很好。" * 20] * 50, "n": list(range(50))}).save_to_disk(
            str(d / "ds")
        )

    other = [
        ("folder-txt-and-jsonl", ["--data", "{D}/in"], mixed, "error"),
        ("folder-empty", ["--data", "{D}/in"], lambda d, f: (d / "in").mkdir(), "error"),
        ("glob-no-match", ["--data", "{D}/*.jsonl"], None, "error"),
        ("text-field-with-txt", ["--text-field", "body"], None, "error"),
        ("text-field-empty", ["--text-field", ""], None, "error"),
        ("hf-empty-split", ["--data", "hf:a/b@"], None, "error"),
        ("hf-empty-split-spaces", ["--data", "hf:a/b@ "], None, "error"),
        ("hf-only-at", ["--data", "hf:@"], None, "error"),
        ("hf-missing-folder", ["--data", "hf:./nowhere"], None, "error"),
        ("hf-saved-no-field", ["--data", "hf:{D}/ds", "--text-field", "body"], save_to_disk, "error"),
        ("hf-saved-int-field", ["--data", "hf:{D}/ds", "--text-field", "n"], save_to_disk, "error"),
        ("hf-saved-config", ["--data", "hf:{D}/ds:cfg"], save_to_disk, "error"),
        ("hf-saved-no-split", ["--data", "hf:{D}/ds@validation"], save_to_disk, "error"),
        ("hf-saved", ["--data", "hf:{D}/ds"], save_to_disk, "ok"),
        (
            "vocab-from-bad-rows",
            ["--extend-vocab", "8", "--vocab-from", "{D}/x.jsonl"],
            put("x.jsonl", "{oops\n"),
            "error",
        ),
        ("eval-data-two-arrays", ["--eval-data", "{D}/x.json"], put("x.json", "[]\n[]"), "error"),
        ("val-data-surrogate", ["--val-data", "{D}/x.jsonl"], put("x.jsonl", '{"text": "\\udfff"}\n'), "error"),
    ]
    for name, extra, prep, expect in other:
        args = [*train_base, "--out", "{D}/run", *extra]
        C.append(
            Case(
                f"new/data/{name}",
                "train.py",
                args,
                expect=expect,
                prep=prep,
                no_new=("run",) if expect == "error" else (),
            )
        )
    return C


def new_watch_cases(train_base: list) -> list[Case]:
    """What a run shows and writes: samples, TensorBoard, compare's outputs, the logs read back."""
    out = [*train_base, "--out", "{D}/run"]
    C = [
        Case("new/watch/train-sample-tokens-1e9", "train.py", [*out, "--sample-tokens", "1000000000"], no_new=("run",)),
        Case("new/watch/train-sample-tokens-neg", "train.py", [*out, "--sample-tokens", "-1"], no_new=("run",)),
        Case(
            "new/watch/train-sample-prompt-not-utf8",
            "train.py",
            [*out, "--sample-prompt", "\udcff\udcfe"],
            no_new=("run",),
        ),
        Case(
            "new/watch/train-sample-prompt-surrogate",  # U+D800 as UTF-8 (ED A0 80): what a command line can hold
            "train.py",
            [*out, "--sample-prompt", "a\udced\udca0\udc80"],
            no_new=("run",),
        ),
        Case(
            "new/watch/compare-sample-tokens-1e9", "compare.py", ["{F}/ck", "{F}/run", "--sample-tokens", "1000000000"]
        ),
        Case(
            "new/watch/compare-prompt-not-utf8-html",
            "compare.py",
            ["{F}/ck", "{F}/run", "--prompt", "\udcff", "--html", "{D}/r.html"],
            no_new=("r.html",),
        ),
        Case(
            "new/watch/tensorboard-inside-out",
            "train.py",
            [*train_base, "--out", "{D}/run", "--tensorboard", "{D}/run/tb"],
            no_new=("run",),
        ),
        Case(
            "new/watch/tensorboard-is-a-file",
            "train.py",
            [*out, "--tensorboard", "{D}/tb"],
            prep=put("tb", "x"),
            no_new=("run",),
        ),
        Case("new/watch/tensorboard-default", "train.py", [*out, "--tensorboard"], expect="ok"),
        Case("new/watch/tensorboard-outside", "train.py", [*out, "--tensorboard", "{D}/tb"], expect="ok"),
        Case(
            "new/watch/train-sample-prompt-long",
            "train.py",
            [*out, "--sample-prompt", "今天" * 500, "--eval-every", "2", "--sample-tokens", "2"],
            expect="ok",
        ),
    ]
    for what, flag in (("html", "--html"), ("json", "--json"), ("plot", "--plot")):
        name = "{D}/fifo." + ("png" if what == "plot" else what)
        C.append(
            Case(
                f"new/watch/compare-{what}-onto-fifo-forced",
                "compare.py",
                ["{F}/ck", "{F}/run", flag, name, "--force"],
                prep=lambda d, f, n=name: os.mkfifo(n.replace("{D}", str(d))),
            )
        )
        C.append(
            Case(
                f"new/watch/compare-{what}-onto-link-to-fifo",
                "compare.py",
                ["{F}/ck", "{F}/run", flag, "{D}/link", "--force"],
                prep=lambda d, f: (os.mkfifo(d / "p"), os.symlink(d / "p", d / "link")),
            )
        )
    logs = {  # damaged log.jsonl lines: the report goes on without them, saying so
        "train-no-loss": '{"type": "train", "step": 3}',
        "train-loss-text": '{"type": "train", "step": 3, "loss": "2.0"}',
        "eval-no-set": '{"type": "eval", "step": 3, "loss": 2.0}',
        "eval-set-number": '{"type": "eval", "step": 3, "set": 5, "loss": 2.0}',
        "samples-step-text": '{"type": "samples", "step": "3", "samples": []}',
        "samples-not-list": '{"type": "samples", "step": 3, "samples": "x"}',
        "samples-items-bad": '{"type": "samples", "step": 3, "samples": [1, 2]}',
        "samples-seed-html": '{"type": "samples", "step": 3, "seed": "<script>", "samples": []}',
        "step-negative": '{"type": "train", "step": -1, "loss": 1.0}',
        "a-list": "[1, 2, 3]",
        "deep": DEEP,
        "huge-int": '{"type": "train", "step": ' + HUGE + ', "loss": 1.0}',
    }
    for name, line in logs.items():

        def damage(r: Path, line=line):
            with open(r / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(line + "\n" + '{"type": "train", "step": 4, "loss": 1.0}\n')

        C.append(
            Case(
                f"new/watch/log-{name}",
                "compare.py",
                ["{F}/ck", "{D}/run", "--html", "{D}/r.html"],
                prep=then(copy_of("run", "run"), damage),
                expect="ok",
                says="left out",
            )
        )
    snaps = {
        "weights-text": '{"step": 2, "weights": {"wte.weight": "x"}}',
        "step-text": '{"step": "2"}',
        "activations-list": '{"step": 2, "activations": [1]}',
    }
    for name, line in snaps.items():
        C.append(
            Case(
                f"new/watch/snapshots-{name}",
                "compare.py",
                ["{F}/ck", "{D}/run"],
                expect="ok",
                says="left out",
                prep=then(copy_of("run", "run"), lambda r, line=line: write(r / "snapshots.jsonl", line + "\n")),
            )
        )
    adapters = {
        "targets-number": {"target_modules": 5},
        "targets-numbers": {"target_modules": [1, 2]},
        "r-negative": {"target_modules": ["c_attn"], "r": -1},
        "alpha-text": {"target_modules": ["c_attn"], "lora_alpha": "x"},
        "not-object": None,
    }

    def adapter_damage(config):
        def damage(r: Path):
            (r / "final" / "adapter").mkdir(exist_ok=True)
            write(r / "final" / "adapter" / "adapter_config.json", "[1]" if config is None else json.dumps(config))

        return damage

    for name, config in adapters.items():
        C.append(
            Case(
                f"new/watch/adapter-{name}",
                "compare.py",
                ["{F}/ck", "{D}/run/final"],
                prep=then(copy_of("run", "run"), adapter_damage(config)),
            )
        )
    for name, args in {
        "sample-tokens-1e9": {"sample_tokens": 10**9},
        "prompt-surrogate": {"sample_prompt": ["\ud800"]},
        "prompt-number": {"sample_prompt": [5]},
        "sample-tokens-text": {"sample_tokens": "9"},
    }.items():
        C.append(
            Case(
                f"new/watch/resume-run.json-{name}",
                "train.py",
                ["--out", "{D}/run", "--resume", "--steps", "6"],
                prep=then(copy_of("run", "run"), lambda r, a=args: merge_args(r, a)),
            )
        )
    return C


def merge_args(run: Path, args: dict) -> None:
    edit_json(run / "run.json", args={**json.loads((run / "run.json").read_text())["args"], **args})


def new_recipe_cases(train_base: list) -> list[Case]:
    """--extend-vocab, --embed-warmup, --new-token-lr and LoRA on a grown vocabulary: set-ups that
    stop half way, resumes that change them, their files damaged."""
    grow = [*train_base, "--extend-vocab", "30", "--out", "{D}/run"]
    at = train_base.index("--steps")
    epochs = [*train_base[:at], *train_base[at + 2 :], "--extend-vocab", "30", "--out", "{D}/run", "--epochs", "0.002"]
    C = [
        Case(
            "new/recipe/refused-after-merges",
            "train.py",
            [*epochs, "--embed-warmup", "50"],
            no_new=("run",),
            follow=[*epochs, "--embed-warmup", "1"],
        ),
        Case(
            "new/recipe/embed-warmup-without-grow",
            "train.py",
            [*train_base, "--out", "{D}/run", "--embed-warmup", "1"],
            no_new=("run",),
        ),
        Case(
            "new/recipe/embed-warmup-too-long",
            "train.py",
            [*grow, "--steps", "2", "--embed-warmup", "2"],
            no_new=("run",),
        ),
        Case("new/recipe/embed-warmup-neg", "train.py", [*grow, "--embed-warmup", "-1"], no_new=("run",)),
        Case("new/recipe/new-token-lr-nan", "train.py", [*grow, "--new-token-lr", "nan"], no_new=("run",)),
        Case("new/recipe/new-token-lr-0", "train.py", [*grow, "--new-token-lr", "0"], no_new=("run",)),
        Case(
            "new/recipe/new-token-lr-without-grow",
            "train.py",
            [*train_base, "--out", "{D}/run", "--new-token-lr", "1e-3"],
            no_new=("run",),
        ),
        Case(
            "new/recipe/extend-vocab-huge",
            "train.py",
            [*train_base, "--out", "{D}/run", "--extend-vocab", "100000"],
            no_new=("run",),
        ),
        Case("new/recipe/vocab-from-missing", "train.py", [*grow, "--vocab-from", "{D}/none.txt"], no_new=("run",)),
        Case("new/recipe/lora-grow-ok", "train.py", [*grow, "--lora", "2"], expect="ok"),
        Case("new/recipe/embed-warmup-ok", "train.py", [*grow, "--steps", "3", "--embed-warmup", "1"], expect="ok"),
    ]
    leftovers = {  # what a SIGKILL in set-up leaves: the same command, and --resume, must work
        "tokenizer": lambda r: (r / "tokenizer").mkdir(parents=True) or write(r / "tokenizer" / "vocab.json", "{"),
        "grown-base": lambda r: (r / "grown-base").mkdir(parents=True) or write(r / "grown-base" / "config.json", "{"),
        "tensorboard": lambda r: (r / "tensorboard").mkdir(parents=True) or write(r / "tensorboard" / "events.x", "x"),
        "all-three-and-lock": lambda r: (
            [(r / n).mkdir(parents=True) for n in ("tokenizer", "grown-base", "tensorboard")] and write(r / ".lock", "")
        ),
    }
    for name, make in leftovers.items():
        for resume in ([], ["--resume"]):
            C.append(
                Case(
                    f"new/recipe/leftover-{name}{'-resume' if resume else ''}",
                    "train.py",
                    [*grow, "--steps", "2", *resume],
                    prep=lambda d, f, make=make: make(d / "run"),
                    expect="ok",
                    says="stopped during its set-up",
                )
            )
    C.append(
        Case(
            "new/recipe/leftover-resume-no-data",
            "train.py",
            ["--out", "{D}/run", "--resume"],
            prep=lambda d, f: leftovers["tokenizer"](d / "run"),
        )
    )
    C.append(
        Case(
            "new/recipe/leftover-with-user-file",
            "train.py",
            [*grow, "--steps", "2"],
            prep=lambda d, f: (leftovers["tokenizer"](d / "run"), write(d / "run" / "notes.txt", "mine")),
        )
    )
    resume = ["--out", "{D}/run", "--resume"]
    changes = {  # resuming the warm run (--extend-vocab 40 --embed-warmup 2, 4 steps) and the grown one
        "warm-longer": ("warm", ["--steps", "8", "--embed-warmup", "6"], "ok"),
        "warm-drop-warmup": ("warm", ["--steps", "8", "--embed-warmup", "0"], "error"),
        "warm-new-lr-too": ("warm", ["--steps", "8", "--new-token-lr", "1e-3"], "ok"),
        "warm-warmup-past-steps": ("warm", ["--steps", "6", "--embed-warmup", "6"], "error"),
        "grown-add-warmup": ("grown", ["--steps", "8", "--embed-warmup", "2"], "error"),
        "grown-add-new-lr": ("grown", ["--steps", "8", "--new-token-lr", "1e-3"], "error"),
        "grown-longer": ("grown", ["--steps", "6"], "ok"),
        "grownlora-add-new-lr": ("grownlora", ["--steps", "6", "--new-token-lr", "1e-3"], "ok"),
        "grownlora-extend-more": ("grownlora", ["--steps", "6", "--extend-vocab", "50"], "error"),
    }
    for name, (src, extra, expect) in changes.items():
        C.append(
            Case(
                f"new/recipe/resume-{name}",
                "train.py",
                [*resume, *extra],
                prep=copy_of(src, "run"),
                expect=expect,
                follow=[*resume, "--steps", "9"] if expect == "error" else None,
            )
        )
    base_damage = {
        "weights-cut": (lambda r: truncate(r / "grown-base" / "model.safetensors", 0.5), "was damaged"),
        "config-deleted": (lambda r: (r / "grown-base" / "config.json").unlink(), "was damaged"),
        "vocab-deleted": (lambda r: (r / "grown-base" / "vocab.json").unlink(), "was damaged"),
        "config-garbage": (lambda r: write(r / "grown-base" / "config.json", "{x"), "was damaged"),
        "folder-deleted": (lambda r: shutil.rmtree(r / "grown-base"), ""),
        "weights-zero": (lambda r: write(r / "grown-base" / "model.safetensors", b""), "was damaged"),
    }
    for name, (damage, says) in base_damage.items():
        C.append(
            Case(
                f"new/recipe/grown-base-{name}",
                "train.py",
                [*resume, "--steps", "6"],
                expect="ok",
                says=says,
                prep=then(copy_of("grownlora", "run"), damage),
            )
        )
    C.append(  # (learned again from the same data and options: the same merges)
        Case(
            "new/recipe/tokenizer-deleted-resume",
            "train.py",
            [*resume, "--steps", "6"],
            prep=then(copy_of("grown", "run"), lambda r: shutil.rmtree(r / "tokenizer")),
            expect="ok",
        )
    )
    return C


def new_signal_cases(train_base: list) -> list[Case]:
    """Signals in the new phases: learning merges, tokenizing, set-up; and compare.py's last moments."""
    grow = [*train_base, "--extend-vocab", "300", "--out", "{D}/run", "--steps", "2"]
    C = []
    for t in (1.0, 2.5, 4.0, 6.0, 9.0):
        for sig in (signal.SIGINT, signal.SIGTERM):
            C.append(
                Case(f"new/signal/merges-{sig.name}@{t}", "train.py", grow, expect="signal", send=(sig, t), follow=grow)
            )
        C.append(
            Case(
                f"new/signal/merges-SIGKILL@{t}",
                "train.py",
                grow,
                expect="killed",
                send=(signal.SIGKILL, t),
                follow=grow,
            )
        )
    for t in (2.0, 4.0, 6.0):
        C.append(
            Case(
                f"new/signal/merges-two-SIGINT@{t}",
                "train.py",
                grow,
                expect="signal",
                send=[(signal.SIGINT, t), (signal.SIGINT, t + 0.3)],
                follow=grow,
            )
        )
        C.append(
            Case(
                f"new/signal/merges-SIGINT-SIGTERM@{t}",
                "train.py",
                grow,
                expect="signal",
                send=[(signal.SIGINT, t), (signal.SIGTERM, t + 0.2)],
                follow=grow,
            )
        )
    html = ["{F}/ck", "{F}/run", "--html", "{D}/r.html", "--json", "{D}/r.json"]
    for t in (3.0, 5.0, 7.0, 9.0, 12.0):
        for sig in (signal.SIGTERM, signal.SIGINT):
            C.append(
                Case(f"new/signal/compare-html-{sig.name}@{t}", "compare.py", html, expect="signal", send=(sig, t))
            )
    words = ["--data", "{D}/w.txt", *train_base[2:], "--out", "{D}/run"]
    for t in (2.0, 5.0):
        C.append(
            Case(
                f"new/signal/tokenizing-word-list-SIGINT@{t}",
                "train.py",
                words,
                expect="signal",
                send=(signal.SIGINT, t),
                prep=put("w.txt", word_list),
                follow=words,
            )
        )
    return C


def new_surfaces(train_base: list) -> list[Case]:
    return (
        new_data_cases(train_base)
        + new_watch_cases(train_base)
        + new_recipe_cases(train_base)
        + new_signal_cases(train_base)
    )


def nan_state(ck: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "trainer_state.safetensors"))
    state = {
        k: (
            v.float().fill_(float("nan")).to(v.dtype)
            if v.is_floating_point()
            else v.fill_(255)
            if k.startswith("rng")
            else v
        )
        for k, v in state.items()
    }
    save_file(state, str(ck / "trainer_state.safetensors"))


# ---------------------------------------------------------------------------------------------
# running and judging


def checksums(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and ".lock" not in p.name:
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def follow_up(case: Case, fixtures: Path, d: Path, env: dict):
    """The command after a case: its `follow` arguments, and when they meet a run (it got that far),
    the same with --resume."""
    command = [sys.executable, str(ROOT / case.script), *fill(case.follow, fixtures, d)]
    again = subprocess.run(command, env=env, cwd=d, capture_output=True, text=True, timeout=TIMEOUT)
    if again.returncode != 0 and "already holds a run" in again.stderr and "--resume" not in command:
        again = subprocess.run([*command, "--resume"], env=env, cwd=d, capture_output=True, text=True, timeout=TIMEOUT)
    return again


def fill(args: list, fixtures: Path, d: Path) -> list[str]:
    return [str(a).replace("{F}", str(fixtures)).replace("{D}", str(d)) for a in args]


def run_case(case: Case, fixtures: Path, work: Path) -> tuple[str, str]:
    d = work / case.name.replace("/", "_").replace(" ", "_")[:120]
    d.mkdir(parents=True)
    if case.prep:
        case.prep(d, fixtures)
    before_d, before_f = checksums(d), checksums(fixtures / "ck")
    args = fill(case.args, fixtures, d)
    env = env_for(fixtures, **case.env)
    limit = int(case.env.get("MINIGPT2_TRIAL_FSIZE", 0))

    def preexec():
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if case.stdout_closed:  # as `>&-`: the child's fd 1 is closed, not /dev/null
            os.close(1)

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / case.script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=d,
        preexec_fn=preexec,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    start = time.monotonic()
    try:
        for sig, after in [case.send] if isinstance(case.send, tuple) else case.send or []:
            try:
                proc.wait(timeout=max(0.0, after - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT - (time.monotonic() - start))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return "hang", f"still running after {TIMEOUT}s"
    rc = proc.returncode
    err = err or ""
    after_d = checksums(d)
    lost = [k for k, v in before_d.items() if after_d.get(k) != v and not k.startswith("run/") and k != "run.json"]
    lost += [k for k, v in checksums(fixtures / "ck").items() if before_f.get(k) != v]
    tail = err.strip().splitlines()[-1][:200] if err.strip() else f"(no stderr; exit {rc})"
    if "Traceback (most recent call last)" in err or "Exception ignored" in err:
        return "traceback", err.strip().splitlines()[-1][:200]
    if lost and case.expect != "ok":
        return "lost", f"changed: {lost[:3]}"
    litter = [p for p in case.no_new if (d / p).exists() and p not in before_d]  # (before the next command)
    if case.follow is not None:  # the folder it left must serve the next command: the same one, or a resume
        again = follow_up(case, fixtures, d, env)
        if again.returncode != 0 or "Traceback" in again.stderr:
            return "lost", f"then unusable: {(again.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    if case.expect == "killed":
        return "right", f"exit {rc}; the next command works"
    if case.expect == "error":
        if rc == 0:
            return "silent", f"exit 0; {tail}"
        if litter:
            return "litter", f"left {litter}; {tail}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if len(errors) != 1 or rc in (-9, -11, -6):
            return "unclear", f"exit {rc}; {tail}"
        return "right", errors[0][:200]
    if case.expect == "signal":
        sent = [case.send] if isinstance(case.send, tuple) else case.send
        if rc == 0 and sent and sent[0][1] > 2:
            return "right", f"finished before the signal; {tail}"
        if rc not in (*(128 + s for s, _ in sent), 0, 130):
            return "unclear", f"exit {rc}; {tail}"
        return "right", tail
    if rc != 0:
        return "unclear", f"exit {rc}; {tail}"
    if case.says and case.says not in (out or "") + err:
        return "silent", f"exit 0 without saying {case.says!r}; {tail}"
    return "right", tail


def main() -> int:
    global TIMEOUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", help="run the cases whose name contains this (repeat: any of them)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--timeout",
        type=int,
        default=TIMEOUT,
        help="seconds before a case is judged a hang (raise it on a loaded machine)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", help="write every case's verdict here")
    a = p.parse_args()
    TIMEOUT = a.timeout
    all_cases = [c for c in cases() if not a.only or any(o in c.name for o in a.only)]
    if a.list:
        print("\n".join(c.name for c in all_cases))
        return 0
    base = Path(tempfile.mkdtemp(prefix="minigpt2-trial-"))
    fixtures = base / "fixtures"
    fixtures.mkdir()
    t0 = time.monotonic()
    build_fixtures(fixtures)
    print(f"fixtures ready in {time.monotonic() - t0:.0f}s; {len(all_cases)} cases", flush=True)
    results = {}

    def one(case):
        try:
            verdict, detail = run_case(case, fixtures, base / "cases")
        except Exception as e:  # a case that could not even be set up is the trial's own bug
            verdict, detail = "trial-error", repr(e)[:200]
        print(f"{verdict:10s} {case.name}: {detail}", flush=True)
        return case.name, verdict, detail

    with ThreadPoolExecutor(a.jobs) as pool:
        for name, verdict, detail in pool.map(one, all_cases):
            results[name] = (verdict, detail)
    counts = {}
    for verdict, _ in results.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    if a.json:
        Path(a.json).write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{len(results)} cases in {time.monotonic() - t0:.0f}s: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
