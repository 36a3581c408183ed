"""Generation speed: minigpt2 against transformers' `generate`, side by side in one run.

Both get the same random GPT-2 weights (124M shape by default), batch 1, a 16-token prompt,
top-k sampling. The runs alternate (transformers, minigpt2, transformers, ...) and the median of
each is reported, so a machine that gets busier in the middle slows both. minigpt2 runs as
sample.py does by default: KV cache and UTF-8 guard on. Then minigpt2 with and without its KV
cache at 500 new tokens. The last line is the ratio minigpt2 / transformers.

    python benchmarks/bench_sample.py                      # CPU
    python benchmarks/bench_sample.py --device cuda --compile
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from minigpt2 import GPT, GPTConfig, load_tokenizer
from minigpt2.device import resolve_device, resolve_dtype
from minigpt2.generate import Sampling, Utf8Guard, generate_tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="minigpt2 with its compiled static decode step")
    p.add_argument("--no-cache-tokens", type=int, default=500, help="tokens for the cache vs no-cache run (0: skip)")
    p.add_argument("--layers", type=int, default=12, help="fewer for a quick check")
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval().to(device, dtype)
    ours = GPT(GPTConfig(n_layer=args.layers)).eval().to(device, dtype)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    with torch.no_grad():  # the same weights in both (Conv1D weights transposed)
        for name, param in ours.state_dict().items():
            w = sd["wte.weight" if name == "lm_head.weight" else name]
            param.copy_(w.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else w)

    data = os.environ.get("MINIGPT2_SHARED_DATA")
    guard = None
    if data and (Path(data) / "gpt2" / "vocab.json").is_file():
        guard = Utf8Guard.for_tokenizer(load_tokenizer(Path(data) / "gpt2"), 50257, device)
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    n = args.new_tokens

    def run_hf(n_tokens):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_tokens,
                              min_new_tokens=n_tokens, do_sample=True, top_k=50, pad_token_id=50256)
        sync(device)
        assert out.shape[1] == 16 + n_tokens
        return n_tokens / (time.perf_counter() - t)

    def run_ours(n_tokens, use_cache=True):
        sync(device)
        t = time.perf_counter()
        steps = list(generate_tokens(ours, prompt.tolist(), n_tokens, Sampling(top_k=50), guard=guard,
                                     generator=torch.Generator(device=device).manual_seed(0),
                                     use_cache=use_cache, compile=args.compile))
        sync(device)
        assert len(steps) == n_tokens
        return n_tokens / (time.perf_counter() - t)

    run_hf(8), run_ours(min(n, 64))  # warm-up (and compilation)
    hf_rates, our_rates = [], []
    for _ in range(args.rounds):
        hf_rates.append(run_hf(n))
        our_rates.append(run_ours(n))
    hf_rate, our_rate = statistics.median(hf_rates), statistics.median(our_rates)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; {args.layers} layers; batch 1; 16-token prompt; "
          f"{n} new tokens; top-k 50; UTF-8 guard {'on' if guard else 'off (no tokenizer files)'}"
          + ("; minigpt2 compiled" if args.compile else ""))
    print(f"transformers generate:  {hf_rate:8.1f} tok/s   (rounds: {', '.join(f'{r:.1f}' for r in hf_rates)})")
    print(f"minigpt2:               {our_rate:8.1f} tok/s   (rounds: {', '.join(f'{r:.1f}' for r in our_rates)})")
    if args.no_cache_tokens:
        m = args.no_cache_tokens
        cached, uncached = run_ours(m), run_ours(m, use_cache=False)
        print(f"minigpt2, {m} new tokens: cached {cached:.1f} tok/s, --no-cache {uncached:.1f} tok/s: "
              f"cache speedup {cached / uncached:.1f}x")
    print(f"ratio minigpt2 / transformers: {our_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
