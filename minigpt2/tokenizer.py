"""GPT-2's byte-level BPE tokenizer, as a fast `tiktoken.Encoding` built from the model's own files.

GPT-2 tokenizes bytes, not characters: text is UTF-8 encoded, split by a regular expression
into word-like pieces, and each piece's bytes are merged pairwise following the 50,000 learned
merges in `merges.txt`. A Chinese character is three UTF-8 bytes, and since GPT-2 saw little
Chinese, most characters end up as two or three tokens that each hold a *fragment* of a character.
Decoding a single such token gives invalid UTF-8, which is where U+FFFD in naive samples comes from.

Hugging Face repos store the tokenizer as `vocab.json` (token string → id) and `merges.txt`.
The strings use GPT-2's printable stand-ins for bytes (byte 0x20, a space, is written `Ġ`), so we
map them back to raw bytes before handing them to tiktoken, which does the actual encoding in Rust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tiktoken

from .errors import CheckpointError
from .hub import OFFICIAL_REPOS, hub_file, local_path
from .rundir import RunDir

ENDOFTEXT = "<|endoftext|>"

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
    vocab_path: str | os.PathLike, merges_path: str | os.PathLike, name: str = "gpt2"
) -> tiktoken.Encoding:
    """A tiktoken Encoding from a GPT-2 style `vocab.json` + `merges.txt`.

    tiktoken merges the pair whose result has the lowest id first, so the ids in vocab.json must
    follow merge order: the 256 single bytes, then each merge's result in the order of
    merges.txt (skipping `<|endoftext|>`'s id: an extended vocabulary's merges continue after
    50,256, see vocab.py). That holds for GPT-2 and is checked here, so a mismatched pair of files fails
    loudly instead of tokenizing differently from the model's training.
    """
    to_byte = byte_stand_ins()

    def to_bytes(token: str, where: Path) -> bytes:
        try:
            return bytes(to_byte[ch] for ch in token)
        except KeyError as e:
            raise CheckpointError(f"'{where}': token {token!r} uses {e.args[0]!r}, not a GPT-2 byte stand-in") from None

    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        merge_lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"cannot read the tokenizer files ({e}); they should be GPT-2's vocab.json and merges.txt"
        ) from None

    special = {token: vocab.pop(token) for token in (ENDOFTEXT,) if token in vocab}
    ranks = {to_bytes(token, Path(vocab_path)): rank for token, rank in vocab.items()}

    # Check: the single bytes first, then merges in file order (skipping the "#version" header).
    expected_rank = 256
    for line in merge_lines:
        if not line or line.startswith("#version"):
            continue
        if expected_rank == special.get(ENDOFTEXT):  # an extended vocabulary: merges resume after it
            expected_rank += 1
        parts = line.split(" ")
        merged = b"".join(to_bytes(p, Path(merges_path)) for p in parts) if len(parts) == 2 else None
        if merged is None or ranks.get(merged) != expected_rank:
            raise CheckpointError(
                f"'{merges_path}' does not match '{vocab_path}' at merge {expected_rank - 256} ({line!r}); "
                "use the vocab.json and merges.txt that belong together."
            )
        expected_rank += 1
    if ENDOFTEXT not in special:
        special[ENDOFTEXT] = len(ranks)
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def tokenizer_files(source: str | os.PathLike = "gpt2", *, revision: str | None = None) -> tuple[Path, Path]:
    """Paths of a source's vocab.json and merges.txt: beside a local checkpoint, or from the hub."""
    path = local_path(source)
    if path is None:
        return tuple(hub_file(str(source), name, revision=revision) for name in ("vocab.json", "merges.txt"))
    if RunDir.is_run(path):  # a training run: the tokenizer of the checkpoint it stands for
        path = RunDir(path).model_checkpoint()
    folder = path if path.is_dir() else path.parent
    files = folder / "vocab.json", folder / "merges.txt"
    if not all(f.is_file() for f in files):
        raise CheckpointError(f"no vocab.json and merges.txt in '{folder}'")
    return files


def load_tokenizer(source: str | os.PathLike = "gpt2", *, revision: str | None = None) -> tiktoken.Encoding:
    """The tokenizer of a model source (a name, hub repo id, checkpoint directory or file).

    Looked for, in order: the source's own vocab.json + merges.txt (beside a local checkpoint,
    or fetched and cached by huggingface_hub); then, since every GPT-2 shares one tokenizer,
    the official `gpt2` files from the hub cache; then tiktoken's own `gpt2` download, unless
    HF_HUB_OFFLINE says there is no network. `<|endoftext|>` is id 50256.
    """
    import huggingface_hub

    errors = []
    for candidate in dict.fromkeys([str(source), "gpt2"]):
        try:
            return encoding_from_files(
                *tokenizer_files(candidate, revision=revision if candidate == str(source) else None)
            )
        except CheckpointError as e:
            errors.append(str(e))
    if not huggingface_hub.is_offline_mode():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network or cache failures inside tiktoken
            errors.append(f"tiktoken's gpt2 download failed: {e}")
    raise CheckpointError(
        f"no GPT-2 tokenizer found for '{source}': "
        + " / ".join(e.rstrip(".") for e in errors)
        + ". Put vocab.json and merges.txt "
        f"beside the checkpoint, or run once with a network so the '{OFFICIAL_REPOS['gpt2']}' files are cached."
    )
