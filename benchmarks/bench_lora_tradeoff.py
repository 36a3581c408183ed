"""LoRA learns less and forgets less? Full fine-tuning against LoRA of two ranks, on your CPU.

1. A small GPT-2 is trained from scratch on English (tiny Shakespeare and Pride and Prejudice):
   the "base" that knows one language.
2. It is fine-tuned on the four Chinese novels for the same number of steps three times: every
   weight (full), and LoRA rank 4 and 16 (alpha = 2 x rank, so the update's scale is the same).
3. `compare.py base full lora4 lora16 --text 鲁迅小说集 --text sherlock_holmes --plot ...` puts them in
   one table and one plot: bits per character learned on held-out Chinese (Lu Xun, another author)
   against bits per character lost on held-out English (Sherlock Holmes, never seen).

    python benchmarks/bench_lora_tradeoff.py --dir runs/tradeoff     # ~15 minutes on a 2-core CPU

The last line is each fine-tune's change in bits per character on both texts.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")


def run(*args):
    started = time.time()
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{result.stderr}")
    return result.stdout, time.time() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each contestant")
    args = p.parse_args()
    data = Path(os.environ["MINIGPT2_SHARED_DATA"])
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-lora-"))
    shape = ["--n-layer", 4, "--n-head", 4, "--n-embd", 128, "--context", 128]
    common = ["--batch-size", 8, "--seq-len", 128, "--eval-every", 0, "--save-every", 0, "--cache-dir", root / "cache"]
    base = root / "base"
    if not (base / "final").is_dir():
        english = [data / "en" / "tinyshakespeare.txt", data / "en" / "pride_and_prejudice.txt"]
        _, seconds = run(
            "train.py",
            "--data",
            *english,
            *common,
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
        print(f"base: {args.base_steps} steps on English from scratch in {seconds:.0f} s")
    contestants = {"full": ["--lr", "1e-3"]}
    for r in (4, 16):
        contestants[f"lora{r}"] = ["--lora", r, "--lora-alpha", 2 * r, "--lr", "2e-3"]
    for name, extra in contestants.items():
        out = root / name
        if not (out / "final").is_dir():
            _, seconds = run(
                "train.py",
                "--data",
                *(data / "zh" / n for n in NOVELS),
                *common,
                "--model",
                base / "final",
                "--steps",
                args.steps,
                *extra,
                "--out",
                out,
            )
            state = sum(f.stat().st_size for f in (out / "final").glob("trainer_state.*"))
            print(f"{name}: {args.steps} steps in {seconds:.0f} s; trainer state {state / 1e6:.1f} MB")
    texts = [data / "zh" / "鲁迅小说集.txt", data / "en" / "sherlock_holmes.txt"]
    table, _ = run(
        "compare.py",
        base / "final",
        *(root / n for n in contestants),
        *sum((["--text", t] for t in texts), []),
        "--max-eval-tokens",
        16384,
        "--json",
        root / "tradeoff.json",
        "--plot",
        root / "tradeoff.png",
        "--force",
    )
    print(table)
    report = json.loads((root / "tradeoff.json").read_text(encoding="utf-8"))
    base_bpc = [t["bits_per_char"] for t in report["models"][0]["behaviour"]]
    changes = []
    for model in report["models"][1:]:
        zh, en = (t["bits_per_char"] - b for t, b in zip(model["behaviour"], base_bpc))
        changes.append(f"{Path(model['source']).name} Lu Xun {zh:+.3f}, English {en:+.3f}")
    print("change in bits per character vs the base: " + "; ".join(changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
