"""One evaluation protocol (minigpt2.model.evaluate): its windows, its character count, its figures against
a separate forward pass, and the same number from the training log and from compare.py."""

import json
import math

import numpy as np
import pytest
import torch
from clis import run_script

from minigpt2 import GPT, GPTConfig, save_model
from minigpt2.files import read_jsonl
from minigpt2.io.tokenizer import encoding_from_files
from minigpt2.model.evaluate import (
    Score,
    batches,
    bits_per_char,
    char_counts,
    perplexity,
    score_stream,
    score_text,
    spans,
    text_stream,
)


@pytest.fixture(scope="module")
def enc(test_data):
    return encoding_from_files(test_data / "gpt2" / "vocab.json", test_data / "gpt2" / "merges.txt")


def lead_bytes(data: bytes) -> int:
    """Characters of UTF-8 bytes, counted as a decoder would: every byte that starts one."""
    return sum(1 for byte in data if byte & 0xC0 != 0x80)


def test_windows_cover_the_first_tokens_once_in_order():
    assert spans(101, 10) == [(s, 10) for s in range(0, 100, 10)]  # 100 tokens after the EOT
    assert spans(101, 10, max_tokens=35) == [(0, 10), (10, 10), (20, 10), (30, 5)]
    assert spans(1, 10) == [] and spans(5, 10) == [(0, 4)]
    assert batches(spans(101, 10, 35), 2) == [[(0, 10), (10, 10)], [(20, 10)], [(30, 5)]]
    # 1 nat per token, 2 tokens a character: 2 nats a character = 2 / ln 2 bits
    assert bits_per_char(2.0, 1) == pytest.approx(2 / math.log(2))
    assert perplexity(1.0) == pytest.approx(math.e) and perplexity(800) == math.inf
    assert math.isnan(Score(nats=0.0, tokens=0, characters=0, window=4).loss)


def test_characters_are_those_the_tokens_spell(enc, test_data):
    text = (test_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")[:3000] + " and some English."
    stream, total = text_stream(enc, text)
    counts = char_counts(enc)
    assert stream[0] == enc.eot_token and total == len(stream) - 1
    assert counts[enc.eot_token] == 0
    assert counts[stream[1:]].sum() == len(text)
    cut = stream[1:1001]  # a cap can split a character: it counts with the token holding its first byte
    assert counts[cut].sum() == lead_bytes(enc.decode_bytes(cut))
    assert text_stream(enc, "a\r\nb\rc")[0] == text_stream(enc, "a\nb\nc")[0]  # line ends as training reads them


def test_scores_equal_a_separate_forward_pass(enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=16)).eval()
    stream, _ = text_stream(enc, "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3)
    counts = char_counts(enc)
    score = score_text(model, stream, counts, window=16)
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 16):
            e = min(s + 16, len(stream) - 1)
            _, loss = model(torch.tensor([stream[s:e]]), torch.tensor([stream[s + 1 : e + 1]]))
            nats += loss.item() * (e - s)
    assert score.tokens == len(stream) - 1 and score.window == 16
    assert score.nats == pytest.approx(nats, rel=1e-5)
    assert score.characters == counts[stream[1:]].sum()
    assert score.bits_per_char == pytest.approx(nats / (math.log(2) * score.characters), rel=1e-5)
    # Batching does not change the figures; a stop request between passes reports nothing.
    for batch_size in (1, 3):
        again = score_text(model, np.array(stream, dtype=np.uint16), counts, window=16)
        run = score_stream(model, stream, counts, window=16, batch_size=batch_size)
        while True:
            try:
                next(run)
            except StopIteration as finished:
                assert finished.value.nats == pytest.approx(again.nats, rel=1e-5)
                break
    stopped = score_stream(model, stream, counts, window=16, batch_size=1, stop=lambda: True)
    with pytest.raises(StopIteration) as finished:
        next(stopped)
    assert finished.value.value is None


@pytest.mark.slow
def test_the_training_log_and_compare_give_the_same_bits_per_character(test_data, tmp_path):
    """The check of issue 19: a model with a 64-token context trained with --seq-len 64, --eval-data F
    and --eval-tokens 8192; compare.py START RUN --text F --max-eval-tokens 8192 prints, for B,
    the bits per character of the run's last eval line for F (and for A, its step-0 line)."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    start = save_model(model, tmp_path / "start", tokenizer_source=test_data / "gpt2")
    novel = (test_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8")
    f = tmp_path / "luxun.txt"  # a preface and a table of contents first: not the book's tokens per character
    f.write_text(novel[:12000], encoding="utf-8")
    train = tmp_path / "train.txt"
    train.write_text((test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    run = tmp_path / "run"
    trained = run_script(
        "train.py", "--model", start, "--data", train, "--eval-data", f, "--out", run, "--seq-len", 64,
        "--eval-tokens", 8192, "--steps", 2, "--batch-size", 2, "--lr", 3e-3, "--eval-every", 0,
        "--cache-dir", tmp_path / "cache", "--device", "cpu", timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    evals = [r for r in read_jsonl(run / "log.jsonl") if r["type"] == "eval" and r["set"] == "luxun"]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[-1]["eval_tokens"] == 8192 and evals[-1]["window"] == 64
    assert "8,192 tokens in windows of 64" in trained.stdout  # the console says the protocol
    compared = run_script(
        "compare.py", start, run, "--text", f, "--max-eval-tokens", 8192, "--json", tmp_path / "c.json", timeout=300
    )
    assert compared.returncode == 0, compared.stderr
    (row,) = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["behaviour"]
    for side, logged in (("a", evals[0]), ("b", evals[-1])):
        assert row[side]["tokens"] == logged["eval_tokens"] and row[side]["characters"] == logged["chars"]
        assert row[side]["bits_per_char"] == pytest.approx(logged["bpc"], rel=1e-3)
        assert f"{row[side]['bits_per_char']:.4g}" in compared.stdout
    assert "windows of 64 tokens" in compared.stdout


def test_extend_vocab_scores_its_before_and_after_by_the_protocol(enc):
    from minigpt2.training.vocab import text_score

    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16)).train()
    text = "今天的天气很好。" * 40
    score = text_score(model, enc, text, max_chars=100)
    assert score.tokens == len(enc.encode_ordinary(text[:100])) and score.characters == 100 and score.window == 16
    assert score.protocol() == f"{score.tokens:,} tokens in windows of 16, 100 characters"
    stream, _ = text_stream(enc, text[:100])
    assert score.nats == pytest.approx(score_text(model.eval(), stream, char_counts(enc)).nats, rel=1e-6)
