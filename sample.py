"""Continue prompts with GPT-2 or any checkpoint minigpt2 loads, streaming whole characters.

    python sample.py "今天的天气"
    python sample.py "今天的天气" "人工智能的未来" --model gpt2 --model runs/zh --num-samples 2 --seed 1

With several --model options, each prompt's samples are printed model by model, so a base model
and its fine-tuned version read side by side. After each sample: tokens/s and the share of CJK
characters in the generated text. --json prints one JSON record per sample instead.
"""

from minigpt2.cli import run_script, start_script  # light: nothing below is imported yet

if __name__ == "__main__":
    start_script()  # first: Ctrl-C during the imports exits cleanly; closed or narrow streams work

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from minigpt2 import MiniGPT2Error, user_message  # noqa: E402
from minigpt2.checks import MAX_NEW_TOKENS, SEED_MAX, ArgumentParser, arg_float, arg_int, text_arg  # noqa: E402


# fmt: off
def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", type=text_arg, metavar="PROMPT",
                   help='text to continue ("": start from <|endoftext|>)')
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE", help="a UTF-8 file whose whole "
                   "text is one more prompt (repeatable)")
    p.add_argument("--model", action="append", metavar="SOURCE", help="gpt2[-medium|-large|-xl], a hub repo id, a "
                   "checkpoint folder, a .safetensors file or a training run; repeat to compare (default: gpt2)")
    p.add_argument("--num-samples", type=arg_int(low=1), default=1, help="samples per prompt (default: 1)")
    p.add_argument("--max-new-tokens", type=arg_int(low=0, high=MAX_NEW_TOKENS), default=100,
                   help=f"tokens per sample (default: 100; at most {MAX_NEW_TOKENS:,}: ~2 MB of text, hours on a CPU)")
    p.add_argument("--temperature", type=arg_float(), default=1.0, help="< 1 sharper, > 1 more random; 0 is greedy")
    p.add_argument("--top-k", type=arg_int(), default=50, help="sample among the K most likely tokens; 0: all (50)")
    p.add_argument("--top-p", type=arg_float(), default=1.0, help="nucleus: the likeliest tokens holding P (1: off)")
    p.add_argument("--repetition-penalty", type=arg_float(), default=1.0, help="> 1 discourages repeats (1: off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=arg_int(low=0, high=SEED_MAX), help="the same seed, the same samples (per device)")
    p.add_argument("--stop", action="append", default=[], type=text_arg, metavar="TEXT",
                   help="end a sample where TEXT appears")
    p.add_argument("--no-utf8-guard", action="store_true", help="allow invalid UTF-8 (U+FFFD), as naive samplers do")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only linear layers: faster decoding on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a one-time compile)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole text for every token (slow)")
    p.add_argument("--threads", type=arg_int(low=1),
                   help="CPU threads (default: the cores other processes leave free while the model loads, at least 1)")
    p.add_argument("--json", action="store_true", help="print one JSON record per sample instead of text")
    args = p.parse_args(argv)
    from minigpt2.generation.generate import Sampling

    try:
        args.sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k or None,
                                 top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except MiniGPT2Error as e:
        p.error(user_message(e))
    args.model = args.model or ["gpt2"]
    return args
# fmt: on


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_script(lambda: run(args, sys.stdout))


def run(args, out) -> int:
    import torch

    from minigpt2.device import BusyCores, resolve_device, resolve_dtype, threads_for_decoding
    from minigpt2.files import read_text_file
    from minigpt2.generation.sampling import load_for_sampling

    others = BusyCores()  # what other processes do with the cores while the models load
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompts + [read_text_file(f, "prompt file") for f in args.prompt_file]
    if not prompts:
        raise MiniGPT2Error('no prompt given: pass one (or "" to start from <|endoftext|>), or --prompt-file FILE')
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loading = dict(device=device, dtype=dtype, quantize=args.quantize, utf8_guard=not args.no_utf8_guard)
    samplers = [load_for_sampling(source, prompts, args.num_samples, **loading) for source in args.model]
    for note in (note for s in samplers for note in s.notes()):
        print(note, file=sys.stderr)
    if not args.threads and device.type == "cpu":  # decoding on a CPU: the cores other work leaves free,
        busy = others.others()  # decided once the models are loaded, just before decoding starts
        threads = threads_for_decoding(busy=busy)
        if threads < torch.get_num_threads():
            print(
                f"the machine is busy (other work keeps {busy:.1f} of {os.cpu_count()} cores busy): decoding with "
                f"{threads} thread{'s' if threads > 1 else ''}, as fewer threads wait less for busy cores "
                "(--threads to choose)",
                file=sys.stderr,
            )
            torch.set_num_threads(threads)
    try:
        for index, prompt in enumerate(prompts, 1):
            for s in samplers:
                show(args, index, prompt, s, out, {"device": str(device), "dtype": str(dtype).removeprefix("torch.")})
    except MiniGPT2Error:
        print(file=out, flush=True)  # end the half-printed sample's line first
        raise
    return 0


def show(args, index: int, prompt: str, s, out, where: dict) -> None:
    """One prompt's samples from one model: the first streamed as it is generated, then the rest."""
    from minigpt2.generation.sampling import encode_prompt, generate_text

    n_ctx = s.model.config.n_positions
    if encode_prompt(s.enc, prompt, n_ctx)[1]:
        print(f"note: prompt {index} is longer than the {n_ctx}-token context; using its end", file=sys.stderr)
    if not args.json:
        print(f"=== {s.source} · prompt {index} ===\n{prompt}", end="", file=out, flush=True)

    def stream(i, piece):
        if i == 0 and not args.json:
            print(piece, end="", file=out, flush=True)

    options = dict(stop=args.stop, num_samples=args.num_samples, seed=args.seed, use_cache=not args.no_cache)
    samples = generate_text(
        s.model,
        s.enc,
        [prompt],
        args.max_new_tokens,
        args.sampling,
        **options,
        utf8_guard=s.guard or False,
        compile=args.compile,
        on_text=stream,
    )
    for i, sample in enumerate(samples):
        if args.json:
            record = s.record(prompt, i, sample, seed=args.seed, **where)
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
            continue
        if i > 0:
            print(f"--- sample {i + 1} ---\n{prompt}{sample.text}", end="", file=out)
        print(f"\n[{sample.summary()}]", file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
