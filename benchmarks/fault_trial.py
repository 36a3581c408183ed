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
    for command in (run, grown):
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

    # --- 12. what should simply work
    C.append(Case("works/sample", "sample.py", ["今天", "--model", "{F}/ck", "--max-new-tokens", "8"], expect="ok"))
    C.append(
        Case("works/sample-run", "sample.py", ["今天", "--model", "{F}/run", "--max-new-tokens", "8"], expect="ok")
    )
    C.append(Case("works/compare-run", "compare.py", ["{F}/run"], expect="ok"))
    C.append(Case("works/train", "train.py", [*train_base, "--out", "{D}/run"], expect="ok"))
    return C


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


def run_case(case: Case, fixtures: Path, work: Path) -> tuple[str, str]:
    d = work / case.name.replace("/", "_").replace(" ", "_")[:120]
    d.mkdir(parents=True)
    if case.prep:
        case.prep(d, fixtures)
    before_d, before_f = checksums(d), checksums(fixtures / "ck")
    args = [a.replace("{F}", str(fixtures)).replace("{D}", str(d)) for a in case.args]
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
        if case.send:
            sig, after = case.send
            try:
                proc.wait(timeout=after)
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
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:200]
    if lost and case.expect != "ok":
        return "lost", f"changed: {lost[:3]}"
    if case.expect == "error":
        if rc == 0:
            return "silent", f"exit 0; {tail}"
        litter = [p for p in case.no_new if (d / p).exists() and p not in before_d]
        if litter:
            return "litter", f"left {litter}; {tail}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if len(errors) != 1 or rc in (-9, -11, -6):
            return "unclear", f"exit {rc}; {tail}"
        return "right", errors[0][:200]
    if case.expect == "signal":
        if rc == 0 and case.send and case.send[1] > 2:
            return "right", f"finished before the signal; {tail}"
        if rc not in (128 + case.send[0], 0, 130):
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
