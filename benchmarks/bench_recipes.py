"""Which way teaches an English GPT-2 Chinese best, for a given amount of compute? Five recipes,
each given the same budgets of single-thread CPU seconds, measured on what was learned and lost.

1. A base model is trained from scratch on English only (tiny Shakespeare and Pride and Prejudice):
   it stands in for GPT-2, whose weights cannot be downloaded here.
2. It is adapted to Chinese (the four novels) by each recipe:
      full        every weight                                   --lr 1e-3
      full+vocab  every weight, vocabulary grown by N tokens      --extend-vocab N
      vocab-phase grown; the new rows alone first, at their own   --extend-vocab N --embed-warmup W
                  learning rate, then everything                   --new-token-lr 3e-3
      lora        LoRA adapters only                              --lora 8 --lora-alpha 16 --lr 2e-3
      lora+vocab  LoRA, grown; the new rows train beside them     --lora 8 ... --extend-vocab N
3. Each recipe runs in its own process on one thread (torch.set_num_threads(1)) and is stopped
   when its training has used each budget of CPU time (time.process_time(): what one core
   spends on it, whatever else the machine runs; on a quiet core it equals wall time). The
   learning rate is constant after a short warm-up, so the model at a small budget is exactly
   the same run's model at that point: one run per recipe serves every budget, and a larger
   budget asked later resumes it (bit for bit) instead of starting again.
4. At each budget: bits per character on held-out Chinese (Lu Xun, another author: learned) and
   held-out English (Sherlock Holmes, never trained on: forgotten), Chinese characters generated
   per CPU second, and the size of the trainer state (what a checkpoint adds to the weights).
   Finally compare.py's several-models table and trade-off plot of the largest budget reached.

    python benchmarks/bench_recipes.py --dir runs/recipes --budgets 90 360 1440   # hours on a 2-core CPU
    python benchmarks/bench_recipes.py --dir runs/recipes --budgets 90 360 --jobs 2
    python benchmarks/bench_recipes.py --quick              # seconds: tiny model and texts (CI)

Everything lands in --dir and is reused: the base, each recipe's run, each (recipe, budget)'s
result.json. The last line names, per vocabulary recipe, the smallest budget at which it beats
plain fine-tuning on held-out Chinese (or says that it does not).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")
ENGLISH = ("tinyshakespeare.txt", "pride_and_prejudice.txt")
PROMPTS = ("话说", "却说那", "宝玉道：")
RECIPES = ("full", "full+vocab", "vocab-phase", "lora", "lora+vocab")


def settings(quick: bool) -> dict:
    """Shapes and sizes: the real experiment, or a tiny one that runs in seconds."""
    if quick:
        return {
            "shape": ["--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--context", 32],
            "batch": ["--batch-size", 2, "--seq-len", 32],
            "base_steps": 4,
            "base_evals": 1,  # each evaluation draws samples too: seconds of a quick run
            "merges": 64,
            "warmup_steps": 2,
            "eval_chars": {"zh": 300, "en": 1200},
            "new_tokens": 8,
            "compare_tokens": 256,
        }
    return {
        "shape": ["--n-layer", 4, "--n-head", 4, "--n-embd", 128, "--context", 128],
        "batch": ["--batch-size", 8, "--seq-len", 128],
        "base_steps": 100,
        "base_evals": 4,
        "merges": 8000,
        "warmup_steps": 10,
        "eval_chars": {"zh": 3000, "en": 12000},
        "new_tokens": 100,
        "compare_tokens": 4096,
    }


def recipe_args(name: str, merges: int, warmup_steps: int) -> list:
    vocab = ["--extend-vocab", merges]
    lora = ["--lora", 8, "--lora-alpha", 16, "--lr", 2e-3, "--min-lr", 2e-3]
    full = ["--lr", 1e-3, "--min-lr", 1e-3]
    return {
        "full": full,
        "full+vocab": full + vocab,
        "vocab-phase": full + vocab + ["--embed-warmup", warmup_steps, "--new-token-lr", 3e-3],
        "lora": lora,
        "lora+vocab": lora + vocab,
    }[name]


def shared_data(quick: bool) -> Path:
    """$MINIGPT2_SHARED_DATA, else the shared folder beside the repository; --quick falls back on the
    excerpts the tests ship (tests/data), so it runs in any clone."""
    value = os.environ.get("MINIGPT2_SHARED_DATA")
    candidates = [Path(value)] if value else [ROOT.parent / "shared" / "data"]
    candidates += [ROOT / "tests" / "data"] if quick else []
    for folder in candidates:
        if (folder / "zh").is_dir() and (folder / "en").is_dir():
            return folder
    raise SystemExit("error: the texts were not found: set MINIGPT2_SHARED_DATA to a folder holding zh/ and en/")


def texts(data: Path, quick: bool, root: Path) -> dict:
    """The training and evaluation files; --quick writes small excerpts of them into ROOT/texts (the same
    paths every time: a resumed run must find its data where it was)."""
    novels = [data / "zh" / n for n in NOVELS]
    english = [data / "en" / n for n in ENGLISH]
    held = {"zh": data / "zh" / "鲁迅小说集.txt", "en": data / "en" / "sherlock_holmes.txt"}
    if not quick:
        return {"novels": novels, "english": english, **held}
    folder = root / "texts"
    folder.mkdir(parents=True, exist_ok=True)

    def excerpt(path: Path, chars: int) -> Path:
        out = folder / path.name
        out.write_text(path.read_text(encoding="utf-8")[:chars], encoding="utf-8")
        return out

    return {
        "novels": [excerpt(p, 4000) for p in novels],
        "english": [excerpt(p, 12000) for p in english],
        **{k: excerpt(p, 40000) for k, p in held.items()},
    }


def run(*args) -> str:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{result.stderr[-3000:]}")
    return result.stdout


# ----- one recipe, in its own process ---------------------------------------------------------------


def held_out(path: Path, chars: int) -> str:
    """`chars` characters from 20,000 characters in (past the title pages and the Gutenberg header)."""
    text = path.read_text(encoding="utf-8")
    start = min(20_000, max(0, len(text) - chars))
    return text[start : start + chars]


def measure(checkpoint: Path, t: dict, s: dict) -> dict:
    """Bits per character on both held-out texts, Chinese characters generated per CPU second."""
    import torch

    from minigpt2.generation.generate import Sampling, generate_tokens
    from minigpt2.generation.sampling import is_cjk
    from minigpt2.io.tokenizer import load_tokenizer
    from minigpt2.io.weights import load_model
    from minigpt2.training.vocab import text_score

    model, enc = load_model(checkpoint).eval(), load_tokenizer(checkpoint)
    out = {f"bpc_{k}": text_score(model, enc, held_out(t[k], n), n).bits_per_char for k, n in s["eval_chars"].items()}
    generator = torch.Generator().manual_seed(0)
    started, chars = time.process_time(), 0
    with torch.inference_mode():
        for prompt in PROMPTS:
            steps = generate_tokens(model, [enc.encode_ordinary(prompt)], s["new_tokens"], Sampling(top_k=50),
                                    generator=generator)  # fmt: skip
            chars += sum(map(is_cjk, enc.decode([tok[0] for tok in steps])))
    out["zh_chars_per_cpu_s"] = chars / (time.process_time() - started)
    return out


def one(args, s: dict, t: dict) -> int:
    """Train one recipe to each budget not yet measured (resuming its run), measuring at each."""
    import torch

    from minigpt2.training import distributed
    from minigpt2.training import setup_run as launch
    from minigpt2.training.options import parse
    from minigpt2.training.rundir import STATE_JSON, STATE_TENSORS

    torch.set_num_threads(1)
    root = Path(args.dir)
    out = root / "runs" / args.one
    spent_file = root / "runs" / f"{args.one}.cpu_seconds.json"  # beside the run: its folder holds a run only
    common = ["--data", *t["novels"], "--val-fraction", 0, "--cache-dir", root / "cache", "--steps", 1_000_000,
              "--warmup", 2, "--eval-every", 0, "--save-every", 0, "--keep-last", 0, *s["batch"]]  # fmt: skip
    argv = [*common, "--model", root / "base" / "final", *recipe_args(args.one, s["merges"], s["warmup_steps"])]
    for budget in sorted(args.budgets):
        result_file = root / "results" / f"{args.one}@{budget:g}.json"
        if result_file.is_file():
            continue
        spent = json.loads(spent_file.read_text())["cpu_s"] if spent_file.is_file() else 0.0
        resume = spent > 0
        if not resume and out.exists():
            shutil.rmtree(out)  # a run that never reached its first budget: start it again
        given = parse([str(a) for a in argv] + ["--out", str(out)] + (["--resume"] if resume else []))
        ctx = distributed.setup("cpu")
        saved = launch.read_saved(out) if resume else launch.SavedRun(None, None)
        setup = launch.setup(given, saved, lambda record: None, ctx)
        trainer, started, checkpoint = setup.trainer, None, None
        for record in trainer.run():
            if record["type"] == "start":
                started = time.process_time()
            elif record["type"] == "train" and spent + time.process_time() - started >= budget:
                trainer.request_stop("budget")
                spent += time.process_time() - started
            elif record["type"] == "stopped":
                checkpoint = Path(record["checkpoint"])
        setup.run.unlock()
        spent_file.write_text(json.dumps({"cpu_s": spent, "step": trainer.step}))
        state = sum((checkpoint / f).stat().st_size for f in (STATE_TENSORS, STATE_JSON))
        result = {"recipe": args.one, "budget_cpu_s": budget, "cpu_s": spent, "step": trainer.step,
                  "tokens": trainer.tokens, "checkpoint": str(checkpoint), "trainer_state_bytes": state,
                  **measure(checkpoint, t, s)}  # fmt: skip
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    return 0


def init_check(root: Path, s: dict, t: dict) -> dict:
    """Does the new rows' starting value matter? Held-out bits per character of the grown base at
    step 0 (no training), its new rows set four ways. The tokenizer is the one full+vocab grew."""
    import torch

    from minigpt2.io.tokenizer import load_tokenizer
    from minigpt2.io.weights import load_model
    from minigpt2.training.vocab import grow_model, old_pieces, text_score

    torch.set_num_threads(1)
    base_dir = root / "base" / "final"
    enc, new_enc = load_tokenizer(base_dir), load_tokenizer(root / "runs" / "full+vocab" / "tokenizer")
    grown = grow_model(load_model(base_dir), enc, new_enc).eval()
    wte = grown.wte.weight.data  # (V, C), tied to the output layer
    n_old, n_new = enc.n_vocab, new_enc.n_vocab
    pieces = [old_pieces(enc, new_enc.decode_single_token_bytes(i)) for i in range(n_old, n_new)]
    generator = torch.Generator().manual_seed(0)
    variants = {
        "mean of pieces": wte[n_old:].clone(),
        "first piece": wte[[p[0] for p in pieces]].clone(),
        "last piece": wte[[p[-1] for p in pieces]].clone(),
        "random N(0, 0.02)": torch.randn(n_new - n_old, wte.size(1), generator=generator) * 0.02,
    }
    out = {}
    for name, rows in variants.items():
        wte[n_old:] = rows
        out[name] = {
            f"bpc_{k}": text_score(grown, new_enc, held_out(t[k], n), n).bits_per_char
            for k, n in s["eval_chars"].items()
        }
        print(f"{name:<20} Lu Xun {out[name]['bpc_zh']:.3f}  English {out[name]['bpc_en']:.3f} bits per character")
    return out


# ----- the whole experiment -------------------------------------------------------------------------


def base_model(root: Path, s: dict, t: dict) -> Path:
    """The English-only base (trained once; its run stays in ROOT/base)."""
    base = root / "base"
    if not (base / "final").is_dir():
        shutil.rmtree(base, ignore_errors=True)
        run("train.py", "--data", *t["english"], "--eval-data", t["en"], "--init-preset", "gpt2", *s["shape"],
            *s["batch"], "--steps", s["base_steps"], "--lr", 2e-3,
            "--eval-every", max(1, s["base_steps"] // s["base_evals"]), "--save-every", 0,
            "--threads", 1, "--cache-dir", root / "cache", "--out", base)  # fmt: skip
    return base / "final"


def run_recipes(args, recipes: list[str]) -> None:
    """Each recipe in its own single-thread process, at most --jobs at once."""
    own = [sys.executable, __file__, "--dir", args.dir, "--budgets", *map(str, args.budgets)]
    own += ["--quick"] if args.quick else []
    waiting, running = list(recipes), {}
    while waiting or running:
        while waiting and len(running) < args.jobs:
            name = waiting.pop(0)
            log = open(Path(args.dir) / f"{name}.log", "a")
            running[name] = (subprocess.Popen([*own, "--one", name], cwd=ROOT, stdout=log, stderr=log,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}), log)  # fmt: skip
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode != 0:
                    sys.exit(f"recipe {name} failed: see {Path(args.dir) / f'{name}.log'}")
        time.sleep(0.5)


def table(root: Path, budgets: list[float]) -> list[dict]:
    rows = []
    for budget in budgets:
        for name in RECIPES:
            path = root / "results" / f"{name}@{budget:g}.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    return rows


def report(root: Path, rows: list[dict], base: dict, t: dict, s: dict) -> None:
    print(f"\n{'recipe':<12} {'budget':>7} {'steps':>6} {'tokens':>9} {'Lu Xun bpc':>11} {'English bpc':>12} "
          f"{'zh chars/cpu-s':>15} {'state MB':>9}")  # fmt: skip
    print(f"{'base':<12} {'':>7} {'':>6} {'':>9} {base['bpc_zh']:>11.3f} {base['bpc_en']:>12.3f} "
          f"{base['zh_chars_per_cpu_s']:>15.1f} {'':>9}")  # fmt: skip
    for r in rows:
        state_mb = r["trainer_state_bytes"] / 1e6
        print(f"{r['recipe']:<12} {r['budget_cpu_s']:>7g} {r['step']:>6} {r['tokens']:>9,} {r['bpc_zh']:>11.3f} "
              f"{r['bpc_en']:>12.3f} {r['zh_chars_per_cpu_s']:>15.1f} {state_mb:>9.1f}")  # fmt: skip
    budgets = sorted({r["budget_cpu_s"] for r in rows})
    largest = [r for r in rows if r["budget_cpu_s"] == budgets[-1]]
    if len(largest) > 1:  # compare.py's several-models table and trade-off plot, each model named by its recipe
        named = []
        for r in largest:
            named.append(root / "models" / f"{r['recipe']}@{r['budget_cpu_s']:g}")
            named[-1].parent.mkdir(exist_ok=True)
            named[-1].unlink(missing_ok=True)
            named[-1].symlink_to(Path(r["checkpoint"]).resolve(), target_is_directory=True)
        out = run("compare.py", root / "base" / "final", *named,
                  "--text", t["zh"], "--text", t["en"], "--max-eval-tokens", s["compare_tokens"],
                  "--json", root / f"compare-{budgets[-1]:g}.json", "--plot", root / f"tradeoff-{budgets[-1]:g}.png",
                  "--force")  # fmt: skip
        print(out)
    by = {(r["recipe"], r["budget_cpu_s"]): r for r in rows}
    verdicts = []
    for name in ("full+vocab", "vocab-phase", "lora+vocab"):
        rival = "lora" if name.startswith("lora") else "full"
        wins = [
            b
            for b in budgets
            if (name, b) in by and (rival, b) in by and by[name, b]["bpc_zh"] < by[rival, b]["bpc_zh"]
        ]
        verdicts.append(f"{name} beats {rival} from {wins[0]:g} CPU-s" if wins else f"{name} never beats {rival}")
    print("on held-out Chinese: " + "; ".join(verdicts) + f" (budgets {', '.join(f'{b:g}' for b in budgets)} CPU-s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="keep everything here (default: a temporary folder)")
    p.add_argument("--budgets", type=float, nargs="+", help="CPU seconds of training (default 90 360; --quick 1 2)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--jobs", type=int, default=2, help="recipes trained at once, one thread each (default 2)")
    p.add_argument("--quick", action="store_true", help="a tiny model on excerpts: runs in seconds (for CI)")
    p.add_argument("--init-check", action="store_true", help="only measure how the new rows' starting value "
                   "changes held-out bits per character at step 0 (after a run of full+vocab)")  # fmt: skip
    p.add_argument("--one", choices=RECIPES, help=argparse.SUPPRESS)  # the child process of one recipe
    args = p.parse_args()
    args.budgets = args.budgets or ([1, 2] if args.quick else [90, 360])
    args.dir = args.dir or tempfile.mkdtemp(prefix="bench-recipes-")
    data = shared_data(args.quick)
    root = Path(args.dir)
    s, t = settings(args.quick), texts(data, args.quick, root)
    if args.one:
        return one(args, s, t)
    if args.init_check:
        (root / "results" / "init.json").write_text(json.dumps(init_check(root, s, t), indent=1))
        return 0
    root.mkdir(parents=True, exist_ok=True)
    base = base_model(root, s, t)
    base_file = root / "results" / "base.json"
    if not base_file.is_file():
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps(measure(base, t, s)))
    run_recipes(args, args.recipes)
    report(root, table(root, sorted(args.budgets)), json.loads(base_file.read_text()), t, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
