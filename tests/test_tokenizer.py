"""The tiktoken tokenizer built from vocab.json + merges.txt, against transformers' GPT2Tokenizer."""

import json

import pytest

from minigpt2 import CheckpointError, load_tokenizer
from minigpt2.tokenizer import byte_stand_ins

TEXTS = [
    "zh/红楼梦.txt",
    "zh/西游记.txt",
    "zh/水浒传.txt",
    "zh/三国演义.txt",
    "zh/鲁迅小说集.txt",
    "en/pride_and_prejudice.txt",
    "en/sherlock_holmes.txt",
    "en/tinyshakespeare.txt",
]


@pytest.fixture(scope="module")
def enc(shared_data):
    return load_tokenizer(shared_data / "gpt2")


@pytest.fixture(scope="module")
def reference(shared_data):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(shared_data / "gpt2")  # reads the same vocab.json + merges.txt


def test_ids_equal_transformers(enc, reference, shared_data):
    assert enc.encode("今天的天气") == reference.encode("今天的天气")
    assert enc.encode("Hello world") == reference.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    for name in ("zh/鲁迅小说集.txt", "en/sherlock_holmes.txt"):
        text = (shared_data / name).read_text(encoding="utf-8")[20000:24000]
        assert enc.encode(text) == reference.encode(text), name


@pytest.mark.parametrize("name", TEXTS)
def test_shared_texts_round_trip_exactly(enc, shared_data, name):
    text = (shared_data / name).read_text(encoding="utf-8")
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    if name.startswith("zh/鲁迅"):
        # GPT-2 spends about two tokens per Chinese character (shared/data/README.md)
        assert 1.8 < len(ids) / len(text) < 2.5


def test_byte_stand_ins_cover_every_byte():
    table = byte_stand_ins()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["a"] == ord("a")


def test_mismatched_files_are_refused(shared_data, tmp_path):
    vocab = json.loads((shared_data / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    merges = (shared_data / "gpt2" / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[5], merges[6] = merges[6], merges[5]  # swap two merges: the ids no longer follow merge order
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    from minigpt2.tokenizer import encoding_from_files

    with pytest.raises(CheckpointError, match="does not match"):
        encoding_from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
