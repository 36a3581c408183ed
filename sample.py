"""Continue prompts with GPT-2 or any checkpoint minigpt2 loads, streaming whole characters.

    python sample.py "今天的天气"
    python sample.py "今天的天气" "人工智能的未来" --model gpt2 --model runs/zh/final --num-samples 2 --seed 1

With several --model options, each prompt's samples are printed model by model, so a base model
and its fine-tuned version read side by side. After each sample: tokens/s and the share of CJK
characters in the generated text. --json prints one JSON record per sample instead.
"""

import argparse
import json
import sys

from minigpt2 import MiniGPT2Error, load_model, load_tokenizer
from minigpt2.device import resolve_device, resolve_dtype
from minigpt2.generate import Sampling, Utf8Guard, prepare_for_decoding
from minigpt2.text import encode_prompt, generate_text


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to continue (\"\": start from <|endoftext|>)")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE", help="a UTF-8 file whose whole text is one more prompt (repeatable)")
    p.add_argument("--model", action="append", metavar="SOURCE", help="gpt2[-medium|-large|-xl], a hub repo id, a checkpoint directory or a .safetensors file; repeat to compare models (default: gpt2)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample (default: 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="< 1 sharper, > 1 more random; 0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the K most likely tokens; 0 for all (default: 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: among the most likely tokens holding probability P (default: 1.0, off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already in the text (default: 1.0, off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same samples on the same device")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a sample where TEXT appears (repeatable); <|endoftext|> always ends it")
    p.add_argument("--no-utf8-guard", action="store_true", help="let sampling produce invalid UTF-8 (shown as U+FFFD), as a naive sampler does")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only linear layers: faster decoding on a CPU, slightly different samples")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step: faster after a one-time compile of tens of seconds (CUDA graphs on a GPU)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole text for every token (slow; for comparison)")
    p.add_argument("--json", action="store_true", help="print one JSON record per sample instead of text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}")
    if args.num_samples < 1:
        p.error(f"--num-samples must be 1 or more, got {args.num_samples}")
    try:
        args.sampling = Sampling(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k or None,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        )
    except MiniGPT2Error as e:
        p.error(str(e))
    args.model = args.model or ["gpt2"]
    return args


def read_prompt_file(path: str) -> str:
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise MiniGPT2Error(f"cannot read prompt file '{path}': {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MiniGPT2Error(
            f"prompt file '{path}' is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); "
            "save it as UTF-8 (for example `iconv -f GBK -t UTF-8`)"
        ) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    try:
        prompts = args.prompts + [read_prompt_file(f) for f in args.prompt_file]
        if not prompts:
            raise MiniGPT2Error('no prompt given: pass one (or "" to start from <|endoftext|>), or --prompt-file FILE')
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        models = []
        for source in args.model:
            model = prepare_for_decoding(load_model(source, device=device, dtype=dtype, quantize=args.quantize))
            enc = load_tokenizer(source)
            guard = False if args.no_utf8_guard else Utf8Guard.for_tokenizer(enc, model.config.vocab_size, device)
            models.append((source, model, enc, guard))
    except MiniGPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    try:
        generate_all(args, prompts, models, device, dtype, out)
    except MiniGPT2Error as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0


def generate_all(args, prompts, models, device, dtype, out) -> None:
    for p_index, prompt in enumerate(prompts):
        for source, model, enc, guard in models:
            _, truncated = encode_prompt(enc, prompt, model.config.n_positions)
            if truncated:
                print(f"note: prompt {p_index + 1} is longer than the {model.config.n_positions}-token context; "
                      "using its end", file=sys.stderr)
            if not args.json:
                print(f"=== {source} · prompt {p_index + 1} ===", file=out)
                print(prompt, end="", file=out, flush=True)

            def stream(i, piece):  # the first sample is shown live
                if i == 0 and not args.json:
                    print(piece, end="", file=out, flush=True)

            samples = generate_text(
                model, enc, [prompt], args.max_new_tokens, args.sampling, num_samples=args.num_samples,
                stop=args.stop, utf8_guard=guard, seed=args.seed, use_cache=not args.no_cache,
                compile=args.compile, on_text=stream,
            )
            for s_index, sample in enumerate(samples):
                tokens_per_s = sample.tokens_per_second
                if args.json:
                    record = {
                        "model": source, "prompt": prompt, "sample": s_index, "text": sample.text,
                        "tokens": len(sample.tokens), "finish_reason": sample.finish_reason,
                        "tokens_per_second": round(tokens_per_s, 2), "cjk_share": round(sample.cjk_share, 4),
                        "seed": args.seed, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                    }
                    print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
                    continue
                if s_index > 0:
                    print(f"--- sample {s_index + 1} ---", file=out)
                    print(prompt + sample.text, end="", file=out)
                print(f"\n[{len(sample.tokens)} tokens · {tokens_per_s:.1f} tok/s · CJK {sample.cjk_share:.0%} · "
                      f"{sample.finish_reason}]", file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
