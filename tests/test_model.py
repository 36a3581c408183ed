"""The hand-written model against transformers' GPT2LMHeadModel, on random weights."""

import pytest
import torch
import torch.nn.functional as F
from checkpoints import random_hf_model, tiny_gpt, write_official_layout

from minigpt2 import load_model, load_tokenizer
from minigpt2.generation.generate import generate

# (n_layer, n_head, n_embd): a tiny one; 3 heads of 21 (odd width, head count not 12); full 124M.
CONFIGS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=128, n_positions=128),
    "odd": dict(n_layer=3, n_head=3, n_embd=63, n_positions=96),
    "124M": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}
TOLERANCE = 1e-4  # max abs difference of float32 logits


@pytest.fixture(
    scope="module", params=[pytest.param(n, marks=[pytest.mark.slow] if n == "124M" else []) for n in CONFIGS]
)
def pair(request, tmp_path_factory):
    """(transformers model, minigpt2 model loaded from its checkpoint) in both layouts."""
    hf = random_hf_model(**CONFIGS[request.param], seed=7)
    root = tmp_path_factory.mktemp(request.param)
    official = write_official_layout(hf, root / "official")
    hf.save_pretrained(root / "pretrained")
    return hf, {"official": load_model(official), "save_pretrained": load_model(root / "pretrained")}


def _text_ids(test_data, n):
    enc = load_tokenizer(test_data / "gpt2")
    zh = (test_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")
    en = (test_data / "en" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    return torch.tensor([enc.encode(zh[5000:9000])[:n], enc.encode(en[5000:9000])[:n]])


@torch.no_grad()
def test_logits_match_transformers(pair, test_data):
    hf, ours = pair
    n = hf.config.n_positions
    inputs = {
        "random ids": torch.randint(
            0, hf.config.vocab_size, (2, min(n, 256)), generator=torch.Generator().manual_seed(0)
        ),
        "zh/en text": _text_ids(test_data, min(n, 256)),
    }
    for name, idx in inputs.items():
        expected = hf(idx).logits
        for layout, model in ours.items():
            got = model(idx)
            assert got.shape == expected.shape
            diff = (got - expected).abs().max().item()
            assert diff <= TOLERANCE, f"{layout}, {name}: max abs diff {diff:.3g}"


@torch.no_grad()
def test_greedy_continuation_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, pad_token_id=50256
    )
    for layout, model in ours.items():
        got = generate(model, prompt, 20)  # greedy by default
        assert got.tolist() == expected.tolist(), layout


@torch.no_grad()
def test_loss_matches_transformers(pair):
    hf, ours = pair
    idx = torch.randint(0, hf.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    expected = hf(idx, labels=idx).loss
    logits, loss = ours["official"](idx[:, :-1], idx[:, 1:])
    assert logits.shape == (2, 32, hf.config.vocab_size)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


SMALL = dict(vocab_size=500, n_positions=64, n_layer=3, n_head=4, n_embd=32)


@torch.no_grad()
def test_kv_cache_matches_full_forward_in_any_chunking():
    model = tiny_gpt(**SMALL)
    idx = torch.randint(0, 500, (3, 64), generator=torch.Generator().manual_seed(0))
    full = model(idx)
    for chunks in ([64], [1] * 64, [10, 1, 1, 20, 32], [63, 1]):
        cache, pos, out = model.new_cache(3), 0, []
        for n in chunks:
            out.append(model(idx[:, pos : pos + n], cache=cache.append(n)))
            pos += n
        torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_unwritten_cache_slots_are_never_attended_to(static):
    # huge garbage in every slot not yet written (a static step multiplies masked values by 0, so finite)
    model = tiny_gpt(**SMALL)
    idx = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = model.new_cache(2, static=static)
    cache.k.normal_(std=1e3)
    cache.v.normal_(std=1e3)
    out = [model(idx[:, :30], cache=cache.append(30))] + [
        model(idx[:, t : t + 1], cache=cache.append(1)) for t in range(30, 40)
    ]
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 40 and cache.next_position.tolist() == [40, 40]
    with pytest.raises(ValueError, match="cache slots for"):  # slots for another batch: refused
        model(idx[:1, :1], cache=cache.append(1))


@torch.no_grad()
def test_attention_is_causal():
    model = tiny_gpt(**SMALL)
    idx = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 500
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_context_overflow_is_a_clear_error():
    model = tiny_gpt(**SMALL)
    with pytest.raises(ValueError, match="context of 64 tokens"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 63, dtype=torch.long), cache=cache.append(63))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache.append(2))


def test_every_diagram_box_is_a_hookable_module_named_like_the_checkpoint():
    model = tiny_gpt(**SMALL)
    names = dict(model.named_modules())
    expected = ["wte", "wpe", "ln_f", "lm_head"] + [
        f"h.{i}.{part}"
        for i in range(3)
        for part in ("ln_1", "attn", "attn.c_attn", "attn.c_proj", "ln_2", "mlp", "mlp.c_fc", "mlp.c_proj")
    ]
    assert set(expected) <= set(names)
    seen = {}
    handles = [names[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in expected]
    try:
        idx = torch.randint(0, 500, (2, 10))
        with torch.no_grad():
            logits = model(idx)
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(expected)
    # The hooked tensors are the real intermediate values: the output layer applied to ln_f's output is the logits,
    # and each block's residual stream goes through its attention's output projection.
    torch.testing.assert_close(model.lm_head(seen["ln_f"]), logits)
    assert seen["h.1.attn.c_proj"].shape == (2, 10, 32)
    assert seen["wpe"].shape == (10, 32)
    assert all(not m._forward_hooks for m in model.modules())


def test_lm_head_is_tied_and_init_follows_gpt2():
    model = tiny_gpt(**{**SMALL, "n_layer": 8, "n_embd": 64})
    assert model.lm_head.weight is model.wte.weight
    c = model.config  # the tied matrix counted once: embeddings, 12 C^2 + 13 C per block, final LayerNorm
    expected = (c.vocab_size + c.n_positions) * c.n_embd + c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd) + 2 * c.n_embd
    assert model.num_params() == expected
    std_proj = model.h[0].attn.c_proj.weight.std().item()
    std_fc = model.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert torch.all(model.h[0].ln_1.weight == 1) and torch.all(model.h[0].attn.c_attn.bias == 0)


def test_gelu_is_the_tanh_form():
    model = tiny_gpt(**SMALL)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(model.h[0].mlp.gelu(x), F.gelu(x, approximate="tanh"))
    assert (model.h[0].mlp.gelu(x) - F.gelu(x)).abs().max() > 1e-4


def test_kv_cache_is_not_in_the_state_dict():
    model = tiny_gpt(**SMALL)
    cache = model.new_cache(2)
    assert cache.k.shape == (3, 2, 4, 64, 8)
    assert dict(cache.state_dict()) == {}
    model.h[0].attn.kv_cache_probe = cache  # even when attached to the model, buffers stay out
    assert not any(key.endswith((".k", ".v")) for key in model.state_dict())
