"""Text in, text out: streaming whole characters, stop strings, statistics."""

import pytest
import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.generation.generate import Sampling
from minigpt2.generation.sampling import cjk_share, encode_prompt, generate_text
from minigpt2.generation.utf8 import Utf8Stream


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, n_positions=64, n_layer=2, n_head=2, n_embd=64)).eval()


def test_stream_shows_a_character_only_when_complete():
    stream = Utf8Stream()
    data = "今天ok".encode()
    pieces = [stream.push(data[i : i + 1]) for i in range(len(data))]
    assert pieces == ["", "", "今", "", "", "天", "o", "k"]
    assert stream.flush() == ""
    dangling = Utf8Stream()
    assert dangling.push("天".encode()[:2]) == "" and dangling.flush() == "\ufffd"


def test_streamed_pieces_add_up_to_the_sample(model, enc):
    pieces = {}
    samples = generate_text(
        model,
        enc,
        ["今天的天气", "Hello"],
        40,
        Sampling(temperature=1.2),
        num_samples=2,
        seed=0,
        on_text=lambda i, p: pieces.setdefault(i, []).append(p),
    )
    assert [s.prompt for s in samples] == ["今天的天气", "今天的天气", "Hello", "Hello"]
    for i, s in enumerate(samples):
        assert "".join(pieces.get(i, [])) == s.text
        assert len(s.tokens) == 40 and s.finish_reason == "length"
        assert enc.decode(s.tokens) == s.text  # whole characters only: nothing lost or replaced
        assert "\ufffd" not in s.text


def test_stop_string_ends_the_sample_before_it(model, enc):
    full = generate_text(model, enc, ["The"], 30, Sampling(greedy=True))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop.strip()) >= 2
    shown = []
    cut = generate_text(
        model, enc, ["The"], 30, Sampling(greedy=True), stop=[stop], on_text=lambda i, p: shown.append(p)
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert "".join(shown) == cut.text  # no part of the stop string was ever shown


def test_endoftext_finishes_a_sample(model, enc):
    with torch.no_grad():
        saved = model.ln_f.weight.clone(), model.ln_f.bias.clone()
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[enc.eot_token] * 1000)
    try:
        s = generate_text(model, enc, ["今天"], 20, Sampling(greedy=True))[0]
    finally:
        with torch.no_grad():
            model.ln_f.weight.copy_(saved[0])
            model.ln_f.bias.copy_(saved[1])
    assert (s.text, s.tokens, s.finish_reason) == ("", [], "endoftext")


def test_same_seed_same_text(model, enc):
    top_k = Sampling(top_k=50)
    a = generate_text(model, enc, ["今天"], 25, top_k, seed=5)[0].text
    b = generate_text(model, enc, ["今天"], 25, top_k, seed=5)[0].text
    c = generate_text(model, enc, ["今天"], 25, top_k, seed=6)[0].text
    assert a == b != c
    assert generate_text(model, enc, ["今天"], 25)[0].text == generate_text(model, enc, ["今天"], 25, seed=9)[0].text


def test_cjk_share():
    assert cjk_share("今天天气很好！") == 1.0
    assert cjk_share("abc 今天") == pytest.approx(2 / 5)
    assert cjk_share("") == 0.0 and cjk_share("hello") == 0.0


def test_prompts_are_encoded_with_care(enc):
    assert encode_prompt(enc, "", 1024) == ([enc.eot_token], False)
    ids, cut = encode_prompt(enc, "天" * 100, 64)
    assert cut and len(ids) == 64 and ids == enc.encode("天" * 100)[-64:]
