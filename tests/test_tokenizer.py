"""The tiktoken tokenizer built from vocab.json + merges.txt, against transformers' GPT2Tokenizer."""

import json
import re

import pytest

from minigpt2 import CheckpointError, load_tokenizer
from minigpt2.io.tokenizer import byte_stand_ins

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
def reference(test_data):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(test_data / "gpt2")  # reads the same vocab.json + merges.txt


def test_ids_equal_transformers(enc, reference, test_data):
    assert enc.encode("今天的天气") == reference.encode("今天的天气")
    assert enc.encode("Hello world") == reference.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    for name in ("zh/鲁迅小说集.txt", "en/sherlock_holmes.txt"):
        text = (test_data / name).read_text(encoding="utf-8")[20000:24000]
        assert enc.encode(text) == reference.encode(text), name


@pytest.mark.parametrize("name", TEXTS)
def test_shared_texts_round_trip_exactly(enc, test_data, name):
    assert_round_trip(enc, test_data, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXTS)
def test_whole_shared_texts_round_trip_exactly(enc, shared_data, name):
    assert_round_trip(enc, shared_data, name)


def assert_round_trip(enc, root, name):
    text = (root / name).read_text(encoding="utf-8")
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    if name.startswith("zh/鲁迅"):
        # GPT-2 spends about two tokens per Chinese character (shared/data/README.md)
        assert 1.8 < len(ids) / len(text) < 2.5


def test_byte_stand_ins_cover_every_byte():
    table = byte_stand_ins()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["a"] == ord("a")


def test_shipped_files_are_gpt2s_and_checked(enc, tmp_path, monkeypatch):
    """The package's copies are the real GPT-2 files (transformers reads them the same way) and a
    damaged copy is refused by its sha256, never used."""
    from minigpt2.io import tokenizer

    assert tokenizer.gpt2_files() == (tokenizer.GPT2_DIR / "vocab.json", tokenizer.GPT2_DIR / "merges.txt")
    assert "Modified MIT License" in (tokenizer.GPT2_DIR / "LICENSE").read_text(encoding="utf-8")
    damaged = tmp_path / "gpt2"
    damaged.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (damaged / name).write_bytes((tokenizer.GPT2_DIR / name).read_bytes())
    with (damaged / "merges.txt").open("a", encoding="utf-8") as f:
        f.write("a b\n")
    monkeypatch.setattr(tokenizer, "GPT2_DIR", damaged)
    tokenizer.gpt2_files.cache_clear()
    try:
        with pytest.raises(CheckpointError, match=r"merges.txt', shipped with minigpt2, is damaged"):
            load_tokenizer("gpt2")
    finally:
        tokenizer.gpt2_files.cache_clear()


def test_mismatched_files_are_refused(test_data, tmp_path):
    vocab = json.loads((test_data / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    merges = (test_data / "gpt2" / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[5], merges[6] = merges[6], merges[5]  # swap two merges: the ids no longer follow merge order
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    from minigpt2.io.tokenizer import encoding_from_files

    with pytest.raises(CheckpointError, match="does not match"):
        encoding_from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_sources_with_the_same_files_share_one_read_and_each_is_checked(test_data, tmp_path):
    """compare.py's `loaded`: byte-identical files in two folders give the same Encoding, read once;
    each source's model size is still checked, naming that source's file."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(test_data / "gpt2" / name, folder / name)
    loaded = {}
    first = load_tokenizer(a, vocab_size=50257, loaded=loaded)
    assert load_tokenizer(b, vocab_size=50304, loaded=loaded) is first and len(loaded) == 1
    named = re.escape(f"'{b / 'vocab.json'}' holds id 50256, past the model's vocabulary of 1000")
    with pytest.raises(CheckpointError, match=named):
        load_tokenizer(b, vocab_size=1000, loaded=loaded)
    (b / "merges.txt").write_text((a / "merges.txt").read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert load_tokenizer(b, loaded=loaded) is not first and len(loaded) == 2  # other bytes: read on their own


def test_a_token_that_is_not_in_gpt2s_byte_alphabet_is_named(test_data, tmp_path):
    vocab = json.loads((test_data / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    vocab["a\tb"] = vocab.pop("<|endoftext|>")  # a tab: a control byte, written as ĉ in GPT-2's files
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes((test_data / "gpt2" / "merges.txt").read_bytes())
    with pytest.raises(CheckpointError, match=r"token 'a\\tb' uses '\\t', not a GPT-2 byte stand-in"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "case, vocab_size, message",
    [
        ("garbage vocab.json", None, r"cannot read '.*vocab\.json'"),
        ("vocab.json a list", None, r"vocab\.json' is not a GPT-2 vocab\.json"),
        ("merges.txt cut to one merge", None, r"merges\.txt' has 1 merges but .*vocab\.json' has 50000 tokens"),
        ("an id past the model's vocabulary", 50257, r"vocab\.json' holds id 60000, past the model's vocabulary"),
        ("merges.txt missing", None, r"merges\.txt' is missing"),
        ("no files, a grown model", 50265, r"has no vocab\.json and merges\.txt, and its model has 50265 tokens"),
    ],
)
def test_a_model_is_never_given_gpt2s_tokenizer_in_place_of_its_own(test_data, tmp_path, case, vocab_size, message):
    """Issue 20 A, in-process: files that are there but wrong are errors naming the file."""
    vocab = json.loads((test_data / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    merges = (test_data / "gpt2" / "merges.txt").read_text(encoding="utf-8").splitlines()
    files = {
        "garbage vocab.json": {"vocab.json": "\x8b not json", "merges.txt": "\n".join(merges)},
        "vocab.json a list": {"vocab.json": "[1, 2]", "merges.txt": "\n".join(merges)},
        "merges.txt cut to one merge": {"vocab.json": json.dumps(vocab), "merges.txt": "\n".join(merges[:2])},
        "an id past the model's vocabulary": {
            "vocab.json": json.dumps({**vocab, "<|endoftext|>": 60000}),
            "merges.txt": "\n".join(merges),
        },
        "merges.txt missing": {"vocab.json": json.dumps(vocab)},
        "no files, a grown model": {},
    }[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(tmp_path, vocab_size=vocab_size)


def test_gpt2s_tokenizer_stands_in_only_for_no_files_and_says_so(tmp_path):
    from minigpt2.io.tokenizer import TokenizerNotice

    with pytest.warns(TokenizerNotice, match="has no vocab.json and merges.txt: using GPT-2's own tokenizer"):
        assert load_tokenizer(tmp_path, vocab_size=50257).encode("Hello world") == [15496, 995]
    with pytest.raises(CheckpointError, match="not found: there is no such file or folder"):
        load_tokenizer(tmp_path / "no-such-dir")
    with pytest.raises(CheckpointError, match=r"vocab\.json' is missing"):
        load_tokenizer(tmp_path, explicit=True)  # a folder the user named as the tokenizer must hold it
