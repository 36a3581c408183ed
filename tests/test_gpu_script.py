"""benchmarks/gpu.sh: valid bash, and its CPU dry run goes through every part and prints the table."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from clis import zygote_python

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
PARTS = [
    "checks",
    "train 1x32 minigpt2",
    "train 1x32 transformers",
    "train 1x32 plain PyTorch",
    "sample transformers generate",
    "sample minigpt2",
    "sample minigpt2 int8",
    "sample int8, fp32 output layer",
    "sample int8, 2 threads",
    "sample int8 quality",
    "distributed 2 ranks",
    "gpt2-xl 1 step",
    "gpt2-xl 1 step, act. ckpt",
]


def test_gpu_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_gpu_script_dry_run_prints_every_part(tmp_path):
    # PYTHON: gpu.sh starts each part with it; the tests' stand-in runs them in forks of the zygote
    env = {**os.environ, "GPU_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHON": zygote_python()}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout[result.stdout.index("| part ") :]
    rows = {
        cells[0]: cells for line in table.splitlines()[2:] if (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert list(rows) == PARTS, table
    for name, cells in rows.items():
        expected = "skipped: 1 GPU" if name.startswith("distributed") else "ok"
        assert cells[-1] == expected, table
    assert rows["checks"][1] == "7/7 passed"  # every check of benchmarks/cuda_checks.py
    assert re.fullmatch(r"[\d,.]+", rows["sample minigpt2 int8"][1]) and rows["sample minigpt2 int8"][3].endswith("x")
    assert re.fullmatch(r"[\d.]+ GiB", rows["gpt2-xl 1 step"][4])
    assert re.fullmatch(r"[\d,.]+", rows["train 1x32 plain PyTorch"][1])  # the plain-PyTorch contestant ran
    assert (tmp_path / "train.json").is_file() and (tmp_path / "sample.json").is_file()
