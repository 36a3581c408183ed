"""GPT-2's byte-level BPE tokenizer, as a fast `tiktoken.Encoding` built from the model's own files.

GPT-2 tokenizes bytes, not characters: text is UTF-8 encoded, split by a regular expression
into word-like pieces, and each piece's bytes are merged pairwise following the 50,000 learned
merges in `merges.txt`. A Chinese character is three UTF-8 bytes, and since GPT-2 saw little
Chinese, most characters end up as two or three tokens that each hold a *fragment* of a character.
Decoding a single such token gives invalid UTF-8, which is where U+FFFD in naive samples comes from.

Hugging Face repos store the tokenizer as `vocab.json` (token string → id) and `merges.txt`.
The strings use GPT-2's printable stand-ins for bytes (byte 0x20, a space, is written `Ġ`), so we
map them back to raw bytes before handing them to tiktoken, which does the actual encoding in Rust.

Which files a model's tokenizer is read from (`locate_tokenizer`), so that a model is never
silently given another model's tokenizer:

- the official names (`gpt2`, `gpt2-medium`, ...) share one tokenizer, GPT-2's, which ships
  inside this package (minigpt2/assets/gpt2/, byte-identical to OpenAI's files, checked by sha256
  when read): no network and no cache needed;
- a local checkpoint (or training run) uses the vocab.json + merges.txt beside it, and a hub repo
  its own; files that are there but unreadable, incomplete or inconsistent (with each other or
  with the model's vocabulary size) are an error naming the file, never a reason to fall back;
- a checkpoint with no tokenizer files at all gets GPT-2's, with a `TokenizerNotice` saying so,
  but only if the model has GPT-2's vocabulary: a grown model (`--extend-vocab`) without its own
  tokenizer is an error, since GPT-2's would give its new tokens' text wrong ids;
- a folder the user names (`--tokenizer DIR`) must exist and hold both files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import tiktoken

from minigpt2.errors import CheckpointError, Notice
from minigpt2.io.adapter import adapter_base, is_adapter_folder, merged_checkpoint
from minigpt2.io.hub import OFFICIAL_REPOS, MissingHubFile, hub_file, local_path
from minigpt2.io.runs import RunFolder

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
GPT2_VOCAB_SIZE = 50257  # 256 bytes + 50,000 merges + <|endoftext|>

# GPT-2's own tokenizer files, shipped as package data (OpenAI's GPT-2 release, modified MIT
# license: see assets/gpt2/LICENSE). Their sha256 is checked before first use, so a damaged install
# fails with a clear error instead of tokenizing differently from every GPT-2.
GPT2_DIR = Path(__file__).resolve().parents[1] / "assets" / "gpt2"
GPT2_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class TokenizerNotice(Notice):
    """GPT-2's own tokenizer was used for a model folder that has no tokenizer files."""


# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, whitespace. Each piece
# keeps a leading space, so " world" and "world" are different tokens.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_stand_ins() -> dict[str, int]:
    """GPT-2's map from the printable character standing in for a byte to the byte itself.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are
    shifted to U+0100 and up, in byte order, so that every token string is printable.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def encoding_from_files(
    vocab_path: str | os.PathLike,
    merges_path: str | os.PathLike,
    name: str = "gpt2",
    *,
    vocab_size: int | None = None,
) -> tiktoken.Encoding:
    """A tiktoken Encoding from a GPT-2 style `vocab.json` + `merges.txt`.

    tiktoken merges the pair whose result has the lowest id first, so the ids in vocab.json must
    follow merge order: the 256 single bytes, then each merge's result in the order of
    merges.txt (skipping `<|endoftext|>`'s id: an extended vocabulary's merges continue after
    50,256, see vocab.py). That holds for GPT-2 and is checked here, together with one merge per
    token beyond the bytes, so a mismatched, cut or damaged pair of files fails loudly (naming the
    file) instead of tokenizing differently from the model's training. With `vocab_size` (the
    model's), an id the model has no row for is refused too.
    """
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    to_byte = byte_stand_ins()
    # str.translate puts each stand-in's byte in its place (as the Latin-1 character of that value) and
    # U+FFFF, which Latin-1 cannot encode, in place of any other character below 256; characters above
    # 255 stay and cannot be encoded either. 100,000 strings in milliseconds, where a loop took 0.3 s.
    table = {c: "\uffff" for c in range(256)} | {ord(ch): chr(b) for ch, b in to_byte.items()}

    def to_bytes(token: str, where: Path) -> bytes:
        try:
            return token.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            bad = next(ch for ch in token if ch not in to_byte)
            raise CheckpointError(f"'{where}': token {token!r} uses {bad!r}, not a GPT-2 byte stand-in") from None

    vocab = _read_vocab(vocab_path)
    try:
        merge_lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read '{merges_path}' ({e}); it should be a GPT-2 merges.txt") from None

    special = {token: vocab.pop(token) for token in (ENDOFTEXT,) if token in vocab}
    ranks = {to_bytes(token, vocab_path): rank for token, rank in vocab.items()}
    if len(ranks) != len(vocab) or sorted(ranks.values())[:256] != list(range(256)):
        raise CheckpointError(
            f"'{vocab_path}' is not a GPT-2 vocab.json: its first 256 ids must be the 256 single bytes, "
            "and every token must appear once"
        )
    # Check: the single bytes first, then merges in file order (skipping the "#version" header, and
    # <|endoftext|>'s id: an extended vocabulary's merges resume after it).
    lines = [line for line in merge_lines if line and not line.startswith("#version")]
    n_merges, eot = len(lines), special.get(ENDOFTEXT)
    expected = [rank for rank in range(256, 256 + n_merges + 1) if rank != eot][:n_merges]
    pairs = [line.split(" ") for line in lines]
    found = [ranks.get(to_bytes(p[0] + p[1], merges_path)) if len(p) == 2 else None for p in pairs]
    if found != expected:
        i = next(i for i, (f, e) in enumerate(zip(found, expected)) if f != e)
        raise CheckpointError(
            f"'{merges_path}' does not match '{vocab_path}' at merge {expected[i] - 256} ({lines[i]!r}); "
            "use the vocab.json and merges.txt that belong together."
        )
    if n_merges != len(ranks) - 256:
        raise CheckpointError(
            f"'{merges_path}' has {n_merges} merges but '{vocab_path}' has {len(ranks) - 256} tokens beyond the "
            "256 bytes: one of the two is cut or damaged; use the vocab.json and merges.txt that belong together."
        )
    if ENDOFTEXT not in special:
        special[ENDOFTEXT] = len(ranks)
    _check_fits(max(max(ranks.values()), *special.values()), vocab_size, vocab_path)
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _check_fits(largest: int, vocab_size: int | None, vocab_path: Path) -> None:
    """A tokenizer whose largest id is `largest` must fit a model of `vocab_size` tokens (None: unknown)."""
    if vocab_size is not None and largest >= vocab_size:
        raise CheckpointError(
            f"'{vocab_path}' holds id {largest}, past the model's vocabulary of {vocab_size} tokens: "
            "the tokenizer does not belong to the model; use the vocab.json and merges.txt saved with it."
        )


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.json as {token: id}, or a `CheckpointError` naming the file and what is wrong with it."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{path}' ({e}); it should be a GPT-2 vocab.json") from None
    if not isinstance(vocab, dict) or not all(type(i) is int and i >= 0 for i in vocab.values()):
        raise CheckpointError(f"'{path}' is not a GPT-2 vocab.json: it must map each token to an id (an integer >= 0)")
    if len(set(vocab.values())) != len(vocab):
        raise CheckpointError(f"'{path}' gives two tokens the same id; it is damaged: use the one saved with the model")
    return vocab


@functools.cache
def gpt2_files() -> tuple[Path, Path]:
    """The shipped GPT-2 vocab.json and merges.txt, their sha256 checked (once per process)."""
    for name, digest in GPT2_SHA256.items():
        path = GPT2_DIR / name
        try:
            found = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            found = f"unreadable ({e.strerror or e})"
        if found != digest:
            raise CheckpointError(
                f"GPT-2's tokenizer file '{path}', shipped with minigpt2, is damaged (sha256 {found}, expected "
                f"{digest}); reinstall minigpt2."
            )
    return GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt"


def locate_tokenizer(
    source: str | os.PathLike, *, revision: str | None = None, vocab_size: int | None = None, explicit: bool = False
) -> tuple[tuple[Path, Path], str | None]:
    """(vocab.json, merges.txt) that belong to `source` (see the module docstring), and the note to
    give if they are GPT-2's standing in for a source that has none (None when they are its own).

    `vocab_size` is the model's, where known: a model larger than GPT-2's vocabulary must have its
    own files. `explicit` says the user named `source` as a tokenizer (`--tokenizer DIR`): then it
    must hold both files.
    """
    if str(source) in OFFICIAL_REPOS:
        return gpt2_files(), None
    path = local_path(source)
    if path is None:  # a hub repo: its own files, if it has them
        try:
            return tuple(hub_file(str(source), name, revision=revision) for name in TOKENIZER_FILES), None
        except MissingHubFile:
            if explicit:
                raise
            return _gpt2_standing_in(f"model '{source}'", vocab_size)
    if not path.exists():
        what = "tokenizer folder" if explicit else "model"
        raise CheckpointError(f"{what} '{source}' not found: there is no such file or folder")
    if RunFolder.is_run(path):  # a training run: the tokenizer of the checkpoint it stands for
        path = RunFolder(path).model_checkpoint()
    if is_adapter_folder(path):  # a LoRA adapter: its checkpoint's tokenizer, else its base's
        beside = merged_checkpoint(path)
        if beside is None:
            return locate_tokenizer(adapter_base(path)[0], revision=revision, vocab_size=vocab_size)
        path = beside
    folder = path if path.is_dir() else path.parent
    files = tuple(folder / name for name in TOKENIZER_FILES)
    present = [f for f in files if f.exists()]
    if present or explicit:
        for f in files:
            if not f.is_file():
                state = "is not a file" if f.exists() else "is missing"
                raise CheckpointError(
                    f"'{f}' {state}: a tokenizer needs both vocab.json and merges.txt; copy the pair that belongs "
                    "to the model" + ("" if explicit else ", or remove both to use GPT-2's own")
                )
        return files, None
    return _gpt2_standing_in(f"'{folder}'", vocab_size)


def _gpt2_standing_in(where: str, vocab_size: int | None) -> tuple[tuple[Path, Path], str]:
    """GPT-2's files for a model without tokenizer files, refused for a grown vocabulary."""
    if vocab_size is not None and vocab_size > GPT2_VOCAB_SIZE:
        raise CheckpointError(
            f"{where} has no vocab.json and merges.txt, and its model has {vocab_size} tokens, more than GPT-2's "
            f"{GPT2_VOCAB_SIZE}: it was grown (extend_vocab) and only its own tokenizer can read it. Copy the "
            "vocab.json and merges.txt of the run that grew it beside the weights (if the extra ids are only "
            f"padding, copy GPT-2's from '{GPT2_DIR}')."
        )
    return gpt2_files(), f"{where} has no vocab.json and merges.txt: using GPT-2's own tokenizer"


def load_tokenizer(
    source: str | os.PathLike = "gpt2",
    *,
    revision: str | None = None,
    vocab_size: int | None = None,
    explicit: bool = False,
    loaded: dict | None = None,
) -> tiktoken.Encoding:
    """The tokenizer of a model source (a name, hub repo id, checkpoint directory or file).

    Read from the files `locate_tokenizer` finds (GPT-2's own, shipped with minigpt2, for the
    official names and for a checkpoint without tokenizer files), never a silent fallback: files
    that cannot be read or do not match each other, or `vocab_size` (the model's, where the
    caller knows it), raise a `CheckpointError` naming the file. GPT-2's files standing in for a
    checkpoint without any are reported as a `TokenizerNotice` warning. `<|endoftext|>` is id
    50256 for GPT-2.

    `loaded`: a dict the caller keeps for several sources (compare.py's models): a source whose
    files hold the same bytes as files read before gets the same Encoding, without reading and
    checking 50,000 merges again (a third of a second each time).
    """
    files, note = locate_tokenizer(source, revision=revision, vocab_size=vocab_size, explicit=explicit)
    key = tuple(Path(f).read_bytes() for f in files) if loaded is not None else None
    if key is not None and key in loaded:
        enc = loaded[key]
        _check_fits(enc.max_token_value, vocab_size, Path(files[0]))
    else:
        enc = encoding_from_files(*files, vocab_size=vocab_size)
        if key is not None:
            loaded[key] = enc
    if note:
        warnings.warn(note, TokenizerNotice, stacklevel=2)
    return enc


def tokenizer_fingerprint(enc) -> str:
    """A hash of what the tokenizer does: every token's bytes in id order, and the special tokens."""
    digest = hashlib.sha256()
    for i in range(enc.n_vocab):
        try:
            digest.update(enc.decode_single_token_bytes(i) + b"\x00")
        except KeyError:  # ids between the merges and the special tokens, if any
            digest.update(b"\x01")
    digest.update(json.dumps(sorted(enc.special_tokens_set)).encode())
    return digest.hexdigest()
