"""The data pipeline: finding and checking files, chunked tokenization, the cache, windows."""

import re

import numpy as np
import pytest

from minigpt2.training.data import (
    DataError,
    WindowSampler,
    check_inputs,
    find_text_files,
    gather_windows,
    prepare_corpus,
    read_chunks,
)


@pytest.fixture(scope="module")
def novel_head(test_data, tmp_path_factory):
    """The first 150,000 characters of 红楼梦 (all the excerpt has: CRLF line ends, indented paragraphs) as a file."""
    text = (test_data / "zh" / "红楼梦.txt").read_bytes().decode("utf-8")[:150_000]
    path = tmp_path_factory.mktemp("novel") / "hlm.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


def normalised(path) -> str:
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def test_chunked_tokenization_equals_whole_text(enc, novel_head, test_data):
    for path in (novel_head, test_data / "en" / "sherlock_holmes.txt"):
        text = normalised(path)
        chunks = list(read_chunks(path, chunk_chars=1000))  # excerpts of 30,000-40,000 characters
        assert len(chunks) > 20 and "".join(chunks) == text
        assert [t for c in chunks for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


def test_windows_decode_to_slices_of_the_source(enc, novel_head, test_data, tmp_path):
    corpus = prepare_corpus(
        [novel_head, test_data / "en" / "sherlock_holmes.txt"], enc, val_fraction=0.02, cache_dir=tmp_path
    )
    sources = [normalised(novel_head).encode(), normalised(test_data / "en" / "sherlock_holmes.txt").encode()]
    sampler = WindowSampler(len(corpus.train), seq_len=48, batch_size=8, seed=3)
    eot = enc.eot_token
    checked = 0
    for i in range(5):
        for window in gather_windows(corpus.train.tokens, sampler.offsets(i), 48):
            assert window.shape == (49,)
            for piece in (p for p in _split(window.tolist(), eot) if len(p) > 3):
                data = enc.decode_bytes(piece)
                assert any(data in s for s in sources), data[:40]
                checked += 1
    assert checked >= 40


def _split(ids, sep):
    piece = []
    for t in ids:
        if t == sep:
            yield piece
            piece = []
        else:
            piece.append(t)
    yield piece


def test_validation_is_the_tail_of_each_document(enc, novel_head, test_data, tmp_path):
    other = test_data / "en" / "sherlock_holmes.txt"
    corpus = prepare_corpus([novel_head, other], enc, val_fraction=0.05, cache_dir=tmp_path)
    eot = enc.eot_token
    heads = list(_split(np.asarray(corpus.train.tokens).tolist(), eot))[1:]
    tails = list(_split(np.asarray(corpus.val.tokens).tolist(), eot))[1:]
    assert len(heads) == len(tails) == 2
    for path, head, tail in zip([novel_head, other], heads, tails):
        text = normalised(path)
        assert (enc.decode(head) + enc.decode(tail)) == text  # head + tail = the document, in order
        assert 0.03 < len(enc.decode(tail)) / len(text) < 0.07
    assert corpus.chars == len(normalised(novel_head)) + len(normalised(other))
    assert 2.0 < len(heads[0]) / len(enc.decode(heads[0])) < 2.4  # GPT-2 spends ~2.1 tokens per Chinese character


def test_cache_is_keyed_by_content_and_options(enc, novel_head, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_corpus([novel_head], enc, val_fraction=0.01, cache_dir=cache)
    again = prepare_corpus([novel_head], enc, val_fraction=0.01, cache_dir=cache)
    assert not first.cached and again.cached and again.key == first.key
    assert np.array_equal(np.asarray(first.train.tokens), np.asarray(again.train.tokens))
    copy = tmp_path / "renamed.txt"
    copy.write_bytes(novel_head.read_bytes())
    assert prepare_corpus([copy], enc, val_fraction=0.01, cache_dir=cache).key == first.key  # contents, not names
    assert prepare_corpus([novel_head], enc, val_fraction=0.02, cache_dir=cache).key != first.key
    dropped = prepare_corpus([novel_head], enc, val_fraction=0.01, drop_lines="宝玉", cache_dir=cache)
    assert dropped.key != first.key and dropped.chars < first.chars
    assert "宝玉" not in enc.decode(np.asarray(dropped.train.tokens).tolist())
    copy.write_bytes(novel_head.read_bytes() + "多一行\n".encode())
    assert prepare_corpus([copy], enc, val_fraction=0.01, cache_dir=cache).key != first.key
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temporary folders left


def test_tokenizing_tells_how_far_it_is(enc, novel_head, tmp_path):
    told = []
    corpus = prepare_corpus([novel_head], enc, val_fraction=0.01, cache_dir=tmp_path, threads=1,
                            progress=lambda done, total: told.append((done, total)))  # fmt: skip
    total = told[0][1]
    assert told[0] == (0, total) and told[-1] == (total, total) and total == corpus.chars
    assert all(a[0] <= b[0] for a, b in zip(told, told[1:]))  # never back
    told.clear()
    prepare_corpus([novel_head], enc, val_fraction=0.01, cache_dir=tmp_path, progress=lambda d, t: told.append(d))
    assert told == []  # from the cache: nothing to tokenize, nothing to tell


def test_finding_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.txt", "1.txt", "notes.md"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in find_text_files([tmp_path])] == ["1.txt", "2.txt"]
    assert [p.name for p in find_text_files([str(tmp_path / "*.md"), tmp_path / "1.txt", tmp_path])] == [
        "notes.md",
        "1.txt",
        "2.txt",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        find_text_files([tmp_path / "empty"])
    with pytest.raises(DataError, match="does not exist"):
        find_text_files([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="matches no files"):
        find_text_files([str(tmp_path / "*.csv")])


def test_bad_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("第一行\n".encode() * 400_000 + b"caf\xe9\n")  # the bad byte lies past the first read block
    offset = len("第一行\n".encode()) * 400_000 + 3
    with pytest.raises(DataError, match=rf"latin1.txt' is not valid UTF-8: byte 0xe9 at offset {offset}"):
        check_inputs([bad])
    assert check_inputs([bad], "replace")[0].chars == 4 * 400_000 + 5
    split = tmp_path / "split.txt"  # a character cut in two by the block boundary is fine
    split.write_bytes(b"a" * ((1 << 20) - 1) + "字".encode())
    assert check_inputs([split])[0].chars == (1 << 20)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        check_inputs([tmp_path / "empty.txt"])
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match=r"binary file \(a NUL byte at offset 4\)"):
        check_inputs([tmp_path / "blob.txt"])
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\r\n")
    assert check_inputs([tmp_path / "crlf.txt"])[0].chars == 4


def test_cleaning_everything_away_is_an_error(enc, tmp_path):
    (tmp_path / "a.txt").write_text("下一页\n发布时间 2020\n")
    with pytest.raises(DataError, match="no text after cleaning"):
        prepare_corpus([tmp_path / "a.txt"], enc, drop_lines="下一页|发布时间", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="not a valid regular expression"):
        prepare_corpus([tmp_path / "a.txt"], enc, drop_lines="(", cache_dir=tmp_path / "c")


def test_sampler_covers_each_epoch_once_and_is_a_function_of_the_index():
    sampler = WindowSampler(n_tokens=1000, seq_len=10, batch_size=3, seed=7)
    assert sampler.windows_per_epoch == 99
    epoch0 = np.concatenate([sampler.offsets(i) for i in range(33)])
    shift = epoch0.min() % 10
    assert sorted(epoch0) == [shift + 10 * k for k in range(99)]  # every window exactly once
    assert all(o + 11 <= 1000 for o in epoch0)
    assert not np.array_equal(epoch0[:10], np.sort(epoch0)[:10])  # shuffled
    fresh = WindowSampler(n_tokens=1000, seq_len=10, batch_size=3, seed=7)
    assert np.array_equal(fresh.offsets(40), sampler.offsets(40)) and np.array_equal(fresh.offsets(5), epoch0[15:18])
    other = WindowSampler(n_tokens=1000, seq_len=10, batch_size=3, seed=8)
    assert not np.array_equal(other.offsets(0), sampler.offsets(0))
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(n_tokens=10, seq_len=10, batch_size=1)


def test_the_novels_cost_about_two_tokens_per_character(enc, test_data, tmp_path):
    corpus = prepare_corpus([test_data / "zh" / "西游记.txt"], enc, val_fraction=0.01, cache_dir=tmp_path)
    summary = corpus.summary()
    assert 2.0 < summary["tokens_per_char"] < 2.3
    assert summary["tokens"] == len(corpus.train) + len(corpus.val)
    assert re.fullmatch(r"[0-9a-f]{32}", summary["key"])
