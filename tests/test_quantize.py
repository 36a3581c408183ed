"""int8 weight-only quantization: accuracy bounds, module names and hooks, loading, saving, sample.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from checkpoints import random_hf_model, tiny_gpt, write_official_layout
from clis import offline_env, run_script
from torch import nn

from minigpt2 import MiniGPT2Error, load_model, save_model
from minigpt2.generation.generate import generate_tokens, prepare_for_decoding
from minigpt2.model.quantize import Int8Linear, is_quantized, quantize_model, quantize_weight


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


SMALL = dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512)


def test_weight_rounding_error_is_at_most_half_a_step_per_row():
    w = torch.randn(96, 64) * torch.logspace(-3, 0, 96)[:, None]  # rows of very different ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert q.abs().max() == 127  # each row's largest value uses the full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@torch.inference_mode()
def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    nn.init.normal_(linear.bias, std=0.1)
    x = torch.randn(3, 5, 64)
    x[..., 7] *= 20  # an outlier channel, as trained transformers have
    layer = Int8Linear(linear)
    y = layer(x)
    assert y.shape == (3, 5, 96)
    dequantized = F.linear(x, layer.weight.float() * layer.scale[:, None], layer.bias)
    # the error left is the weights' own (activations are refined to ~14 bits): well under 1%
    assert rel_error(y, dequantized) < 2e-3
    assert rel_error(y, linear(x)) < 1e-2
    # the generic path (CUDA, bfloat16) computes the same thing
    generic = copy.deepcopy(layer)
    generic._packed = None
    assert rel_error(generic(x), dequantized) < 1e-5
    # and so does the products-and-sum form a compiled decode step uses (bias added by forward)
    assert rel_error(layer.matvec(x[:, :1]) + layer.bias, dequantized[:, :1]) < 1e-5


@torch.inference_mode()
def test_int8_kernel_does_not_saturate_on_cpus_without_vnni():
    # every product at its largest, with the same sign: on AVX2 (no VNNI) fbgemm adds pairs of
    # u8 x s8 products in int16, where two 8-bit activations at 255 times 127 would saturate
    linear = nn.Linear(256, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(4, 256))
    x = torch.full((2, 256), 3.0)
    x[1] = -3.0
    layer = Int8Linear(linear)
    assert rel_error(layer(x), linear(x)) < 1e-3
    layer.refine_activations = False
    assert rel_error(layer(x), linear(x)) < 2e-2


@torch.inference_mode()
def test_refined_activations_lose_far_less_than_8_bit_activations():
    torch.manual_seed(1)
    linear = nn.Linear(128, 128)
    x = torch.randn(4, 128)
    x[:, 3] *= 30
    layer = Int8Linear(linear)
    refined = rel_error(layer(x), linear(x))
    layer.refine_activations = False  # what quantize_dynamic does: activations in 7-8 bits
    coarse = rel_error(layer(x), linear(x))
    assert refined * 4 < coarse


@torch.inference_mode()
def test_quantized_model_stays_close_to_float32():
    model = tiny_gpt(**SMALL)
    idx = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = model(idx)
    quantized = quantize_model(copy.deepcopy(model))
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.wte, nn.Embedding)
    logits = quantized(idx)
    assert rel_error(logits, reference) < 0.03
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    float_head = quantize_model(copy.deepcopy(model), lm_head=False)
    assert isinstance(float_head.lm_head, nn.Linear) and float_head.lm_head.weight is float_head.wte.weight
    assert rel_error(float_head(idx), reference) < 0.02
    # cached decoding of the quantized model gives the logits of its full forward pass
    cache = quantized.new_cache(4, 64)
    quantized(idx[:, :31], cache=cache.append(31))
    last = quantized(idx[:, 31:], cache=cache.append(1))[:, -1]
    assert rel_error(last, logits[:, -1]) < 2e-3


@torch.inference_mode()
def test_a_lora_model_is_quantized_with_its_adapters_merged():
    from minigpt2.model.lora import LoRALinear, apply_lora, is_lora

    base = tiny_gpt(**SMALL)
    model = apply_lora(copy.deepcopy(base), 4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))
    for layer in model.modules():  # a trained adapter: B is no longer zero
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.05)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, base_logits = model.eval()(idx), base(idx)
    assert rel_error(reference, base_logits) > 0.05  # the adapters matter
    quantized = quantize_model(model)
    assert not is_lora(quantized) and isinstance(quantized.h[0].attn.c_attn, Int8Linear)
    assert rel_error(quantized(idx), reference) < 0.03  # the merged weights, not the base ones


@torch.inference_mode()
def test_module_names_stay_official_and_hooks_fire():
    float_model = tiny_gpt(**SMALL)
    model = quantize_model(copy.deepcopy(float_model))
    names = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    blocks = {f"h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names == blocks | {"lm_head"}
    # the embedding keeps its float weight (a lookup reads one row): untied from the int8 output layer
    assert model.wte.weight.dtype == torch.float32 and torch.equal(model.wte.weight, float_model.wte.weight)
    seen = {}

    def recorder(name):
        def hook(module, inputs, output):
            seen[name] = tuple(output.shape)

        return hook

    for name in ("h.1.attn.c_attn", "h.0.mlp.c_proj", "lm_head"):
        model.get_submodule(name).register_forward_hook(recorder(name))
    model(torch.zeros(1, 5, dtype=torch.long))
    assert seen == {"h.1.attn.c_attn": (1, 5, 192), "h.0.mlp.c_proj": (1, 5, 64), "lm_head": (1, 5, 512)}


@torch.inference_mode()
def test_decoding_layout_leaves_the_int8_output_layer_alone():
    model = quantize_model(tiny_gpt(**SMALL))
    weight = model.lm_head.weight.clone()
    prepare_for_decoding(model)
    assert model.lm_head.weight.is_contiguous() and torch.equal(model.lm_head.weight, weight)
    tokens = [step[0] for step in generate_tokens(model, [[1, 2, 3]], 6)]  # greedy, cached
    text = [1, 2, 3]
    for token in tokens:  # each is the most likely next token of the whole text so far (no cache)
        assert token == model(torch.tensor([text]))[0, -1].argmax().item()
        text.append(token)


def test_load_quantized_and_refuse_to_save(tmp_path):
    hf = random_hf_model(n_layer=2, n_head=2, n_embd=64, n_positions=64)
    source = write_official_layout(hf, tmp_path / "ckpt")
    model = load_model(source, quantize="int8")
    assert is_quantized(model) and not is_quantized(load_model(source))
    with pytest.raises(MiniGPT2Error, match="quantized"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(MiniGPT2Error, match="unknown quantization 'int4'"):
        load_model(source, quantize="int4")
    with pytest.raises(MiniGPT2Error, match="already quantized"):
        quantize_model(model)


def run_sample(*args, hf_home):
    return run_script("sample.py", *args, env=offline_env(hf_home), timeout=120)


@pytest.mark.slow
def test_sample_cli_quantized_is_reproducible(hub_gpt2, hf_home):
    args = (
        "今天的天气",
        "--model",
        "gpt2",
        "--quantize",
        "int8",
        "--seed",
        "5",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--json",
    )
    first, second = run_sample(*args, hf_home=hf_home), run_sample(*args, hf_home=hf_home)
    assert first.returncode == 0, first.stderr
    text = [line.split('"tokens_per_second"')[0] for line in first.stdout.splitlines()]
    assert text == [line.split('"tokens_per_second"')[0] for line in second.stdout.splitlines()]
    assert '"tokens": 12' in first.stdout and "\\ufffd" not in first.stdout
