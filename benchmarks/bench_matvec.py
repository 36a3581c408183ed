"""The 49 matrix-vector products of one decode step, layer by layer: float32 against int8.

A batch-1 decode step multiplies one hidden vector by every weight matrix: the 48 of the blocks
(c_attn, attn.c_proj, c_fc, mlp.c_proj, twelve times) and the output layer (50,257 x 768). This
times exactly those products, outside the model, so the figures say where a step's time goes:

    transformers: its own layers (Conv1D's addmm for the blocks, nn.Linear for the output layer)
    minigpt2 float32: nn.Linear, weights stored column by column (`prepare_for_decoding`)
    float32 row by row: the same layers in PyTorch's default layout
    minigpt2 int8: `Int8Linear` (fbgemm's int8 GEMM on the vector and its rounding remainder)

Random weights of the 124M shape; each layer is called in model order, as a decode step does, so
every weight comes from memory, not from a cache. Median of --rounds passes. The last line is the
ratio transformers / int8 for all 49 products.

    python benchmarks/bench_matvec.py [--rounds 50]
"""

import argparse
import copy
import statistics
import time

import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.generation.generate import prepare_for_decoding
from minigpt2.model.quantize import BLOCK_LINEARS, Int8Linear


def timed_pass(layers, x_of, rounds):
    """Median milliseconds per pass for the block layers and for the output layer separately."""
    blocks, head = [], []
    with torch.inference_mode():
        for _ in range(rounds + 3):  # the first three warm up
            t0 = time.perf_counter()
            for layer in layers[:-1]:
                layer(x_of[layer.in_features])
            t1 = time.perf_counter()
            layers[-1](x_of[layers[-1].in_features])
            t2 = time.perf_counter()
            blocks.append(t1 - t0)
            head.append(t2 - t1)
    return statistics.median(blocks[3:]) * 1e3, statistics.median(head[3:]) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    ours = prepare_for_decoding(GPT(GPTConfig()).eval())
    hf_layers = [block.get_submodule(name) for block in hf.transformer.h for name in BLOCK_LINEARS] + [hf.lm_head]
    float_layers = [block.get_submodule(name) for block in ours.h for name in BLOCK_LINEARS] + [ours.lm_head]
    int8_layers = [Int8Linear(layer) for layer in float_layers]
    row_layers = [copy.deepcopy(layer) for layer in float_layers]
    for layer in row_layers:
        layer.weight.data = layer.weight.data.contiguous()  # PyTorch's default layout, row by row
    x_of = {n: torch.randn(1, 1, n) for n in (768, 3072)}
    contestants = {
        "transformers": hf_layers,
        "minigpt2 float32": float_layers,
        "float32 row by row": row_layers,
        "minigpt2 int8": int8_layers,
    }
    for layers in contestants.values():  # Conv1D has no in_features: give every layer one
        for layer in layers:
            if not hasattr(layer, "in_features"):
                layer.in_features = layer.weight.shape[0]
    times = {}
    for name, layers in contestants.items():
        times[name] = timed_pass(layers, x_of, args.rounds)
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; median of {args.rounds} passes")
    for name, (blocks, head) in times.items():
        all_ms = blocks + head
        print(f"{name + ':':21s} 48 block products {blocks:6.1f} ms, output layer {head:5.1f} ms, all {all_ms:6.1f} ms")
    ratio = sum(times["transformers"]) / sum(times["minigpt2 int8"])
    print(f"ratio transformers / minigpt2 int8 (all 49 products): {ratio:.2f}x")


if __name__ == "__main__":
    main()
