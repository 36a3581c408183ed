"""Does teaching GPT-2 Chinese words pay? A model continued as it is against the same model grown
with `--extend-vocab`, for the same wall-clock time of training, through the real command lines.

1. A small GPT-2 is trained from scratch on the four shared novels with GPT-2's tokenizer (the
   "model that already knows some Chinese"; GPT-2 itself cannot be downloaded here).
2. It is continued twice, side by side on one thread each (so both see the same machine), for the
   same seconds of training counted from each run's first step (start-up and the learning of the
   merges are not counted; then Ctrl-C, which saves): as it is, and grown with `--extend-vocab N`
   (the merges are learned, and cached, beforehand).
3. Both are measured the same way: bits per character on held-out Lu Xun (compare.py, each with
   its own tokenizer, on the same characters) and Chinese characters generated per second
   (sample.py, the same prompts and seeds).

    python benchmarks/bench_vocab.py                         # ~15 minutes on a 2-core CPU
    python benchmarks/bench_vocab.py --seconds 60 --base-steps 100 --merges 2000   # quicker

The last line is the grown model's figures relative to the model continued as it is.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")
PROMPTS = ("话说", "却说那", "宝玉道：")


def run(*args, timeout=3600):
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{result.stderr}")
    return result.stdout


def train_side_by_side(seconds: float, runs: dict[str, list]) -> dict[str, dict]:
    """Run each train.py (one thread each, at the same time, so both see the same machine) until
    `seconds` after its first training step, then Ctrl-C it (it saves)."""
    procs, started = {}, {}
    for name, args in runs.items():
        procs[name] = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--threads", "1"], cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    logs = {name: Path(args[args.index("--out") + 1]) / "log.jsonl" for name, args in runs.items()}
    while any(proc.returncode is None for proc in procs.values()):
        for name, proc in procs.items():
            if proc.returncode is not None:
                continue
            if proc.poll() is not None:
                sys.exit(f"train.py ({name}) ended early: {proc.stderr.read()}")
            log = logs[name]
            if name not in started and log.exists() and '"type": "train"' in log.read_text(encoding="utf-8"):
                started[name] = time.time()
            if name in started and time.time() - started[name] >= seconds:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=600)
        time.sleep(0.2)
    results = {}
    for name in procs:
        steps = [json.loads(line) for line in logs[name].read_text(encoding="utf-8").splitlines() if '"train"' in line]
        results[name] = {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"], "seconds": seconds}
    return results


def chars_per_second(model: Path, seed: int) -> float:
    chars = seconds = 0.0
    for prompt in PROMPTS:
        line = run("sample.py", prompt, "--model", model, "--max-new-tokens", 200, "--seed", seed, "--json")
        record = json.loads(line.splitlines()[-1])
        chars += len(record["text"])
        seconds += record["tokens"] / record["tokens_per_second"]
    return chars / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--seconds", type=float, default=180, help="training time of each continuation")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--merges", type=int, default=8000)
    args = p.parse_args()
    data = Path(os.environ["MINIGPT2_SHARED_DATA"])
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-vocab-"))
    novels = [data / "zh" / n for n in NOVELS]
    luxun = data / "zh" / "鲁迅小说集.txt"
    shape = ["--n-layer", 4, "--n-head", 4, "--n-embd", 128, "--context", 128]
    common = ["--data", *novels, "--batch-size", 8, "--seq-len", 128, "--eval-every", 0, "--save-every", 0]
    env_cache = ["--cache-dir", root / "cache"]

    base = root / "base"
    if not (base / "final").is_dir():
        t = time.time()
        run(
            "train.py",
            *common,
            *env_cache,
            "--init-preset",
            "gpt2",
            *shape,
            "--tokenizer",
            data / "gpt2",
            "--steps",
            args.base_steps,
            "--lr",
            "2e-3",
            "--out",
            base,
        )
        print(f"base: {args.base_steps} steps from scratch in {time.time() - t:.0f} s")
    from minigpt2.io.tokenizer import load_tokenizer
    from minigpt2.training.data import check_inputs
    from minigpt2.training.vocab import learn_merges_cached

    t = time.time()
    learn_merges_cached(check_inputs(novels), load_tokenizer(data / "gpt2"), args.merges, root / "cache")
    print(f"{args.merges} merges learned (or found cached) in {time.time() - t:.0f} s")

    runs = {}
    for name, extra in (("as is", []), ("grown", ["--extend-vocab", args.merges])):
        out = root / name.replace(" ", "-")
        runs[name] = [*common, *env_cache, "--model", base / "final", "--lr", "1e-3", "--steps", 100000, *extra,
                      "--out", out]  # fmt: skip
    results = train_side_by_side(args.seconds, runs)
    for name, r in results.items():
        r["out"] = root / name.replace(" ", "-")
        print(f"{name}: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.0f} s of training")
    run(
        "compare.py",
        base / "final",
        *(r["out"] for r in results.values()),
        "--text",
        luxun,
        "--max-eval-tokens",
        16384,
        "--json",
        root / "compare.json",
        "--force",
    )
    report = json.loads((root / "compare.json").read_text(encoding="utf-8"))
    bpc = {m["source"]: m["behaviour"][0]["bits_per_char"] for m in report["models"]}
    print(f"\n{'model':<8} {'steps':>6} {'tokens':>10} {'Lu Xun bpc':>11} {'chars/s':>8}")
    print(f"{'base':<8} {'':>6} {'':>10} {bpc[str(base / 'final')]:>11.3f} {'':>8}")
    for name, r in results.items():
        r["bpc"], r["chars_per_s"] = bpc[str(r["out"])], chars_per_second(r["out"], seed=1)
        print(f"{name:<8} {r['steps']:>6} {r['tokens']:>10,} {r['bpc']:>11.3f} {r['chars_per_s']:>8.1f}")
    a, b = results["as is"], results["grown"]
    print(
        f"grown / as is: Lu Xun bpc {b['bpc'] / a['bpc']:.3f}x (lower is better), "
        f"characters per second {b['chars_per_s'] / a['chars_per_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
