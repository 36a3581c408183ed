"""Every code block of README.md and docs/*.md runs as written.

The blocks run in a throw-away folder against a fake Hugging Face cache of their own (an 8-layer
GPT-2 of width 32 with GPT-2's vocabulary, under the real name `openai-community/gpt2`, so "gpt2"
in a block means it), offline, with the files the blocks name (my-novel.txt, novels/, luxun.txt, ...)
made from tests/data. ```python blocks run whole; the lines of ```bash blocks that run one of the
project's scripts run one by one, in order, through bash (so `\\` continuations and `>` work). What
does not run is listed below, each with its reason; the one change made to a command is named in
SHORTER (time: the defaults train 500 steps).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import populate_hub_cache, random_hf_model
from clis import ROOT, offline_env, run_script, zygote_python

from minigpt2.io.tokenizer import GPT2_DIR

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "sample.py", "compare.py")
TEST_DATA = ROOT / "tests" / "data"

# ```python blocks that are excerpts of the package's source, not programs: each must appear in
# that file verbatim (so it cannot go stale), which is what this test checks of them.
EXCERPTS = {"docs/training-options.md": ROOT / "minigpt2" / "training" / "options.py"}
# A page whose ```python blocks are one program, run in order (test_comparing_python_blocks_run).
RUN_TOGETHER = "docs/comparing.md"

# Lines of ```bash blocks that are not run, with the reason.
NOT_RUN = {
    "python -m venv": "makes a virtual environment: CI runs the quick start so (.ci/quickstart)",
    "pip install": "installs packages (needs the network): CI's .ci/quickstart runs it",
    "ruff check": "the lint, run by CI itself",
    "lint-imports": "the import contracts, run by CI itself",
    "python -m pytest": "the test suite itself",
    "torchrun": "several processes on GPUs (tests/test_distributed.py runs torchrun on CPU)",
    "hf:": "a Hugging Face dataset download (tests/test_formats.py reads a dataset folder offline)",
    "tensorboard --logdir": "starts a server that runs until stopped",
    "compare.py base ": "`base`, runs/full, runs/lora4/8 stand for the benchmark's models: the same command on "
    "real runs runs here as `compare.py gpt2 runs/zh runs/zh-lora`",
    "train.py ...": "an elided command line (the torchrun example's second machine)",
    "DIR/": "a template over bench_recipes.py's output folder (DIR, RECIPE): docs/recipes.md's own runs",
}

# The one change made to a command: train.py's defaults train 500 steps, and --resume --steps 1000
# continues to 1000; a few steps show the same command works.
SHORTER = {"--steps 1000": "--steps 6"}
TRAIN_STEPS = ["--steps", "3"]


def fenced_blocks(lang: str):
    """(relative path, line number, text) of every ```lang block in README.md and docs/*.md."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M):
            yield path.relative_to(ROOT).as_posix(), text[: match.start()].count("\n") + 1, match.group(1)


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def not_run_reason(command: str) -> str | None:
    return next((reason for needle, reason in NOT_RUN.items() if needle in command), None)


@pytest.fixture(scope="module")
def docs_hub(tmp_path_factory) -> Path:
    """HF_HOME holding `openai-community/gpt2` as an 8-layer GPT-2 of width 32 (the README's
    Python block hooks h.7), with GPT-2's tokenizer files."""
    home = tmp_path_factory.mktemp("docs-hf")
    model = random_hf_model(n_layer=8, n_head=2, n_embd=32, n_positions=128, seed=7)
    files = {name: GPT2_DIR / name for name in ("vocab.json", "merges.txt")}
    populate_hub_cache(home / "hub", "openai-community/gpt2", model, extra_files=files)
    return home


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's folder: the scripts beside the text files the blocks name."""
    root = tmp_path_factory.mktemp("docs-run")
    for script in SCRIPTS:
        (root / script).symlink_to(ROOT / script)
    zh = (TEST_DATA / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:20000]
    en = (TEST_DATA / "en" / "sherlock_holmes.txt").read_text(encoding="utf-8")[:20000]
    for name, text in {
        "my-novel.txt": zh,
        "novels/luxun.txt": zh,
        "novels/water-margin.txt": (TEST_DATA / "zh" / "水浒传.txt").read_text(encoding="utf-8")[:20000],
        "luxun.txt": zh[:6000],
        "english.txt": en[:6000],
        "chapter1.txt": zh[:300],
        "zh.txt": zh[:6000],
        "en.txt": en[:6000],
        "zh/鲁迅小说集.txt": zh,
        "en/sherlock.txt": en[:6000],
        "data/zh/鲁迅小说集.txt": zh[:6000],
        "data/en/sherlock_holmes.txt": en[:6000],
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    rows = "".join(
        json.dumps({"body": zh[i : i + 500], "id": i}, ensure_ascii=False) + "\n" for i in range(0, 20000, 500)
    )
    (root / "rows.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    bindir = root / ".bin"  # `python` on PATH is this Python
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    return root


def run_env(hf_home: Path, workdir: Path) -> dict[str, str]:
    env = offline_env(hf_home, PYTHONPATH=str(ROOT))
    env["PATH"] = f"{workdir / '.bin'}{os.pathsep}{env['PATH']}"
    return env


def as_run(command: str, workdir: Path) -> str:
    """The command as this test runs it: SHORTER's substitutions; a train.py without --steps gets
    TRAIN_STEPS (the defaults train 500). A new run (train.py without --resume) starts in a fresh
    --out, as a user's would: the folder an earlier block's example made under that name is removed;
    so is a report file (compare.py's --plot, --html, --json) an earlier block wrote."""
    for old, new in SHORTER.items():
        command = command.replace(old, new)
    words = shlex.split(command, comments=True)
    if "train.py" in words and "--steps" not in words:
        command = f"{command.split(' #')[0]} {shlex.join(TRAIN_STEPS)}"
    if "train.py" in words and "--resume" not in words and "--out" in words:
        shutil.rmtree(workdir / words[words.index("--out") + 1], ignore_errors=True)
    for flag in ("--plot", "--html", "--json") if "compare.py" in words else ():  # a report an earlier block wrote
        if flag in words:
            (workdir / words[words.index(flag) + 1]).unlink(missing_ok=True)
    return command


def test_readme_python_block_runs(docs_hub, workdir):
    """The "In Python" block, pasted as is, then the claims of its comments."""
    (block,) = [text for path, _, text in fenced_blocks("python") if path == "README.md"]
    claims = """
assert logits.shape == (1, idx.shape[1] - 1, 50257) and loss.ndim == 0, (logits.shape, loss)
assert seen["mlp"].shape == (1, idx.shape[1], model.config.n_embd)
assert model(idx).shape == (1, idx.shape[1], 50257)
assert out.shape == (1, idx.shape[1] + 20) and out[0, : idx.shape[1]].tolist() == idx[0].tolist()
from pathlib import Path
assert {"config.json", "model.safetensors"} <= {p.name for p in Path("my-gpt2").iterdir()}
assert not model.training and enc.eot_token == 50256
print("claims hold")
"""
    program = workdir / "readme_block.py"
    program.write_text(block + claims, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, program.name], cwd=workdir, env=run_env(docs_hub, workdir), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "claims hold" in result.stdout


def test_comparing_python_blocks_run(docs_hub, workdir):
    """docs/comparing.md's blocks, one program in order, on a run of the tiny GPT-2 (`runs/zh`)."""
    blocks = [text for path, _, text in fenced_blocks("python") if path == RUN_TOGETHER]
    assert len(blocks) >= 2
    env = run_env(docs_hub, workdir)
    shutil.rmtree(workdir / "runs" / "zh", ignore_errors=True)
    trained = run_script("train.py", "--data", workdir / "my-novel.txt", "--out", workdir / "runs" / "zh",
                         *TRAIN_STEPS, env=env, timeout=300)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    claims = """
assert [r["unit"] for r in rows] == ["embedding", *(f"h.{i}" for i in range(8)), "ln_f"]
assert len(lens_a) == len(lens_b) == 9 and seen["h.7.mlp"].shape == (1, ids.shape[1], b.config.n_embd)
print("claims hold")
"""
    program = workdir / "comparing_blocks.py"
    program.write_text("\n".join(blocks) + claims, encoding="utf-8")
    result = subprocess.run([sys.executable, program.name], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "claims hold" in result.stdout


def test_python_excerpts_are_in_the_source():
    for path, line, text in fenced_blocks("python"):
        if path in ("README.md", RUN_TOGETHER):
            continue
        assert path in EXCERPTS, f"{path}:{line}: a ```python block that is neither run nor a listed excerpt"

        def bare(code: str) -> str:  # as ruff formats it or not: no spaces, no trailing commas
            return re.sub(r"\s+", "", code).replace(",)", ")")

        source = bare(EXCERPTS[path].read_text(encoding="utf-8"))
        assert bare(text) in source, f"{path}:{line} is no longer in {EXCERPTS[path]}"


def test_every_bash_line_is_run_or_listed():
    """A new command in the docs either names a project script (and runs below) or is in NOT_RUN."""
    for path, line, block in fenced_blocks("bash"):
        for command in commands(block):
            runs = any(f"python {script}" in command for script in SCRIPTS)
            assert runs or not_run_reason(command), f"{path}:{line}: {command!r} neither runs nor is listed"


def test_recipe_tables_are_the_measured_commands():
    """README's and docs/recipes.md's recipe commands are what benchmarks/bench_recipes.py ran."""
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "benchmarks" / "bench_recipes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def words(command) -> tuple[str, ...]:  # 2e-3 and 0.002 alike
        return tuple(str(float(w)) if re.fullmatch(r"\d+(\.\d+)?e-?\d+|\d+\.\d+", w) else w for w in command)

    measured = {words(map(str, bench.recipe_args(name, 8000, 10))) for name in bench.RECIPES}
    for doc in ("README.md", "docs/recipes.md"):
        rows = [line for line in (ROOT / doc).read_text(encoding="utf-8").splitlines() if line.startswith("|")]
        cells = [cell for row in rows for cell in re.findall(r"`(--[^`]*)`", row) if " --lr " in f" {cell} "]
        assert len(cells) >= 4, doc  # README's 4 rows, recipes.md's two tables
        for cell in cells:
            assert words(cell.split()) in measured, f"{doc}: `{cell}` is not a recipe bench_recipes.py measured"


def bash_commands() -> list[tuple[str, str]]:
    """(where, command) of every bash line that runs, each command once, in the order of the docs."""
    seen, out = set(), []
    for path, line, block in fenced_blocks("bash"):
        for command in commands(block):
            key = command.split(" #")[0].strip()
            if not_run_reason(command) is None and key not in seen:
                seen.add(key)
                out.append((f"{path}:{line}", command))
    return out


@pytest.mark.slow
def test_bash_blocks_run(docs_hub, workdir):
    """Each command in order (a later one reads the runs an earlier one made), exit status 0.
    `python` is the tests' stand-in (tests/zygote.py): each command runs in a fork of a Python that
    imported torch once, as `python SCRIPT ...` would (25 fresh interpreters took minutes)."""
    python = workdir / ".bin" / "python"
    python.unlink()
    python.symlink_to(zygote_python())
    env = run_env(docs_hub, workdir)
    ran = []
    for where, command in bash_commands():
        command = as_run(command, workdir)
        result = subprocess.run(
            ["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{where}: {command}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 20, ran
    assert (workdir / "zh.png").stat().st_size > 0 and (workdir / "report.html").stat().st_size > 0
    assert (workdir / "samples.jsonl").read_text(encoding="utf-8").strip()
