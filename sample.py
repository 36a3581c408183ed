"""Continue a prompt with GPT-2 (or any checkpoint minigpt2 can load).

    python sample.py "今天的天气"
    python sample.py "今天的天气" --model runs/zh/final --max-new-tokens 100 --seed 1
"""

import argparse
import sys

import torch

from minigpt2 import MiniGPT2Error, load_model, load_tokenizer
from minigpt2.device import resolve_device
from minigpt2.generate import generate_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a hub repo id, a checkpoint directory or a .safetensors file (default: gpt2)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="how many tokens to generate (default: 50)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the K most likely tokens; 0 for all (default: 50)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be 0 or more")
    if args.temperature < 0:
        p.error("--temperature must be 0 or more")
    if args.top_k < 0:
        p.error("--top-k must be 0 or more")

    try:
        device = resolve_device(args.device)
        model = load_model(args.model, device=device)
        enc = load_tokenizer(args.model)
    except MiniGPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    eot = enc.eot_token
    ids = enc.encode(args.prompt) or [eot]
    if len(ids) > model.config.n_positions:
        print(f"note: the prompt is {len(ids)} tokens; keeping its last {model.config.n_positions}", file=sys.stderr)
        ids = ids[-model.config.n_positions :]
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()

    idx = torch.tensor([ids], device=device)
    new = [t.item() for t in generate_tokens(model, idx, args.max_new_tokens, greedy=args.greedy,
                                             temperature=args.temperature, top_k=args.top_k or None,
                                             generator=generator)]
    print(args.prompt + enc.decode(new, errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
