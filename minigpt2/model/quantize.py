"""int8 weight-only quantization for faster decoding, applied at load time.

Generating one token at a time multiplies a single hidden vector by every weight matrix of the
model: each weight is read from memory once per token and used for one multiply-add. The
arithmetic is trivial; the time goes into reading ~500 MB of float32 weights (GPT-2 small) per
token. Decoding is *memory-bound*, so the way to go faster is to read fewer bytes.

Weight-only int8 stores each linear weight as int8 (1 byte instead of 4) with one float scale per
output channel (per row of the (out, in) matrix):

    W[o, i]  ≈  scale[o] * q[o, i],    q in [-127, 127],   scale[o] = max_i |W[o, i]| / 127

A per-row scale follows the row's own range, so one large row does not cost the others their
precision; the rounding error is at most scale/2 per weight (about 0.2% of the row's largest
value). The activations stay in float: only the weights are approximated.

Which kernel does that fastest depends on the device:

- CPU: PyTorch ships fbgemm's int8 GEMM (the kernel behind `torch.ao.quantization.quantize_dynamic`),
  with weights prepacked once in the layout its VNNI/AVX-512 inner loops want. It needs the input
  in 8 bits as well (7 bits in practice, see ACTIVATION_LEVELS), and such activations alone would
  put several percent of error into the logits. So `Int8Linear` feeds it two rows per input row:
  the activation quantized to 7 bits, and its rounding remainder scaled up 126x and quantized
  again. Adding the two results back (`y1 + y2 / 126`) is a ~14-bit activation, close enough
  to float that the error left is the weights' own. Decoding is memory-bound, so the second row
  is free: the weights are still read once per token, now for two rows instead of one.
  That pays only while few rows go through at once (decoding); many rows at once (a prompt, a
  text evaluation) are bound by arithmetic, not memory, and take the next path instead.
- Elsewhere (CUDA, a bfloat16 model, many rows): `F.linear(x, q.to(x.dtype)) * scale`, the form
  gpt-fast uses. Eagerly it converts the weight before the matmul; under torch.compile the
  conversion is fused into the matmul, so the weight is read once, as int8.
- Under torch.compile with few rows (a compiled decode step), the product is written as what a
  matrix-vector product is: per output, the products of the row with x, summed. The compiler
  turns that into one reduction kernel that reads each int8 weight once and accumulates in
  float32, without going through its matmul lowering (torch 2.11's inductor failed there on
  CUDA for the int8-to-bfloat16 matvec of the CUDA-graph decode step).

The model stays a `GPT` with the same module names (`h.0.attn.c_attn`, ...), so forward hooks
keep working; only the `nn.Linear` objects are replaced. It is for inference only: quantized
weights have no gradients, and `weights.save_model` refuses to write such a model (a checkpoint
is always the float weights).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minigpt2.errors import MiniGPT2Error
from minigpt2.model.gpt import GPT

MODES = ("int8",)
# The activations go to fbgemm as 7-bit values (0..127 around a zero point of 64), not 8-bit ones.
# On CPUs without VNNI (AVX2 only: most laptops) fbgemm multiplies u8 activations by s8 weights
# with vpmaddubsw, which adds each pair of products in int16 and saturates: 2 x 255 x 127 does not
# fit, 2 x 127 x 127 does. A full 8-bit activation there put ~10% of error into the output. This
# is why PyTorch's own quantize_dynamic uses `reduce_range` on x86; it costs nothing in speed, and
# the remainder pass below keeps the activation at ~14 bits.
ACTIVATION_LEVELS = 63  # the largest |activation| maps to 63 steps: u8 values 1..127, zero point 64
ACTIVATION_ZERO_POINT = 64
REMAINDER_GAIN = 126.0  # the remainder (within ±step/2), scaled up before its second pass: ±63 steps
# Up to this many input rows (tokens x sequences) a CPU call goes to fbgemm's int8 kernel. A
# decode step has one row per sequence and is bound by reading the weights, which int8 makes 4x
# cheaper. A prompt or a text evaluation has hundreds of rows and is bound by arithmetic, where
# fbgemm measured several times slower than a float32 matmul on our 2-core test CPU: those calls
# multiply by the dequantized weight instead (same values, the int8 rounding and nothing else).
FBGEMM_MAX_ROWS = 16
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def quantize_weight(weight: torch.Tensor, rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight (out, in) as int8 values (out, in) and a float32 scale per output row (out,).

    Symmetric rounding: 0 stays exactly 0 and no zero point is needed, so the kernel's work is a
    plain integer dot product followed by one multiply per output. Rounded a few thousand rows at
    a time, so that quantizing the 154 MB output layer needs ~12 MB of float temporaries, not
    several copies of the whole matrix.
    """
    w = weight.detach()
    largest = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # (out,): max |w| of each row, no |w| copy
    scale = largest.clamp_min(1e-12) / 127  # a row of zeros gets a harmless tiny scale
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)  # (out, in)
    for start in range(0, w.size(0), rows_at_once):
        rows = slice(start, start + rows_at_once)
        q[rows] = torch.round(w[rows].float() / scale[rows, None]).clamp_(-127, 127)
    return q, scale


def cpu_int8_kernel_available() -> bool:
    """True when this PyTorch build has fbgemm's int8 GEMM (x86 CPUs; not ARM builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@contextlib.contextmanager
def _fbgemm_engine():
    """Prepack with fbgemm: the default `x86` engine may pick oneDNN, which lacks the float-output op."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def prepack_for_cpu(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of an int8 weight (out, in) with per-row scales (no bias: added in float)."""
    zero_points = torch.zeros(q.size(0), dtype=torch.long)
    with warnings.catch_warnings(), _fbgemm_engine():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated; the packed kernel is not
        qweight = torch._make_per_channel_quantized_tensor(q.cpu(), scale.double().cpu(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with one float scale per output channel.

    y = x @ (scale[:, None] * q).T + bias, with q (out, in) int8 and scale (out,) float32: a
    quarter of the bytes of a float32 weight, which is what a decode step spends its time
    reading (see the module docstring). `weight` and `scale` are buffers, so `.to(device)` moves
    them; the CPU kernel's packed copy is made once, when the layer is built on the CPU.
    """

    def __init__(self, linear: nn.Linear, *, refine_activations: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)  # (out,) float32 or None
        # False feeds the CPU kernel 7-bit activations only (what quantize_dynamic does): faster
        # to explain, several times the error. Kept for measuring that difference.
        self.refine_activations = refine_activations
        on_cpu = linear.weight.device.type == "cpu"
        self._packed = prepack_for_cpu(q, scale) if on_cpu and cpu_int8_kernel_available() else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        few_rows = rows <= FBGEMM_MAX_ROWS
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32 and few_rows:
            y = self._forward_fbgemm(x)
        elif few_rows and torch.compiler.is_compiling():
            y = self.matvec(x)
        else:  # gpt-fast's form; fused into one int8-reading matmul under torch.compile
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (scale * q).T for a few rows, as products and a sum: one fused reduction when compiled.

        Eagerly this would build the whole (rows, out, in) product in memory; it is meant for
        torch.compile, which never materialises it.
        """
        products = x.unsqueeze(-2).float() * self.weight  # (..., 1, in) * (out, in) -> (..., out, in)
        return (products.sum(-1) * self.scale).to(x.dtype)  # (..., out), accumulated in float32

    @torch.compiler.disable  # an opaque packed kernel and a data-dependent scale: nothing for the compiler to fuse
    def _forward_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        """fbgemm's int8 GEMM on the activation and on its rounding remainder, in one call."""
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        # one scale for this call: 7 bits (see ACTIVATION_LEVELS), so no pair of products saturates on AVX2
        step = max(float(x2d.abs().max()), 1e-12) / ACTIVATION_LEVELS
        if not self.refine_activations:
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x2d, step, ACTIVATION_ZERO_POINT, self._packed
            )
            return y.reshape(*shape[:-1], self.out_features)
        remainder = x2d - torch.round(x2d / step) * step  # (N, in), each within ±step/2
        both = torch.cat([x2d, remainder * REMAINDER_GAIN])  # (2N, in): still inside the 7-bit range
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            both, step, ACTIVATION_ZERO_POINT, self._packed
        )
        n = x2d.size(0)
        y = y[:n] + y[n:] / REMAINDER_GAIN  # (N, out)
        return y.reshape(*shape[:-1], self.out_features)


def quantize_model(model: GPT, mode: str = "int8", *, lm_head: bool = True) -> GPT:
    """Replace the model's linear layers by `Int8Linear`, in place; returns the model (in eval mode).

    Every linear layer of the blocks is quantized, and the output layer (`lm_head`) too unless
    `lm_head=False`. The output layer is GPT-2 small's largest matrix (50,257 x 768, a third of
    its weights), so it is where int8 saves the most reading: on our 2-core test CPU its product
    with one hidden vector took 1.9 ms in int8 against 8.6 ms in float32 stored column by column
    (benchmarks/bench_matvec.py), and whole decoding steps went from 20.5 to 13.7 ms
    (benchmarks/bench_sample.py). Its rounding error goes straight into the logits: on a small
    trained GPT-2 (benchmarks/bench_quantize.py) the logits error grew from 0.09% to 0.20% and
    top-1 agreement fell from 99.7% to 99.4%, perplexity unchanged (-0.03%). Quantized, it stops
    sharing its tensor with `wte`: the embedding keeps the float weight, since a lookup reads
    one row, not the matrix.

    A LoRA model is quantized merged: each adapted layer becomes the int8 form of W + (alpha / r)
    · B @ A (`LoRALinear.merged`), so it decodes as fast as any quantized model, and its adapters
    are gone from it (save the float model first if you need them).
    """
    if mode not in MODES:
        raise MiniGPT2Error(f"unknown quantization '{mode}'; the choices are: {', '.join(MODES)}")
    if is_quantized(model):
        raise MiniGPT2Error("this model is already quantized; quantize the float model once")
    model.eval()
    for block in model.h:
        for name in BLOCK_LINEARS:
            parent, attr = name.split(".")
            owner = getattr(block, parent)
            setattr(owner, attr, Int8Linear(plain_linear(getattr(owner, attr))))
    if lm_head:
        model.lm_head = Int8Linear(plain_linear(model.lm_head))  # wte keeps the float weight for lookups
    return model


def plain_linear(layer: nn.Module) -> nn.Linear:
    """The nn.Linear a layer computes: itself, or a LoRA layer's merged weight."""
    from minigpt2.model.lora import LoRALinear

    return layer.merged() if isinstance(layer, LoRALinear) else layer


def is_quantized(model: nn.Module) -> bool:
    """True for a model that holds any `Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
