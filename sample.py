"""Continue prompts with GPT-2 or any checkpoint minigpt2 loads, streaming whole characters.

    python sample.py "今天的天气"
    python sample.py "今天的天气" "人工智能的未来" --model gpt2 --model runs/zh/final --num-samples 2 --seed 1

With several --model options, each prompt's samples are printed model by model, so a base model
and its fine-tuned version read side by side. After each sample: tokens/s and the share of CJK
characters in the generated text. --json prints one JSON record per sample instead.
"""

import argparse
import json
import os
import sys

from minigpt2 import MiniGPT2Error, load_model, load_tokenizer, user_message
from minigpt2.checks import SEED_MAX, ArgumentParser, arg_float, arg_int, check_decode_memory, check_vocab_fits
from minigpt2.device import resolve_device, resolve_dtype
from minigpt2.files import read_text_file
from minigpt2.generate import Sampling, prepare_for_decoding
from minigpt2.text import encode_prompt, generate_text
from minigpt2.utf8 import Utf8Guard


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to continue (\"\": start from <|endoftext|>)")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE", help="a UTF-8 file whose whole text is one more prompt (repeatable)")
    p.add_argument("--model", action="append", metavar="SOURCE", help="gpt2[-medium|-large|-xl], a hub repo id, a checkpoint directory or a .safetensors file; repeat to compare models (default: gpt2)")
    p.add_argument("--num-samples", type=arg_int(low=1), default=1, help="samples per prompt (default: 1)")
    p.add_argument("--max-new-tokens", type=arg_int(low=0), default=100, help="tokens to generate per sample (default: 100)")
    p.add_argument("--temperature", type=arg_float(), default=1.0, help="< 1 sharper, > 1 more random; 0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=arg_int(), default=50, help="sample among the K most likely tokens; 0 for all (default: 50)")
    p.add_argument("--top-p", type=arg_float(), default=1.0, help="nucleus sampling: among the most likely tokens holding probability P (default: 1.0, off)")
    p.add_argument("--repetition-penalty", type=arg_float(), default=1.0, help="> 1 discourages tokens already in the text (default: 1.0, off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=arg_int(low=0, high=SEED_MAX), default=None, help="random seed: the same seed gives the same samples on the same device")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a sample where TEXT appears (repeatable); <|endoftext|> always ends it")
    p.add_argument("--no-utf8-guard", action="store_true", help="let sampling produce invalid UTF-8 (shown as U+FFFD), as a naive sampler does")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only linear layers: faster decoding on a CPU, slightly different samples")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step: faster after a one-time compile of tens of seconds (CUDA graphs on a GPU)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole text for every token (slow; for comparison)")
    p.add_argument("--json", action="store_true", help="print one JSON record per sample instead of text")
    args = p.parse_args(argv)
    try:
        args.sampling = Sampling(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k or None,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        )
    except MiniGPT2Error as e:
        p.error(user_message(e))
    args.model = args.model or ["gpt2"]
    return args


def main(argv=None) -> int:
    """The command-line boundary: every way this can fail ends in one `error:` line.

    A `MiniGPT2Error` is the library's own message; an `OSError` is the filesystem's (a full
    disk, a read-only folder, a file where a folder should be). A closed pipe (`| head`) ends
    quietly with status 141, as a tool killed by SIGPIPE does; Ctrl-C prints "interrupted" and
    exits 130 (128 + SIGINT).
    """
    args = parse_args(argv)
    try:
        return run(args, sys.stdout)
    except MiniGPT2Error as e:
        return fail(user_message(e))
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return closed_pipe()
        return fail(f"{e.strerror or e}" + (f": '{e.filename}'" if e.filename else ""))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def fail(message: str) -> int:
    """Print the one error line (on a fresh line: a sample may be half printed)."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    print(f"error: {message}", file=sys.stderr)
    return 1


def closed_pipe() -> int:
    """The reader of stdout went away: stop quietly. Pointing stdout at /dev/null keeps Python's
    own flush at exit from failing again and printing "Exception ignored ... BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def run(args, out) -> int:
    prompts = args.prompts + [read_text_file(f, "prompt file") for f in args.prompt_file]
    if not prompts:
        raise MiniGPT2Error('no prompt given: pass one (or "" to start from <|endoftext|>), or --prompt-file FILE')
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = []
    for source in args.model:
        model = load_model(source, device=device, dtype=dtype, quantize=args.quantize)
        if getattr(model, "inferred_config", False):
            print(f"note: '{source}' has no config.json; its shape was inferred from the tensors "
                  f"({model.config.n_layer} layers, {model.config.n_head} heads of 64)", file=sys.stderr)
        enc = load_tokenizer(source)
        check_vocab_fits(model.config, enc, model_name=f"model '{source}'", tokenizer_name="its tokenizer")
        longest = max(len(enc.encode_ordinary(p)) for p in prompts) + 1
        check_decode_memory(model.config, args.num_samples, longest, dtype.itemsize, device)
        model = prepare_for_decoding(model)
        guard = False if args.no_utf8_guard else Utf8Guard.for_tokenizer(enc, model.config.vocab_size, device)
        models.append((source, model, enc, guard))
    try:
        generate_all(args, prompts, models, device, dtype, out)
    except MiniGPT2Error as e:
        print(file=out, flush=True)  # end the half-printed sample's line first
        raise e
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
