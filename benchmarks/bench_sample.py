"""Generation speed: minigpt2 against transformers' `generate`, side by side in one run.

Both get the same random GPT-2 weights (124M shape by default), batch 1, a 16-token prompt,
top-k sampling. The runs alternate (transformers, minigpt2, transformers, ...) and the median of
each is reported, so a machine that gets busier in the middle slows both. minigpt2 runs as
sample.py does by default: KV cache and UTF-8 guard on. With --compile, minigpt2 as
`sample.py --compile` joins the rotation (its one-time compilation is timed separately). Then
minigpt2 with and without its KV cache at 500 new tokens. minigpt2 with int8 weight-only linear
layers (`load_model(..., quantize="int8")`) is in the rotation too (and, to show what the output
layer's share is, int8 blocks with a float output layer), and its quality is printed
beside it: relative logits error and top-1 agreement against float32, on held-out text (Lu Xun,
from $MINIGPT2_SHARED_DATA; random tokens without it). These are random weights: for quality on a
trained model, see bench_quantize.py. The last line is the ratio minigpt2 int8 / transformers.

    python benchmarks/bench_sample.py                      # CPU
    python benchmarks/bench_sample.py --compile            # CPU, eager and compiled
    python benchmarks/bench_sample.py --device cuda --dtype bfloat16 --compile
    python benchmarks/bench_sample.py --beside train       # CPU, a 124M-shape train.py running beside it

Contention: with --beside train, a 124M-shape `train.py` run (random weights, tiny Shakespeare)
trains in another process the whole time the contestants take turns, as when a user samples one
run's checkpoints while it trains. minigpt2 decodes with the threads sample.py would choose
(`threads_for_decoding`: the cores that other processes left free while the models were built);
transformers with torch's default (every core), as its users get. Where the choice is not every
core, int8 with every core joins the rotation, to show what the choice is worth.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minigpt2 import GPT, GPTConfig, MiniGPT2Error, load_tokenizer
from minigpt2.device import BusyCores, machine_load, resolve_device, resolve_dtype, threads_for_decoding
from minigpt2.generation.generate import Sampling, generate_tokens, prepare_for_decoding
from minigpt2.generation.utf8 import Utf8Guard
from minigpt2.model.quantize import quantize_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also minigpt2 with its compiled decode step")
    p.add_argument("--no-cache-tokens", type=int, default=500, help="tokens for the cache vs no-cache run (0: skip)")
    p.add_argument("--layers", type=int, default=12, help="fewer for a quick check")
    p.add_argument("--vocab", type=int, default=50257, help="a smaller vocabulary for a quick check (random "
                   "tokens then, and no UTF-8 guard: GPT-2's tokenizer needs its 50,257)")  # fmt: skip
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to this JSON file")
    p.add_argument("--beside", choices=["none", "train"], default="none",
                   help="train: a 124M-shape train.py run beside the contestants (default none)")  # fmt: skip
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        beside = start_training_beside(Path(tmp)) if args.beside == "train" else None
        try:
            race(args)
        finally:
            if beside is not None:
                beside.kill()
                beside.wait()


def start_training_beside(tmp: Path) -> subprocess.Popen:
    """A 124M-shape train.py run in another process, returned once it is training (its steps go on)."""
    data = Path(os.environ.get("MINIGPT2_SHARED_DATA", "/work/shared/data"))
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "train.py"), "--init-preset", "gpt2", "--tokenizer", str(data / "gpt2"),
           "--data", str(data / "en" / "tinyshakespeare.txt"), "--out", str(tmp / "run"), "--steps", "100000",
           "--eval-every", "0", "--eval-tokens", "128", "--save-every", "0", "--cache-dir", str(tmp / "cache"),
           "--device", "cpu", "--log-every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp / "run" / "log.jsonl"
    deadline = time.time() + 900
    while not (log.is_file() and '"type": "train"' in log.read_text()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit("error: the training run beside the benchmark did not start training: " + " ".join(cmd))
        time.sleep(1)
    print(f"beside: a 124M-shape train.py run, training (pid {proc.pid})", flush=True)
    return proc


def race(args):

    from transformers import GPT2Config, GPT2LMHeadModel

    others = BusyCores()  # as sample.py: what other processes do with the cores while the models are built
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, vocab_size=args.vocab)).eval().to(device, dtype)
    ours = GPT(GPTConfig(n_layer=args.layers, vocab_size=args.vocab)).eval().to(device, dtype)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    with torch.no_grad():  # the same weights in both (Conv1D weights transposed)
        for name, param in ours.state_dict().items():
            w = sd["wte.weight" if name == "lm_head.weight" else name]
            param.copy_(w.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else w)
    int8 = prepare_for_decoding(quantize_model(copy.deepcopy(ours)))  # as sample.py --quantize int8 does
    int8_float_head = prepare_for_decoding(quantize_model(copy.deepcopy(ours), lm_head=False))
    prepare_for_decoding(ours)  # as sample.py does
    busy = others.others()
    ours_threads = threads_for_decoding(busy=busy) if device.type == "cpu" else default_threads

    data = os.environ.get("MINIGPT2_SHARED_DATA") if args.vocab == 50257 else None  # GPT-2's tokenizer
    guard = None
    if data and (Path(data) / "gpt2" / "vocab.json").is_file():
        guard = Utf8Guard.for_tokenizer(load_tokenizer(Path(data) / "gpt2"), 50257, device)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    n = args.new_tokens

    def run_hf(n_tokens):
        torch.set_num_threads(default_threads)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=True,
                top_k=50,
                pad_token_id=50256,
            )
        sync(device)
        assert out.shape[1] == 16 + n_tokens
        return n_tokens / (time.perf_counter() - t)

    def run_ours(n_tokens, use_cache=True, compile=False, model=ours, threads=ours_threads):
        torch.set_num_threads(threads)
        sync(device)
        t = time.perf_counter()
        steps = list(
            generate_tokens(
                model,
                prompt.tolist(),
                n_tokens,
                Sampling(top_k=50),
                guard=guard,
                generator=torch.Generator(device=device).manual_seed(0),
                use_cache=use_cache,
                compile=compile,
            )
        )
        sync(device)
        assert len(steps) == n_tokens
        return n_tokens / (time.perf_counter() - t)

    contestants = {
        "transformers generate": run_hf,
        "minigpt2": run_ours,
        "minigpt2 int8": lambda n_tokens: run_ours(n_tokens, model=int8),
        "int8, fp32 output layer": lambda n_tokens: run_ours(n_tokens, model=int8_float_head),
    }
    if ours_threads != default_threads:  # what the thread choice is worth, in the same rotation
        contestants[f"int8, {default_threads} threads"] = lambda n_tokens: run_ours(
            n_tokens, model=int8, threads=default_threads
        )
    if args.compile:
        contestants["minigpt2 --compile"] = lambda n_tokens: run_ours(n_tokens, compile=True)
        contestants["minigpt2 int8 --compile"] = lambda n_tokens: run_ours(n_tokens, compile=True, model=int8)
    first_call_s, failed = {}, {}
    for name, run in list(contestants.items()):  # warm-up (and compilation, for all the lengths to come)
        t = time.perf_counter()
        try:
            run(min(n, 64))
        except MiniGPT2Error as e:  # e.g. torch.compile failing on this machine: the others still race
            failed[name] = str(e)
            del contestants[name]
            print(f"{name}: failed ({e})")
            continue
        first_call_s[name] = time.perf_counter() - t
    rates = {name: [] for name in contestants}
    for i in range(args.rounds):
        for name, run in contestants.items():
            rates[name].append(run(n))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " tok/s", flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    at_end = machine_load()
    load = f"load {at_end[0]:.1f} on {at_end[1]} cores at the end" if at_end else "load unknown"
    print(
        f"threads: minigpt2 {ours_threads} (as sample.py chooses: other work kept "
        f"{'?' if busy is None else f'{busy:.2f}'} cores busy while the models were built), "
        f"transformers {default_threads} (torch's default); {load}; beside: {args.beside}"
    )
    print(
        f"device: {hw}; dtype {str(dtype).removeprefix('torch.')}; {args.layers} layers; batch 1; 16-token prompt; "
        f"{n} new tokens; top-k 50; UTF-8 guard {'on' if guard else 'off (no tokenizer files)'}"
    )
    if "minigpt2 --compile" in first_call_s:
        print(f"minigpt2 --compile: first call (with compilation) {first_call_s['minigpt2 --compile']:.1f} s")
    for name, r in rates.items():
        print(f"{name + ':':24s}{median[name]:8.1f} tok/s   (rounds: {', '.join(f'{x:.1f}' for x in r)})")
    if args.no_cache_tokens:
        m = args.no_cache_tokens
        cached, uncached = run_ours(m), run_ours(m, use_cache=False)
        print(
            f"minigpt2, {m} new tokens: cached {cached:.1f} tok/s, --no-cache {uncached:.1f} tok/s: "
            f"cache speedup {cached / uncached:.1f}x"
        )
    quality = int8_quality(ours, int8, data, device)
    print(
        f"minigpt2 int8 vs float32 on {quality['text']} ({quality['tokens']} tokens, random weights): logits error "
        f"{quality['logits_error']:.2%}, top-1 agreement {quality['top1_agreement']:.2%}"
    )
    hf_rate = median["transformers generate"]
    ratios = {name: rate / hf_rate for name, rate in median.items() if name != "transformers generate"}
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "device": hw,
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens_per_s": median,
                    "first_call_s": first_call_s,
                    "ratio_to_transformers": ratios,
                    "int8_quality": quality,
                    "failed": failed,
                    "threads": {"minigpt2": ours_threads, "transformers": default_threads},
                    "busy_cores_while_loading": busy,
                    "beside": args.beside,
                    "load_at_end": at_end[0] if at_end else None,
                },
                indent=2,
            )
        )
    for name in failed:
        print(f"ratio {name} / transformers: failed")
    headline = "minigpt2 int8" if "minigpt2 int8" in ratios else "minigpt2"  # int8 missing only if it failed
    for name, ratio in sorted(ratios.items(), key=lambda item: item[0] == headline):  # the headline last
        print(f"ratio {name} / transformers: {ratio:.2f}x")


@torch.inference_mode()
def int8_quality(ours, int8, data, device, n_tokens=512):
    """Relative logits error and top-1 agreement of the int8 model against float32, teacher-forced."""
    text = Path(data or "") / "zh" / "鲁迅小说集.txt"
    if data and text.is_file() and (Path(data) / "gpt2" / "vocab.json").is_file():
        enc = load_tokenizer(Path(data) / "gpt2")
        ids = enc.encode_ordinary(text.read_text(encoding="utf-8")[:20_000])[:n_tokens]
        name = "鲁迅小说集"
    else:
        ids = torch.randint(0, ours.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        name = "random tokens"
    windows = torch.tensor(ids[: len(ids) // 128 * 128], device=device).view(-1, 128)  # (W, 128)
    ref, q = ours(windows).float(), int8(windows).float()  # (W, 128, vocab)
    return {
        "text": name,
        "tokens": windows.numel(),
        "logits_error": ((q - ref).norm() / ref.norm()).item(),
        "top1_agreement": (q.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


if __name__ == "__main__":
    main()
