"""Grow GPT-2's vocabulary for the user's text: new merges, new tokenizer files, a bigger model.

GPT-2 spends ~2.1 tokens on a Chinese character, most of them fragments of a character. This
module learns new merges from the user's corpus (bpe.py), writes them as an extended GPT-2
tokenizer (new ids 50,257 onwards, `<|endoftext|>` keeps 50,256, so every old id still means what
it meant), and grows a trained model to match: old embedding rows untouched, a new row for each
new token. The whole pipeline (loading, saving, sampling, comparing) then works unchanged,
because nothing in it assumes 50,257 ids.

    corpus ─ learn_merges_cached ─ write_tokenizer_files ─ load_tokenizer ─┐
    model (old vocabulary) ─────────────────────────────────── grow_model ─┴─ grown model + tokenizer

`extend_vocabulary` does all of it and measures the effect (tokens per character before and
after, bits per character before and after growing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from minigpt2.errors import MiniGPT2Error
from minigpt2.io.bpe import Progress, learn_merges, no_progress
from minigpt2.io.tokenizer import ENDOFTEXT, byte_stand_ins, encoding_from_files, tokenizer_fingerprint
from minigpt2.io.weights import empty_model, write_atomically
from minigpt2.model.evaluate import Score, char_counts, score_text, text_stream
from minigpt2.model.gpt import GPT
from minigpt2.training.data import FileInfo, default_cache_dir, head_text, read_chunks

MERGES_FORMAT = 1  # bump when the learning rules change: old cached merges are then relearned
MAX_VOCAB = 65536  # token files store ids as uint16
MEASURING = "measuring the new tokenizer and the grown model (texts)"


class VocabError(MiniGPT2Error):
    """The vocabulary cannot be extended as asked (too many merges, bad tokenizer files...)."""


# ----- learning, cached ---------------------------------------------------------------------


def _check_room(enc, n_merges: int) -> None:
    if n_merges < 1:
        raise VocabError(f"the number of merges to learn must be at least 1, not {n_merges}")
    if enc.n_vocab + n_merges > MAX_VOCAB:
        raise VocabError(
            f"{enc.n_vocab} ids + {n_merges} new ones exceed {MAX_VOCAB}, the most that token files (uint16) "
            f"hold; learn at most {MAX_VOCAB - enc.n_vocab} merges"
        )


def merges_cache_path(files: list[FileInfo], enc, n_merges: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the merges learned from these files' contents, on this tokenizer, are cached."""
    key_material = {
        "format": MERGES_FORMAT,
        "files": [f.key() for f in files],
        "tokenizer": tokenizer_fingerprint(enc),
        "merges": n_merges,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"merges-{key}.json"


def learn_merges_cached(
    files: list[FileInfo],
    enc,
    n_merges: int,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The merges learned from `files` (data.check_inputs' result), and whether they came from the
    cache. Like the token cache, entries are keyed by the files' contents, the tokenizer and N, so
    the same corpus is learned once; the JSON file is written atomically. `progress`: see bpe.py."""
    _check_room(enc, n_merges)
    path = merges_cache_path(files, enc, n_merges, cache_dir)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in stored["merges"]], True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry: learn again and replace it
    chunks = (chunk for f in files for chunk in read_chunks(f))
    merges = learn_merges(chunks, enc, n_merges, progress, sum(f.chars for f in files))
    entry = {
        "files": [str(f.path) for f in files],
        "requested": n_merges,
        "merges": [[a.hex(), b.hex()] for a, b in merges],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(entry)))
    return merges, False


# ----- tokenizer files ----------------------------------------------------------------------


def write_tokenizer_files(
    directory: str | os.PathLike,
    base_vocab_path: str | os.PathLike,
    base_merges_path: str | os.PathLike,
    new_merges: list[tuple[bytes, bytes]],
) -> Path:
    """Write `vocab.json` + `merges.txt` of the base tokenizer extended by `new_merges`.

    GPT-2's format: tokens spelled with the byte stand-ins, the new merges appended to merges.txt
    after the base ones, and the new tokens given the ids after the highest base id (50,257
    onwards for GPT-2, whose `<|endoftext|>` keeps 50,256). tiktoken (`load_tokenizer`) and
    transformers' GPT-2 tokenizers read the result.
    """
    to_char = {b: ch for ch, b in byte_stand_ins().items()}

    def spell(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    try:
        vocab = json.loads(Path(base_vocab_path).read_text(encoding="utf-8"))
        merges_text = Path(base_merges_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"cannot read the base tokenizer files ({e})") from None
    next_id = max(vocab.values()) + 1
    lines = merges_text.rstrip("\n").split("\n")
    for left, right in new_merges:
        token = spell(left + right)
        if token in vocab:
            raise VocabError(
                f"the merge {left!r} + {right!r} gives an existing token; "
                "these merges were not learned for this tokenizer"
            )
        vocab[token] = next_id
        next_id += 1
        lines.append(f"{spell(left)} {spell(right)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    write_atomically(directory / "vocab.json", lambda tmp: Path(tmp).write_text(vocab_text, encoding="utf-8"))
    merges_out = "\n".join(lines) + "\n"
    write_atomically(directory / "merges.txt", lambda tmp: Path(tmp).write_text(merges_out, encoding="utf-8"))
    return directory


# ----- growing the model --------------------------------------------------------------------


def old_pieces(enc_old, token: bytes) -> list[int]:
    """The old tokens a new token's bytes are made of: the old BPE run on the raw bytes as one
    piece. Not `encode_ordinary`, which needs text: a new token may hold a fragment of a UTF-8
    character (the decode would replace it with U+FFFD) or text the pre-tokenizer would cut."""
    return enc_old._encode_single_piece(token)


def grow_model(model: GPT, enc_old, enc_new) -> GPT:
    """A copy of `model` (float32, CPU) with a vocabulary of `enc_new.n_vocab` ids.

    Ids below `enc_old.n_vocab` (0..50,256 for GPT-2, `<|endoftext|>` included) keep their rows
    exactly. Each new token's row is the mean of the rows of the old tokens its bytes split into
    ("fast vocabulary transfer", Gee et al. 2022). Why: the model has learned what those pieces
    mean in sequence; a vector at their average sits in the region of embedding space the layers
    already read, so the new token starts as "roughly these pieces" instead of as noise that
    would derail every context containing it. Because the output layer is tied to the same
    matrix, the new token's score is also the average of its pieces' scores: it starts as likely
    as its pieces typically are, neither dominating nor never predicted.
    """
    n_old, n_new = enc_old.n_vocab, enc_new.n_vocab
    if model.config.vocab_size != n_old:
        raise VocabError(f"the model has {model.config.vocab_size} token ids, its tokenizer {n_old}; they must match")
    state = {k.removeprefix("_orig_mod."): v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    old_wte = state["wte.weight"]  # (n_old, C)
    wte = torch.empty(n_new, old_wte.size(1))  # (n_new, C)
    wte[:n_old] = old_wte
    for i in range(n_old, n_new):
        pieces = old_pieces(enc_old, enc_new.decode_single_token_bytes(i))
        wte[i] = old_wte[pieces].mean(dim=0)  # (len(pieces), C) → (C,)
    state["wte.weight"] = state["lm_head.weight"] = wte

    config = dataclasses.replace(model.config, vocab_size=n_new)
    grown = empty_model(config, "cpu")
    grown.load_state_dict(state)
    grown.train(model.training)
    return grown


# ----- measuring --------------------------------------------------------------------------


def tokens_per_char(enc, text: str) -> float:
    """Tokens `enc` spends per character of `text` (GPT-2: ~0.25 on English, ~2.1 on Chinese)."""
    return len(enc.encode_ordinary(text)) / max(len(text), 1)


def text_score(model: GPT, enc, text: str, max_chars: int = 2000, device: str | torch.device = "cpu") -> Score:
    """How `model` scores the first `max_chars` characters of `text` (`minigpt2.model.evaluate`'s protocol,
    in windows of the model's context).

    Bits per character do not depend on the tokenizer, so models with different vocabularies
    compare, provided they read the same characters: hence a cap in characters, not tokens
    (4,096 GPT-2 tokens are ~2,000 Chinese characters, 4,096 extended ones twice as many).
    """
    stream, _ = text_stream(enc, text[:max_chars])
    was_training = model.training
    model.eval()
    try:
        return score_text(model, stream, char_counts(enc), device=device)
    finally:
        model.train(was_training)


def extend_vocabulary(
    model: GPT,
    enc,
    files: list[FileInfo],
    n_merges: int,
    *,
    tokenizer_dir: str | os.PathLike,
    base_tokenizer_dir: str | os.PathLike,
    vocab_from_files: list[FileInfo] | None = None,
    eval_texts: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    bpc_chars: int = 2000,
    progress: Progress | None = None,
) -> tuple[GPT, object, Path, dict]:
    """Learn `n_merges` merges, write the extended tokenizer into `tokenizer_dir`, grow the model.

    Args:
        model, enc: the starting model and its tokenizer (whose files are in `base_tokenizer_dir`).
        files: the training files (data.check_inputs' result); the merges are learned from them
            unless `vocab_from_files` names other text.
        tokenizer_dir: where vocab.json + merges.txt of the new tokenizer go (the run's own
            folder: checkpoints copy them from there, and a resumed run loads them back from a
            checkpoint instead of learning again).
        eval_texts: name -> held-out text; tokens per character before/after are reported for
            each, and bits per character of the model before and after growing (at step 0) on
            the first `bpc_chars` characters of each.
        progress: hears how far each long phase is (reading, splitting, learning, measuring;
            see bpe.py), for a front end to show.

    Returns:
        (grown model, new tokenizer, tokenizer_dir, report) where report holds the merges
        learned, the learning time, whether the merges came from the cache, and the figures.
    """
    progress = progress or no_progress
    start = time.perf_counter()
    merges, cached = learn_merges_cached(vocab_from_files or files, enc, n_merges, cache_dir, progress)
    learn_seconds = time.perf_counter() - start
    if not merges:
        raise VocabError("the text holds no pair of tokens that occurs twice; there is nothing to learn from it")
    base = Path(base_tokenizer_dir)
    tokenizer_dir = write_tokenizer_files(tokenizer_dir, base / "vocab.json", base / "merges.txt", merges)
    new_enc = encoding_from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    grown = grow_model(model, enc, new_enc)

    texts = {f"train:{f.path.name}": head_text(f, 1 << 20) for f in files}
    texts.update(eval_texts or {})
    report = {"merges_requested": n_merges, "merges_learned": len(merges), "vocab_size": new_enc.n_vocab,
              "learn_seconds": learn_seconds, "cached": cached, "texts": {}}  # fmt: skip
    for i, (name, text) in enumerate(texts.items()):
        progress(MEASURING, i, len(texts))
        entry = {
            "tokens_per_char_before": tokens_per_char(enc, text),
            "tokens_per_char_after": tokens_per_char(new_enc, text),
        }
        if eval_texts and name in eval_texts:
            for when, scored in (("before", text_score(model, enc, text, bpc_chars)),
                                 ("after", text_score(grown, new_enc, text, bpc_chars))):  # fmt: skip
                entry[f"bits_per_char_{when}"] = scored.bits_per_char
                entry[f"protocol_{when}"] = scored.protocol()
        report["texts"][name] = entry
    progress(MEASURING, len(texts), len(texts))
    return grown, new_enc, tokenizer_dir, report


__all__ = [
    "ENDOFTEXT",
    "VocabError",
    "extend_vocabulary",
    "grow_model",
    "learn_merges",
    "learn_merges_cached",
    "merges_cache_path",
    "old_pieces",
    "text_score",
    "tokens_per_char",
    "write_tokenizer_files",
]
