"""Vocabulary extension: the BPE learner, the extended tokenizer files, and the grown model."""

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from minigpt2.generation.utf8 import Utf8Guard
from minigpt2.io.bpe import _MergeRules, count_pretokens, learn_merges_from_counts
from minigpt2.io.tokenizer import encoding_from_files, load_tokenizer
from minigpt2.io.weights import load_model, save_model
from minigpt2.model.config import GPTConfig
from minigpt2.model.gpt import GPT
from minigpt2.training.data import check_inputs, read_chunks
from minigpt2.training.vocab import grow_model, learn_merges_cached, old_pieces, tokens_per_char, write_tokenizer_files

MIXED = "GPT-2 说：“Hello, 世界！” 😀🎉 naïve café\u200b　全角ＡＢＣ 1234 aaaa  \n\n\t'll 们们们们"


@pytest.fixture(scope="module")
def gpt2(test_data):
    return encoding_from_files(test_data / "gpt2" / "vocab.json", test_data / "gpt2" / "merges.txt")


@pytest.fixture(scope="module")
def small_corpus(test_data) -> str:
    zh = (test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:20000]
    en = (test_data / "en" / "sherlock_holmes.txt").read_text(encoding="utf-8")[:8000]
    return zh + en + MIXED * 3


def reference_merges(texts, enc, n_merges):
    """Obviously-correct BPE continuation: recount every pair of every word at every step, take
    the best allowed pair (count, then smallest bytes), check the rules against every token."""
    words = [
        ([enc.decode_single_token_bytes(t) for t in enc._encode_single_piece(w.encode())], f)
        for w, f in count_pretokens(texts).items()
    ]
    tokens = {enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if i != enc.eot_token}

    def allowed(left, right):
        t = left + right
        if t in tokens or any(k != len(left) and t[:k] in tokens and t[k:] in tokens for k in range(1, len(t))):
            return False
        return not any(
            len(u) > len(t)
            and ((u.startswith(t) and u[len(t) :] in tokens) or (u.endswith(t) and u[: -len(t)] in tokens))
            for u in tokens
        )

    merges, rejected = [], 0
    while len(merges) < n_merges:
        counts = Counter()
        for word, f in words:
            for pair in zip(word, word[1:], strict=False):
                counts[pair] += f
        best = None
        for pair in sorted((p for p in counts if counts[p] >= 2), key=lambda p: (-counts[p], p)):
            if allowed(*pair):
                best = pair
                break
            rejected += 1
        if best is None:
            break
        merges.append(best)
        tokens.add(best[0] + best[1])
        for word, _ in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i : i + 2] = [best[0] + best[1]]
                i += 1
    return merges, rejected


def test_learner_matches_slow_reference(gpt2, small_corpus):
    # 80 merges: the reference checks each candidate against all 50,257 tokens (a second per ~15)
    merges = learn_merges_from_counts(count_pretokens([small_corpus]), gpt2, 80)
    expected, rejected = reference_merges([small_corpus], gpt2, 80)
    assert len(merges) == 80
    assert merges == expected
    assert rejected >= 10  # the rules were exercised: frequent pairs were refused (25 of them here)


def test_learning_reports_each_phase_from_start_to_end(gpt2, small_corpus):
    from minigpt2.io.bpe import LEARNING, READING, SPLITTING, learn_merges

    heard = []
    chunks = [small_corpus[:10000], small_corpus[10000:]]  # cut where no piece spans the cut
    merges = learn_merges(chunks, gpt2, 250, lambda *a: heard.append(a), total_chars=len(small_corpus))
    assert merges == learn_merges_from_counts(count_pretokens(chunks), gpt2, 250)  # the same merges
    assert [what for what in dict.fromkeys(w for w, _, _ in heard)] == [READING, SPLITTING, LEARNING]
    for phase in (READING, SPLITTING, LEARNING):
        done = [(d, t) for w, d, t in heard if w == phase]
        assert done[0][0] == 0 and done[-1][0] == done[-1][1] > 0  # from its start to its end
        assert all(a[0] <= b[0] for a, b in zip(done, done[1:]))  # never backwards
    assert (LEARNING, 100, 250) in heard and heard[-1] == (LEARNING, 250, 250)
    assert heard[[w for w, _, _ in heard].index(SPLITTING) - 1] == (READING, len(small_corpus), len(small_corpus))


def test_rules_refuse_second_spellings():
    rules = _MergeRules([b"a", b"b", b"c", b"ab", b"bc", b"abcd", b"d"])
    assert not rules.allows(b"ab", b"c")  # abc = a + bc too
    assert not rules.allows(b"a", b"b")  # ab exists already
    assert not rules.allows(b"bc", b"d")  # abcd = a + bcd would become a second split
    assert rules.allows(b"c", b"c")


def write_extended(tmp_path, test_data, enc, texts, n):
    merges = learn_merges_from_counts(count_pretokens(texts), enc, n)
    folder = write_tokenizer_files(
        tmp_path / "tok", test_data / "gpt2" / "vocab.json", test_data / "gpt2" / "merges.txt", merges
    )
    return merges, folder


def slow_transformers_ids(folder: Path, text: str) -> list[int]:
    """transformers' pair-ranked Python BPE (GPT-2's slow tokenizer, kept in ClvpTokenizer.bpe),
    on GPT-2's pre-tokens: the reference for how merges.txt is read."""
    import regex
    from transformers.models.clvp.tokenization_clvp import ClvpTokenizer

    from minigpt2.io.tokenizer import GPT2_PATTERN

    slow = ClvpTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    ids = []
    for piece in regex.findall(GPT2_PATTERN, text):
        spelled = "".join(slow.byte_encoder[b] for b in piece.encode("utf-8"))
        ids += [slow.encoder[t] for t in slow.bpe(spelled).split(" ")]
    return ids


def assert_tokenizers_agree(folder: Path, texts: list[str], slow_chars: int) -> None:
    from transformers import GPT2TokenizerFast

    enc = load_tokenizer(folder)
    fast = GPT2TokenizerFast.from_pretrained(str(folder))
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert fast(text)["input_ids"] == ids
        assert slow_transformers_ids(folder, text[:slow_chars]) == enc.encode_ordinary(text[:slow_chars])
        assert enc.decode(ids) == text
        assert fast.decode(ids, clean_up_tokenization_spaces=False) == text


def test_extended_tokenizer_files_load_everywhere(tmp_path, test_data, gpt2, small_corpus):
    merges, folder = write_extended(tmp_path, test_data, gpt2, [small_corpus], 300)
    enc = load_tokenizer(folder)
    assert enc.n_vocab == 50257 + 300 and enc.eot_token == 50256
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(50257 + 300))
    assert [enc.decode_single_token_bytes(50257 + k) for k in range(300)] == [a + b for a, b in merges]
    assert (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[-300:][0].count(" ") == 1
    assert tokens_per_char(enc, small_corpus[:20000]) < tokens_per_char(gpt2, small_corpus[:20000])
    assert_tokenizers_agree(folder, [small_corpus, MIXED], slow_chars=30000)


@pytest.mark.slow
def test_tokenizers_agree_at_8000_merges(tmp_path, shared_data, gpt2):
    """8,000 merges from a third of a novel; transformers (fast and slow) and tiktoken agree on all
    of Lu Xun, a slice of each English text, mixed text and emoji."""
    excerpt = tmp_path / "红楼梦-300k.txt"  # 300,000 characters learn 8,000 merges in a third of the time
    excerpt.write_text((shared_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    files = check_inputs([excerpt])
    merges, _ = learn_merges_cached(files, gpt2, 8000, cache_dir=tmp_path / "cache")
    assert len(merges) == 8000
    again, cached = learn_merges_cached(files, gpt2, 8000, cache_dir=tmp_path / "cache")
    assert cached and again == merges
    folder = write_tokenizer_files(
        tmp_path / "tok", shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt", merges
    )
    texts = [(shared_data / "zh" / "鲁迅小说集.txt").read_text(encoding="utf-8"), MIXED * 20]
    texts += [p.read_text(encoding="utf-8")[:100_000] for p in sorted((shared_data / "en").glob("*.txt"))]
    assert_tokenizers_agree(folder, texts, slow_chars=50_000)  # transformers' pure-Python BPE: ~20k chars/s
    assert tokens_per_char(load_tokenizer(folder), texts[0]) < 1.0


def test_pretokens_match_tiktoken(gpt2, test_data):
    text = "".join(read_chunks(test_data / "en" / "tinyshakespeare.txt"))[:50000] + MIXED
    pieces = count_pretokens([text])
    from minigpt2.io.bpe import _PRETOKENIZER

    ids = [t for p in _PRETOKENIZER.findall(text) for t in gpt2._encode_single_piece(p.encode())]
    assert ids == gpt2.encode_ordinary(text) and sum(pieces.values()) > 1000


@pytest.fixture(scope="module")
def grown(tmp_path_factory, test_data, gpt2, small_corpus):
    tmp = tmp_path_factory.mktemp("grown")
    _, folder = write_extended(tmp, test_data, gpt2, [small_corpus], 200)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    new_enc = load_tokenizer(folder)
    return model, grow_model(model, gpt2, new_enc), new_enc, folder, tmp


def test_grown_rows(grown, gpt2):
    model, big, new_enc, _, _ = grown
    assert big.config.vocab_size == new_enc.n_vocab == 50257 + 200
    assert torch.equal(big.wte.weight[:50257], model.wte.weight)
    assert big.lm_head.weight is big.wte.weight
    for i in range(50257, new_enc.n_vocab):
        token = new_enc.decode_single_token_bytes(i)
        pieces = old_pieces(gpt2, token)
        assert b"".join(gpt2.decode_single_token_bytes(p) for p in pieces) == token and max(pieces) < 50256
        assert len(pieces) >= 2
        torch.testing.assert_close(big.wte.weight[i], model.wte.weight[pieces].mean(0), rtol=0, atol=1e-7)
    fragment = next(i for i in range(50257, new_enc.n_vocab) if not _is_utf8(new_enc.decode_single_token_bytes(i)))
    assert old_pieces(gpt2, new_enc.decode_single_token_bytes(fragment))  # fragments decompose too


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_grown_checkpoint_matches_transformers(grown):
    from transformers import GPT2LMHeadModel

    _, big, new_enc, folder, tmp = grown
    out = save_model(big, tmp / "ckpt", tokenizer_source=folder)
    loaded = load_model(out)
    assert load_tokenizer(out).n_vocab == loaded.config.vocab_size == big.config.vocab_size
    ids = torch.tensor([new_enc.encode_ordinary("黛玉道：“宝玉来了。” Holmes said.")[:40] + [50256, 50257, 50400]])
    assert ids.max() >= 50257
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        ours, theirs = loaded(ids), hf(ids).logits
    assert ours.shape[-1] == 50457
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    guard = Utf8Guard.for_tokenizer(new_enc, loaded.config.vocab_size)
    assert guard.mask(torch.zeros(1, 50457), torch.zeros(1, dtype=torch.long)).isinf().any()


@pytest.mark.slow
def test_compare_prompt_on_a_grown_model_spells_each_side_with_its_own_tokenizer(grown, test_data, tmp_path):
    """compare.py --prompt on a model grown with --extend-vocab (it crashed with KeyError: '50258'
    decoding B's new token ids with A's tokenizer)."""
    from clis import run_script

    from minigpt2.analysis.compare import token_text

    model, big, new_enc, folder, _ = grown
    base = save_model(model, tmp_path / "base", tokenizer_source=test_data / "gpt2")
    with torch.no_grad():  # B's final hidden state is a constant v, and its new tokens' rows point along v:
        big = copy.deepcopy(big)  # its most likely next tokens are new ones, whatever the prompt
        big.ln_f.weight.zero_()
        big.ln_f.bias.copy_(torch.randn(64))
        big.wte.weight[50257:] = 3 * big.ln_f.bias
    grown_dir = save_model(big, tmp_path / "grown", tokenizer_source=folder)
    result = run_script("compare.py", base, grown_dir, "--prompt", "黛玉道", "--json", tmp_path / "c.json", timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (prompt,) = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["activations"]
    assert all(t["id"] >= 50257 for t in prompt["top5_b"])
    assert [t["text"] for t in prompt["top5_b"]] == [token_text(new_enc, t["id"]) for t in prompt["top5_b"]]
    assert all(t["id"] < 50257 for t in prompt["top5_a"])
    assert prompt["top5_b"][0]["text"] in result.stdout


@pytest.mark.slow
def test_compare_base_with_grown(grown):
    """compare.py's weight comparison accepts a grown B: shared rows compared, new rows summarised."""
    from minigpt2.analysis.compare import ORIENTATION, compare_weights
    from minigpt2.analysis.report import _weights

    model, big, _, folder, tmp = grown
    base = save_model(model, tmp / "base")
    grown_dir = save_model(big, tmp / "grown-ckpt", tokenizer_source=folder)
    weights = compare_weights(str(base), str(grown_dir))
    assert weights["new_rows"]["count"] == 200 and weights["new_rows"]["side"] == "B"
    wte = next(t for t in weights["tensors"] if t["name"] == "wte.weight")
    assert wte["shape"] == [50257, 64] and wte["relative_change"] == 0
    assert "200 more token rows" in "\n".join(_weights({"weights": weights, "orientation": ORIENTATION}, 10))


@pytest.mark.slow
def test_train_py_grows_once_and_a_grown_run_resumes_bit_for_bit(test_data, tmp_path):
    import shutil

    from clis import run_script
    from safetensors.torch import load_file

    text = tmp_path / "zh.txt"
    text.write_text((test_data / "zh" / "西游记.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    args = ["--data", text, "--init-preset", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--context", "32", "--tokenizer", test_data / "gpt2", "--extend-vocab", "40", "--batch-size", "2",
            "--steps", "4", "--save-every", "2", "--eval-every", "0", "--eval-tokens", "64", "--keep-last", "0",
            "--dropout", "0.1", "--cache-dir", tmp_path / "cache", "--device", "cpu"]  # fmt: skip

    progress = ""

    def train(*extra):
        nonlocal progress
        result = run_script("train.py", *extra, timeout=300)
        assert result.returncode == 0, result.stderr
        progress = result.stderr
        return result.stdout

    first = train(*args, "--out", tmp_path / "full")
    assert "vocabulary: 40 new tokens learned" in first and "50,297 in all" in first
    assert "progress: learning merges: 40 of 40 (100%)" in progress  # the silent minutes now speak
    # the merges are learned from the training part only: the held-out tail (~1%) is not read
    read = re.search(r"progress: reading the text \(characters\): 0 of ([\d,]+) \(0%\)", progress)
    assert read and 39_000 < int(read[1].replace(",", "")) < 40_000, progress
    train(*args, "--out", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "final")  # as if it had stopped at step 2
    resumed = train("--out", tmp_path / "split", "--resume")
    assert "resuming at step 2 of 4" in resumed and "vocabulary:" not in resumed  # never learned again
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a["transformer.wte.weight"].shape[0] == 50297 and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "full" / "final" / name).read_bytes() == (tmp_path / "split" / "final" / name).read_bytes()
    assert load_tokenizer(tmp_path / "split").n_vocab == 50297
