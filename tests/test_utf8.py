"""The UTF-8 guard and stream: every token against Python's own decoder, and hot sampling kept valid."""

import codecs
import itertools

import pytest
import torch
from checkpoints import tiny_gpt

from minigpt2.generation.generate import Sampling, generate_tokens
from minigpt2.generation.utf8 import (
    ACCEPT,
    AFTER_E0,
    AFTER_ED,
    AFTER_EF,
    AFTER_EFBF,
    AFTER_F0,
    AFTER_F4,
    NEED1,
    NEED2,
    NEED3,
    Utf8Guard,
)

PENDING = {
    ACCEPT: b"",
    NEED1: b"\xc3",
    NEED2: b"\xe4",
    NEED3: b"\xf1",
    AFTER_E0: b"\xe0",
    AFTER_ED: b"\xed",
    AFTER_F0: b"\xf0",
    AFTER_F4: b"\xf4",
    AFTER_EF: b"\xef",
    AFTER_EFBF: b"\xef\xbf",
}


def valid_prefix(data: bytes) -> bool:
    """Can some continuation turn `data` into valid UTF-8? (Python's incremental decoder alone
    is not enough: it accepts b"\xed\xa1" and only objects once the surrogate's third byte arrives.)"""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        if "\ufffd" in decoder.decode(data, final=False):
            return False
    except UnicodeDecodeError:
        return False
    pending = decoder.getstate()[0]
    if not pending:
        return True
    need = {0xC: 2, 0xD: 2, 0xE: 3, 0xF: 4}[pending[0] >> 4] - len(pending)
    # the edges of every continuation range UTF-8 allows: enough to find a completion if one exists
    edges = (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)
    return any(complete(pending + bytes(c)) for c in itertools.product(edges, repeat=need))


def complete(data: bytes) -> bool:
    """Valid UTF-8 that ends on a character boundary and holds no U+FFFD."""
    try:
        return "\ufffd" not in data.decode("utf-8")
    except UnicodeDecodeError:
        return False


def test_guard_tables_agree_with_pythons_utf8_decoder_for_every_token(enc):
    guard = Utf8Guard.for_tokenizer(enc, 50257)
    for state, pending in PENDING.items():
        assert valid_prefix(pending) and (state == ACCEPT) == complete(pending)
        allowed = (~guard.forbidden[state]).tolist()
        completes = (~guard.unfinished[state]).tolist()
        for i in range(50256):
            data = pending + enc.decode_single_token_bytes(i)
            assert allowed[i] == valid_prefix(data), (state, i)
            assert completes[i] == (allowed[i] and complete(data)), (state, i)
        assert allowed[50256] == (state == ACCEPT)  # <|endoftext|> only between characters


def test_guard_masks_ids_beyond_the_tokenizer(enc):
    guard = Utf8Guard.for_tokenizer(enc, 50304)  # a vocabulary padded to a multiple of 64
    assert guard.forbidden[:, 50257:].all()


def _sampled_bytes(enc, guard, seed):
    model = tiny_gpt(vocab_size=50257, n_positions=64, seed=seed, n_embd=64)
    prompts = [enc.encode(p) for p in ("今天的天气", "人工智能的未来", "红楼梦", "我")]
    steps = generate_tokens(
        model, prompts, 500, Sampling(temperature=1.5), guard=guard, generator=torch.Generator().manual_seed(seed)
    )
    columns = list(zip(*steps))  # 4 × 500 = 2,000 tokens
    return [b"".join(enc.decode_single_token_bytes(t) for t in col) for col in columns]


@pytest.mark.slow
def test_guard_keeps_hot_random_sampling_valid_utf8(enc):
    guard = Utf8Guard.for_tokenizer(enc, 50257)
    for data in _sampled_bytes(enc, guard, seed=3):
        text = data.decode("utf-8")  # strict: raises on any invalid or dangling byte
        assert "\ufffd" not in text
    # the same run without the guard does produce broken characters: the test can fail
    broken = [d for d in _sampled_bytes(enc, None, seed=3) if not complete(d)]
    assert broken


def test_guard_never_leaves_a_dangling_partial_character(enc):
    guard = Utf8Guard.for_tokenizer(enc, 50257)
    model = tiny_gpt(vocab_size=50257, n_positions=64, n_embd=64)
    prompt = [enc.encode("天")]
    for n in range(1, 7):
        for seed in range(5):
            steps = generate_tokens(
                model,
                prompt * 8,
                n,
                Sampling(temperature=3.0),
                guard=guard,
                generator=torch.Generator().manual_seed(seed),
            )
            for col in zip(*steps):
                assert complete(b"".join(enc.decode_single_token_bytes(t) for t in col))
