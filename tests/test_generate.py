"""The token-level generation loop and the samplers (the UTF-8 guard: test_utf8.py)."""

import pytest
import torch
from checkpoints import tiny_gpt

from minigpt2 import load_model, save_model
from minigpt2.errors import MiniGPT2Error
from minigpt2.generation.generate import (
    GREEDY,
    Sampling,
    apply_repetition_penalty,
    generate_tokens,
    left_pad,
    prefill,
    prepare_for_decoding,
    sample_next,
)


def run(model, prompts, n, sampling=GREEDY, **kw):
    steps = list(generate_tokens(model, prompts, n, sampling, **kw))
    return [list(col) for col in zip(*steps)]  # per sequence


PROMPTS = [[5, 17, 300, 2], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


def test_cached_and_uncached_greedy_agree_across_the_context_boundary():
    model = tiny_gpt()  # context 32: 70 new tokens cross it twice (sliding window)
    cached = run(model, PROMPTS, 70)
    uncached = run(model, PROMPTS, 70, use_cache=False)
    assert cached == uncached
    assert all(len(c) == 70 for c in cached)


def test_static_shape_decoder_agrees_with_eager():
    model = tiny_gpt()
    assert run(model, PROMPTS, 45, static=True) == run(model, PROMPTS, 45)


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("static", [None, True], ids=["cpu-default-dynamic-shapes", "static-shapes"])
def test_compiled_decoder_agrees_with_eager(static):
    model = tiny_gpt(n_positions=16)  # 20 new tokens cross the context: the window restarts once
    assert run(model, PROMPTS[:2], 20, compile=True, static=static) == run(model, PROMPTS[:2], 20)


def test_prepare_for_decoding_changes_the_layout_not_the_model(tmp_path):
    model = tiny_gpt(vocab_size=500)
    before = run(model, PROMPTS, 30)
    idx = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        logits = model(idx)
    assert prepare_for_decoding(model) is model
    weight = model.lm_head.weight
    assert weight is model.wte.weight  # still tied: one parameter
    assert weight.shape == (500, 32) and weight.stride() == (1, 500)  # column by column
    c_fc = model.h[1].mlp.c_fc.weight
    assert c_fc.shape == (128, 32) and c_fc.stride() == (1, 128)  # the blocks' layers too
    with torch.no_grad():
        torch.testing.assert_close(model(idx), logits, rtol=0, atol=1e-6)
    assert run(model, PROMPTS, 30) == before
    reloaded = load_model(save_model(model, tmp_path / "saved"))  # still saves as an ordinary checkpoint
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_batched_prompts_give_the_same_tokens_as_one_at_a_time():
    model = tiny_gpt()
    batched = run(model, PROMPTS, 50)
    alone = [run(model, [p], 50)[0] for p in PROMPTS]
    assert batched == alone


@torch.no_grad()
def test_prefill_logits_equal_the_full_forward_even_when_padded():
    model = tiny_gpt()
    idx, valid = left_pad(PROMPTS, "cpu")
    last = prefill(model, idx, valid, model.new_cache(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        full = model(torch.tensor([p]))[0, -1]
        torch.testing.assert_close(last[i], full, rtol=0, atol=1e-5)


def test_seed_reproducibility():
    model = tiny_gpt()
    s = Sampling(temperature=1.3, top_k=100)
    a = run(model, PROMPTS, 30, s, generator=torch.Generator().manual_seed(1))
    b = run(model, PROMPTS, 30, s, generator=torch.Generator().manual_seed(1))
    c = run(model, PROMPTS, 30, s, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_endoftext_stops_a_sequence():
    model = tiny_gpt()
    with torch.no_grad():  # make token 7 the certain next token everywhere
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[7] * 100)
    steps = list(generate_tokens(model, PROMPTS, 10, Sampling(greedy=True), eot_id=7))
    assert steps == [[7, 7, 7]]


# ----- samplers: only allowed tokens, in the renormalised proportions ---------------------

PROBS = torch.tensor([0.02, 0.30, 0.05, 0.20, 0.01, 0.15, 0.12, 0.10, 0.03, 0.02])
DRAWS = 200_000


def frequencies(sampling, seed=0):
    logits = PROBS.log().expand(DRAWS, -1)
    tokens = sample_next(logits, sampling, torch.Generator().manual_seed(seed))
    return torch.bincount(tokens, minlength=len(PROBS)).double() / DRAWS


def renormalised(keep):
    p = torch.zeros_like(PROBS, dtype=torch.float64)
    p[keep] = PROBS[keep].double()
    return p / p.sum()


# With 200k draws the standard error of a frequency is at most 0.0011, so 0.006 is > 5 sigma;
# the nearest wrong answers (not renormalised, one token too many or too few) are > 0.02 away.
TOL = 0.006


def test_top_k_draws_only_the_k_best_in_renormalised_proportions():
    freq = frequencies(Sampling(top_k=3))
    expected = renormalised([1, 3, 5])
    assert set(torch.nonzero(freq).flatten().tolist()) == {1, 3, 5}
    assert (freq - expected).abs().max() < TOL
    assert (renormalised([1, 3, 5, 6]) - expected).abs().max() > 3 * TOL  # the test can tell


def test_top_p_keeps_the_smallest_nucleus():
    # sorted: .30 .20 .15 .12 ... ; cumulative .30 .50 .65 .77: p=0.6 needs 3 tokens, p=0.65 also 3, 0.66 needs 4
    for p, keep in [(0.6, [1, 3, 5]), (0.65, [1, 3, 5]), (0.66, [1, 3, 5, 6]), (0.25, [1])]:
        freq = frequencies(Sampling(top_p=p))
        assert set(torch.nonzero(freq).flatten().tolist()) == set(keep), p
        assert (freq - renormalised(keep)).abs().max() < TOL, p


def test_temperature_reshapes_the_distribution():
    freq = frequencies(Sampling(temperature=0.5))
    expected = PROBS.double() ** 2 / (PROBS.double() ** 2).sum()
    assert (freq - expected).abs().max() < TOL
    assert (PROBS.double() - expected).abs().max() > 3 * TOL


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    ],
)
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(MiniGPT2Error, match=message):
        Sampling(**kwargs)


# ----- the UTF-8 guard --------------------------------------------------------------------

# A byte string that leaves the automaton in each state.
