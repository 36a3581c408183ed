"""Correctness checks on a GPU, and peak training memory of the largest preset; run by gpu.sh.

These live here rather than in tests/ because CI has no GPU and the project collects no skipped
tests. `--dry-run` runs every check on the CPU with tiny shapes (what CI exercises through
gpu.sh --dry-run), so the code paths stay alive between GPU runs.

    python benchmarks/cuda_checks.py checks [--dry-run] [--json-out FILE]
    python benchmarks/cuda_checks.py memory --preset gpt2-xl --shape 4x1024 [--activation-checkpointing] [--dry-run]

`checks` exits 1 if any check fails; its last line is "N/M checks passed".
"""

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPT, GPTConfig, load_model, save_model
from minigpt2.generation.generate import Decoder, Sampling, generate_tokens
from minigpt2.model.quantize import Int8Linear, quantize_model
from minigpt2.training.data import TokenFile
from minigpt2.training.trainer import TrainConfig, Trainer


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small_model(dry_run: bool) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if dry_run else dict(n_layer=4, n_head=8, n_embd=512)
    return GPT(GPTConfig(n_positions=256, **shape)).eval()


def check_load_and_forward(device, dry_run):
    """A saved checkpoint loads onto the device and computes the CPU's float32 logits."""
    model = small_model(dry_run)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "ckpt")
        loaded = load_model(Path(tmp) / "ckpt", device=device)
        with torch.inference_mode():
            err = rel_error(loaded(idx.to(device)).cpu(), model(idx))
    assert err < 5e-3, f"float32 logits differ from the CPU's by {err:.2e}"
    return f"float32 logits vs CPU: {err:.1e}"


def check_bfloat16(device, dry_run):
    model = small_model(dry_run).to(device)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ref = model(idx)
        low = copy.deepcopy(model).to(torch.bfloat16)(idx)
    err = rel_error(low, ref)
    assert err < 0.05, f"bfloat16 logits differ from float32 by {err:.2%}"
    return f"bfloat16 vs float32 logits: {err:.2%}"


def check_int8(device, dry_run):
    """int8 weight-only linears on the device: eager, and under torch.compile (the fused path)."""
    model = small_model(dry_run).to(device)
    quantized = quantize_model(copy.deepcopy(model))
    assert all(m.weight.device.type == device.type for m in quantized.modules() if isinstance(m, Int8Linear))
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.inference_mode():
        ref, q = model(idx), quantized(idx)
        err = rel_error(q, ref)
        assert err < 0.03, f"int8 logits differ from float32 by {err:.2%}"
        if device.type == "cuda":
            bf16 = copy.deepcopy(quantized).to(torch.bfloat16)
            err_bf16 = rel_error(torch.compile(bf16)(idx), ref)
            assert err_bf16 < 0.06, f"compiled bfloat16 int8 logits differ from float32 by {err_bf16:.2%}"
            return f"int8 vs float32: {err:.2%}; compiled bf16 int8: {err_bf16:.2%}"
    return f"int8 vs float32: {err:.2%}"


def check_compiled_decoding(device, dry_run):
    """The static-shape decode step (compiled with CUDA graphs on a GPU) gives the eager greedy tokens."""
    model = small_model(dry_run).to(device)
    prompts = [[464, 3290, 318], [15496, 11, 995, 13, 314]]

    def tokens(**kwargs):
        return list(generate_tokens(model, prompts, 24, Sampling(greedy=True), **kwargs))

    eager = tokens()
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    static = tokens(static=True, compile=not dry_run)
    assert static == eager, "compiled static decoding chose other tokens than eager decoding"
    # the StaticKVCache's buffers are marked static: the step that writes into them is captured
    assert counters["inductor"]["cudagraph_skips"] == skips, "the static decode step ran without CUDA graphs"
    # the int8 model in bfloat16 (as `sample.py --quantize int8 --compile` runs on a GPU): its compiled
    # step takes Int8Linear's fused matrix-vector form; bf16 rounding may flip a near tie, so compare logits
    model = quantize_model(model).to(torch.bfloat16)

    def next_logits(**kwargs):  # after the prompt and one decode step (the static one: Decoder's step_fn)
        decoder = Decoder(model, [list(prompts[0])], **kwargs)
        decoder.start()
        return decoder.advance(torch.tensor([15496], device=device)).float()

    with torch.inference_mode():
        ref, got = next_logits(), next_logits(static=True, compile=not dry_run)
    err = rel_error(got, ref)
    assert err < 0.02, f"the compiled int8 decode step's logits differ from eager int8 by {err:.2%}"
    how = "eager static" if dry_run else "compiled, CUDA graphs"
    return f"{len(eager)} greedy steps identical ({how}); int8 step vs eager int8: {err:.2%}"


def check_training(device, dry_run):
    """A few bf16 (float32 on CPU) training steps on one repeated batch lower its loss."""
    model = small_model(dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(0, 50257, 4096, dtype=np.uint16)
        tokens.tofile(Path(tmp) / "t.bin")
        data = TokenFile(Path(tmp) / "t.bin", chars=len(tokens))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        trainer = Trainer(
            model,
            data,
            {},
            TrainConfig(steps=10, batch_size=2, seq_len=64, lr=1e-3, warmup=0),
            Path(tmp) / "run",
            device=device,
            dtype=dtype,
        )
        losses = []
        for _ in range(6):
            trainer.step = 0  # the same batch every time
            losses.append(trainer.train_step()["loss"])
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_fp16_and_lora(device, dry_run):
    """fp16 training with its gradient scaler, and a LoRA model's bf16 training: both lower the loss,
    and LoRA leaves every base weight as it was (float32 stand-ins on the CPU)."""
    from minigpt2.model.lora import apply_lora

    results = []
    for name, dtype, lora in (("fp16", torch.float16, False), ("LoRA bf16", torch.bfloat16, True)):
        model = small_model(dry_run)
        if lora:
            apply_lora(model, 4, seed=0)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        with tempfile.TemporaryDirectory() as tmp:
            tokens = np.random.default_rng(0).integers(0, 50257, 4096, dtype=np.uint16)
            tokens.tofile(Path(tmp) / "t.bin")
            config = TrainConfig(steps=10, batch_size=2, seq_len=64, lr=3e-3, warmup=0)
            trainer = Trainer(
                model,
                TokenFile(Path(tmp) / "t.bin", chars=len(tokens)),
                {},
                config,
                Path(tmp) / "run",
                device=device,
                dtype=dtype if device.type == "cuda" else torch.float32,
            )
            losses = []
            for _ in range(6):
                trainer.step = 0
                losses.append(trainer.train_step()["loss"])
        assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"
        moved = [
            n for n, p in model.named_parameters() if n in base and not torch.equal(p.detach().cpu(), base[n].cpu())
        ]
        assert not moved, f"{name}: frozen weights moved: {moved[:3]}"
        results.append(f"{name} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return "; ".join(results)


def check_transformers_parity(device, dry_run):
    """The same random weights in transformers' GPT2LMHeadModel give the same logits on the device."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt2.io.weights import is_conv1d

    torch.manual_seed(0)
    n_layer, n_embd = (2, 64) if dry_run else (12, 768)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_embd // 64 or 1, n_embd=n_embd)).eval().to(device)
    ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_embd // 64 or 1, n_embd=n_embd)).eval().to(device)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    torch.backends.cuda.matmul.allow_tf32 = False  # the trainer turned TF32 on for the process: exact matmuls here
    with torch.no_grad():
        for name, param in ours.state_dict().items():
            w = sd["wte.weight" if name == "lm_head.weight" else name]
            param.copy_(w.t() if is_conv1d(name) else w)
        idx = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(3)).to(device)
        err = (ours(idx) - hf(idx).logits).abs().max().item()
    assert err < 1e-3, f"max |logit difference| {err:.2e}"
    return f"max |logit difference| vs transformers: {err:.1e}"


CHECKS = [
    check_load_and_forward,
    check_bfloat16,
    check_int8,
    check_compiled_decoding,
    check_training,
    check_fp16_and_lora,
    check_transformers_parity,
]


def run_checks(args, device) -> int:
    results = []
    for check in CHECKS:
        start = time.perf_counter()
        try:
            detail, ok = check(device, args.dry_run), True
        except Exception as e:  # a failed check is reported, the others still run
            detail, ok = f"{type(e).__name__}: {e}", False
            traceback.print_exc()
        results.append({"check": check.__name__, "ok": ok, "detail": detail, "seconds": time.perf_counter() - start})
        print(f"{'ok    ' if ok else 'FAILED'} {check.__name__} ({results[-1]['seconds']:.1f} s): {detail}", flush=True)
    passed = sum(r["ok"] for r in results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"passed": passed, "total": len(results), "results": results}))
    print(f"{passed}/{len(results)} checks passed on {device}")
    return 0 if passed == len(results) else 1


def run_memory(args, device) -> int:
    """Training steps of `--preset` at `--shape`: the second step's peak memory and tokens/s."""
    B, T = map(int, args.shape.split("x"))
    sizes = dict(n_layer=1, n_positions=T, vocab_size=1024) if args.dry_run else {}  # the dry run: the code path
    config = GPTConfig.from_preset(args.preset, dropout=0.0, **sizes)
    torch.manual_seed(0)
    model = GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, B * T * 4, dtype=np.uint16)
        tokens.tofile(Path(tmp) / "t.bin")
        data = TokenFile(Path(tmp) / "t.bin", chars=len(tokens))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(
            model,
            data,
            {},
            TrainConfig(steps=10, batch_size=B, seq_len=T, warmup=0),
            Path(tmp) / "run",
            device=device,
            dtype=dtype,
            activation_checkpointing=args.activation_checkpointing,
        )
        trainer.train_step()  # the first step allocates AdamW's moments and warms up the kernels
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        record = trainer.train_step()  # the steady state: weights, gradients, moments and activations
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**30, "allocated on the GPU"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
    ac = "with" if args.activation_checkpointing else "without"
    print(
        f"{args.preset} ({config.n_layer} layers) {args.shape} {ac} activation checkpointing: peak memory "
        f"{peak:.2f} GiB ({kind}, second step); {record['tokens_per_s']:,.0f} tokens/s (second step)"
    )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"peak_memory_gib": peak, "tokens_per_s": record["tokens_per_s"], "mfu": record["mfu"]})
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["checks", "memory"])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes")
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--preset", default="gpt2-xl")
    p.add_argument("--shape", default="4x1024", help="BxT of the memory step")
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to run on the CPU", file=sys.stderr)
        return 1
    return run_checks(args, device) if args.what == "checks" else run_memory(args, device)


if __name__ == "__main__":
    sys.exit(main())
