"""From text files to batches of token windows: find, check, tokenize once, cache, sample.

The motivating fine-tune tokenized a random 1/1000 of its lines one by one, so the model only
ever saw incoherent fragments. Here the whole corpus is tokenized once, as running text, into one
flat stream of uint16 token ids on disk:

    file 1 ─┐                                          ┌─ train.bin  EOT doc1-head EOT doc2-head ...
    file 2 ─┼─ check ─ clean ─ tokenize (all cores) ───┤
    ...    ─┘  (UTF-8, not binary, not empty)          └─ val.bin    EOT doc1-tail EOT doc2-tail ...

Each file is one document; `<|endoftext|>` (EOT) marks where a document starts, as in GPT-2's own
training data, so the model learns that text after EOT has nothing to do with the text before.
The held-out split is the *tail* of every document (a contiguous block, never scattered lines):
text the model has not seen, but from the same books, so the validation loss measures how well it
learned this kind of text rather than how well it memorised lines around the ones it trained on.

Training batches are windows of `seq_len + 1` consecutive tokens (inputs and next-token targets
shifted by one) cut from the stream at seeded random offsets: every sequence is coherent text.

Memory stays flat in corpus size: files are read, cleaned and tokenized in chunks of lines, and
tokens are appended to the output file as they are produced; training reads the file through a
memory map, so only the windows in use are ever in RAM.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, MiniGPT2Error  # noqa: F401  (DataError: re-exported, it used to live here)

CACHE_ENV = "MINIGPT2_CACHE"
FORMAT_VERSION = 2  # bump when the token file layout, the cleaning rules or meta.json change
READ_BLOCK = 1 << 20  # bytes per read when hashing and checking files
CHUNK_CHARS = 1 << 18  # characters per tokenizer call (a few MB of RAM per thread at most)


# ----- finding and checking the input files -----------------------------------------------------


def find_text_files(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand `--data` arguments into a list of files, in a stable order, without duplicates.

    A file is taken as it is (whatever its extension: the user named it); a directory means every
    `.txt` file below it, sorted; anything else is tried as a glob pattern.
    """
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(
                    f"directory '{path}' holds no .txt files; point `data` at text files or a folder of them"
                )
        elif path.exists():  # /dev/null, a FIFO, a socket: exists, but holds no text to read twice
            raise DataError(
                f"'{spec}' is not a regular file (a device, pipe or socket); give text files, "
                "directories or glob patterns"
            )
        elif glob.has_magic(str(spec)):
            found = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(str(spec)), recursive=True) if Path(p).is_file()
            )
            if not found:
                raise DataError(f"the pattern '{spec}' matches no files")
        else:
            raise DataError(f"'{spec}' does not exist; give text files, directories or glob patterns")
        files.extend(found)
    if not files:
        raise DataError("no input text given")
    return list(dict.fromkeys(p.resolve() for p in files))


@dataclass
class FileInfo:
    """What one pass over a file's bytes learned: its content hash, size and character count."""

    path: Path
    sha256: str
    bytes: int
    chars: int  # after turning CRLF / CR line ends into LF, before --drop-lines


def check_text_file(path: Path, encoding_errors: str = "strict") -> FileInfo:
    """Hash a file and make sure it is usable text, reading it in blocks (flat memory).

    A NUL byte means a binary file (no text format uses it); bytes that are not UTF-8 are an error
    naming the byte offset, so the user can look at exactly that spot, unless `encoding_errors`
    is `replace` (each bad byte becomes U+FFFD). An empty file is an error too: it almost always
    means a wrong path or a failed export.
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    size = chars = crlf = 0
    last_was_cr = False
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                nul = block.find(b"\x00")
                if nul >= 0:
                    raise DataError(
                        f"'{path}' looks like a binary file (a NUL byte at offset {size + nul}), not text; "
                        "give plain UTF-8 text files (UTF-16 text must be converted to UTF-8 first)"
                    )
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as e:
                    offset = size - pending + e.start
                    raise DataError(
                        f"'{path}' is not valid UTF-8: byte 0x{block[max(e.start - pending, 0)]:02x} "
                        f"at offset {offset} "
                        f"({e.reason}). Convert the file to UTF-8, or pass `encoding_errors='replace'` to "
                        "replace undecodable bytes with U+FFFD"
                    ) from None
                digest.update(block)
                size += len(block)
                chars += len(text)
                crlf += text.count("\r\n") + (last_was_cr and text.startswith("\n"))
                last_was_cr = text.endswith("\r")
            try:
                chars += len(decoder.decode(b"", final=True))
            except UnicodeDecodeError:
                raise DataError(
                    f"'{path}' is not valid UTF-8: it ends in the middle of a character (offset {size}). "
                    "Convert the file to UTF-8, or pass `encoding_errors='replace'`"
                ) from None
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    if size == 0:
        raise DataError(f"'{path}' is empty; remove it from `data` or give the right file")
    return FileInfo(path=path, sha256=digest.hexdigest(), bytes=size, chars=chars - crlf)


# ----- cleaning and tokenizing, in chunks ------------------------------------------------------


def read_chunks(
    path: Path,
    *,
    encoding_errors: str = "strict",
    drop_lines: re.Pattern | None = None,
    start_char: int = 0,
    stop_char: int | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[str]:
    """The cleaned text of `path` in pieces of about `chunk_chars` characters.

    Line ends are normalised to "\\n" (as Python's text mode does); lines matching `drop_lines`
    are left out. Only the lines starting within characters [start_char, stop_char) of the
    uncleaned text are kept: that is how a document is split into a head (training) and a tail
    (validation) at a line end.

    Chunks are cut where GPT-2's pre-tokenizer is sure to cut too, so tokenizing the chunks one by
    one gives exactly the tokens of tokenizing the whole text at once (a run of spaces or a word
    split in two would otherwise be tokenized differently). See `_last_safe_cut`.
    """
    lines: list[str] = []
    size = 0
    position = 0  # characters of the uncleaned text read so far
    with open(path, encoding="utf-8", errors=encoding_errors, newline=None) as f:
        for line in f:
            begin, position = position, position + len(line)
            if begin < start_char or (stop_char is not None and begin >= stop_char):
                continue
            if drop_lines is not None and drop_lines.search(line):
                continue
            lines.append(line)
            size += len(line)
            if size >= chunk_chars:
                text = "".join(lines)
                cut = _last_safe_cut(text)
                if cut == 0 and size < 4 * chunk_chars:
                    lines = [text]  # no safe place yet: read on
                    continue
                cut = cut or len(text)  # pathological text: cut at the line end anyway
                yield text[:cut]
                lines, size = [text[cut:]], len(text) - cut
    if size:
        yield "".join(lines)


def _last_safe_cut(text: str) -> int:
    """The last index i (or 0) where a letter is followed by punctuation: text[i-1] in \\p{L},
    text[i] neither whitespace, letter, number nor an apostrophe.

    There every alternative of GPT-2's pattern (contractions, ` ?letters`, ` ?numbers`,
    ` ?other`, whitespace) must end a piece — a letter run stops at the first non-letter and no
    piece spans a letter and punctuation — and the next piece starts afresh, so the chunks
    either side tokenize exactly as the joined text. Such places come every few characters in
    prose ("了！", "word.").
    """
    for i in range(len(text) - 1, 0, -1):
        c = text[i]
        if not c.isspace() and not c.isalnum() and c != "'" and text[i - 1].isalpha():
            return i
    return 0


def _split_point(info: FileInfo, tail_fraction: float) -> int | None:
    """Where (in characters) a document's held-out tail starts, or None for no tail."""
    if tail_fraction <= 0:
        return None
    return max(1, math.floor(info.chars * (1 - tail_fraction)))


class _TokenWriter:
    """Appends token ids to a uint16 file, counting tokens and the characters they encode."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.tokens = 0
        self.chars = 0
        self.crc32 = 0  # of the bytes written: checked each time the cache is used
        self.has_text = False  # anything but whitespace: blank lines alone are nothing to learn from

    def write(self, ids: list[int] | np.ndarray, chars: int = 0) -> None:
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(self.file)
        self.crc32 = zlib.crc32(arr.tobytes(), self.crc32)
        self.tokens += len(arr)
        self.chars += chars

    def close(self) -> None:
        self.file.close()


def tokenize_documents(
    files: list[FileInfo],
    enc,
    head: _TokenWriter,
    tail: _TokenWriter | None,
    *,
    tail_fraction: float = 0.0,
    drop_lines: re.Pattern | None = None,
    encoding_errors: str = "strict",
    threads: int | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> None:
    """Tokenize every file into `head` (and the tail of each into `tail`), EOT before each part.

    Chunks are handed to tiktoken's batch encoder a few at a time, so every core works and at most
    `threads * 2` chunks of text are held at once.
    """
    threads = threads or os.cpu_count() or 1
    eot = enc.eot_token
    for info in files:
        split = _split_point(info, tail_fraction) if tail is not None else None
        parts = [(head, 0, split)] + ([(tail, split, None)] if split is not None else [])
        for writer, start, stop in parts:
            writer.write([eot])
            batch: list[str] = []
            for chunk in read_chunks(
                info.path,
                encoding_errors=encoding_errors,
                drop_lines=drop_lines,
                start_char=start,
                stop_char=stop,
                chunk_chars=chunk_chars,
            ):
                batch.append(chunk)
                if len(batch) >= 2 * threads:
                    _encode_into(enc, batch, writer, threads)
                    batch = []
            _encode_into(enc, batch, writer, threads)


def _encode_into(enc, batch: list[str], writer: _TokenWriter, threads: int) -> None:
    if not batch:
        return
    for text, ids in zip(batch, enc.encode_ordinary_batch(batch, num_threads=threads)):
        writer.write(ids, chars=len(text))
        writer.has_text = writer.has_text or not text.isspace()


# ----- the cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$MINIGPT2_CACHE, else $XDG_CACHE_HOME/minigpt2/tokens, else ~/.cache/minigpt2/tokens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minigpt2" / "tokens"


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


@dataclass
class TokenFile:
    """A tokenized text on disk: uint16 ids, memory-mapped, and the characters they encode."""

    path: Path
    chars: int
    name: str = ""
    tokens: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tokens = (
            np.memmap(self.path, dtype=np.uint16, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint16)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_char(self) -> float:
        """GPT-2 spends ~0.25 tokens on an English character, ~2.1 on a Chinese one."""
        return len(self) / max(self.chars, 1)


@dataclass
class Corpus:
    """The result of `prepare_corpus`: the token files and what went into them."""

    train: TokenFile
    val: TokenFile | None
    files: list[FileInfo]
    key: str
    cached: bool  # True when the token files came from the cache, without tokenizing
    rebuilt_because: str | None = None  # why a damaged cache entry was tokenized again

    @property
    def chars(self) -> int:
        return self.train.chars + (self.val.chars if self.val is not None else 0)

    @property
    def tokens(self) -> int:
        return len(self.train) + (len(self.val) if self.val is not None else 0)

    def summary(self) -> dict:
        return {
            "files": [str(f.path) for f in self.files],
            "key": self.key,
            "chars": self.chars,
            "tokens": self.tokens,
            "tokens_per_char": self.tokens / max(self.chars, 1),
            "train_tokens": len(self.train),
            "val_tokens": len(self.val) if self.val is not None else 0,
            "cached": self.cached,
            "rebuilt_because": self.rebuilt_because,
        }


def check_inputs(specs: Iterable[str | os.PathLike], encoding_errors: str = "strict") -> list[FileInfo]:
    """Find every input file and check it (exists, not empty, not binary, UTF-8): the cheap pass
    that makes a bad input fail at once, before a tokenizer or a model is loaded."""
    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"`encoding_errors` must be 'strict' or 'replace', not {encoding_errors!r}")
    return [check_text_file(p, encoding_errors) for p in find_text_files(specs)]


def compile_drop_lines(drop_lines: str | None) -> re.Pattern | None:
    if not drop_lines:
        return None
    try:
        return re.compile(drop_lines)
    except re.error as e:
        raise DataError(f"`drop_lines` {drop_lines!r} is not a valid regular expression: {e}") from None


def prepare_corpus(
    inputs: Iterable[str | os.PathLike] | list[FileInfo],
    enc,
    *,
    val_fraction: float = 0.0,
    drop_lines: str | None = None,
    encoding_errors: str = "strict",
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> Corpus:
    """Tokenize the inputs (paths, directories, globs, or `check_inputs`' result), or reuse the
    cached result.

    The cache entry is keyed by the files' contents (not their names or dates), the tokenizer,
    the cleaning options and the validation share, so any change re-tokenizes and an unchanged
    corpus starts at once.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"`val_fraction` must be in [0, 1), got {val_fraction}")
    pattern = compile_drop_lines(drop_lines)
    inputs = list(inputs)
    if inputs and all(isinstance(x, FileInfo) for x in inputs):
        files = inputs
    else:
        files = check_inputs(inputs, encoding_errors)

    key_material = {
        "format": FORMAT_VERSION,
        "files": [f.sha256 for f in files],
        "tokenizer": tokenizer_fingerprint(enc),
        "drop_lines": drop_lines or None,
        "encoding_errors": encoding_errors,
        "val_fraction": val_fraction,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / key
    cached = (entry / "meta.json").is_file()
    damaged = verify_entry(entry, enc.n_vocab) if cached else None
    if damaged is not None:  # never train on a damaged cache: move it out of the way, tokenize again
        _discard_entry(entry)
        cached = False
    if not cached:
        _build_entry(
            entry,
            files,
            enc,
            val_fraction=val_fraction,
            drop_lines=pattern,
            encoding_errors=encoding_errors,
            threads=threads,
        )
    meta = json.loads((entry / "meta.json").read_text())
    train = TokenFile(entry / "train.bin", meta["train_chars"], name="train")
    val = TokenFile(entry / "val.bin", meta["val_chars"], name="val") if val_fraction > 0 else None
    if not meta.get("train_has_text", True):  # (entries cached before this flag existed: checked below)
        raise DataError(
            f"the input holds no text after cleaning: nothing is left after dropping the lines that match "
            f"{drop_lines!r}, only blank lines (a pattern such as '.' matches every line that holds text); "
            "give a narrower pattern"
            if drop_lines
            else "the input holds no text after cleaning: only blank lines and spaces, nothing to train on"
        )
    if train.chars == 0 or len(train) <= len(files):
        raise DataError(
            "the input holds no text after cleaning"
            + (f" (`drop_lines` {drop_lines!r} removed every line)" if drop_lines else "")
        )
    return Corpus(train=train, val=val, files=files, key=key, cached=cached, rebuilt_because=damaged)


def verify_entry(entry: Path, vocab_size: int) -> str | None:
    """Why a cache entry cannot be trusted, or None if it can.

    The files are checked against what was recorded when they were written: their sizes, a CRC-32
    of their bytes (a full read, ~0.1 s per 100 MB), and every id below the vocabulary size. A
    truncated or overwritten token file would otherwise be trained on silently.
    """
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for part in ("train", "val"):
            path = entry / f"{part}.bin"
            size = path.stat().st_size
            if size != 2 * meta[f"{part}_tokens"]:
                return f"{path.name} holds {size // 2:,} tokens, {meta[f'{part}_tokens']:,} were written"
            crc, biggest = 0, 0
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    crc = zlib.crc32(block, crc)
                    biggest = max(biggest, int(np.frombuffer(block, dtype=np.uint16).max(initial=0)))
            if crc != meta[f"{part}_crc32"]:
                return f"{path.name} does not match its checksum"
            if size and biggest >= vocab_size:
                return f"{path.name} holds token id {biggest}, beyond the vocabulary of {vocab_size}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its files cannot be read ({e})"
    return None


def _discard_entry(entry: Path) -> None:
    aside = entry.with_name(f".{entry.name}.damaged-{os.getpid()}")
    os.rename(entry, aside)  # atomic: no other process can pick up a half-deleted entry
    shutil.rmtree(aside, ignore_errors=True)


def _build_entry(
    entry: Path, files: list[FileInfo], enc, *, val_fraction, drop_lines, encoding_errors, threads
) -> None:
    """Tokenize into a temporary folder beside the entry, then rename it into place (atomic)."""
    if enc.n_vocab > 65536:
        raise DataError(f"the tokenizer has {enc.n_vocab} ids, too many for uint16 token files")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        head = _TokenWriter(tmp / "train.bin")
        tail = _TokenWriter(tmp / "val.bin")
        try:
            tokenize_documents(
                files,
                enc,
                head,
                tail if val_fraction > 0 else None,
                tail_fraction=val_fraction,
                drop_lines=drop_lines,
                encoding_errors=encoding_errors,
                threads=threads,
            )
        finally:
            head.close()
            tail.close()
        meta = {
            "train_tokens": head.tokens,
            "train_chars": head.chars,
            "train_crc32": head.crc32,
            "train_has_text": head.has_text,
            "val_tokens": tail.tokens,
            "val_chars": tail.chars,
            "val_crc32": tail.crc32,
            "vocab_size": enc.n_vocab,
            "files": [str(f.path) for f in files],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- windows and batches ----------------------------------------------------------------------


class WindowSampler:
    """Which windows of a token stream make up training batch number `i` — a pure function of i.

    Each epoch cuts the stream into non-overlapping windows of `seq_len + 1` tokens (neighbours
    share one token: the last target of one is the first input of the next), starting at a random
    shift, and visits them in a random order. So every token is trained on once per epoch, no
    sequence straddles a random seam, and epochs differ. Both the shift and the order come from
    a generator seeded with (seed, epoch): no state to save, and a resumed run that asks for
    batch i gets exactly the batch an uninterrupted run would have.

    For data parallelism (several ranks), rank r of R reads its micro-batch i as batch i * R + r,
    i.e. windows (i * R + r) * B ... of the same order: the ranks read disjoint windows of one
    shared permutation, and a step covers the same windows whatever R is (see distributed.py).
    """

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if n_tokens < seq_len + 1:
            raise DataError(
                f"the training text has {n_tokens} tokens, fewer than one window of `seq_len` {seq_len} + 1; "
                "give more text or a shorter `seq_len`"
            )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.windows_per_epoch = (n_tokens - 1) // seq_len
        self.slack = (n_tokens - 1) - self.windows_per_epoch * seq_len  # room for the random shift
        self._epoch: int | None = None
        self._order = np.zeros(0, np.int64)
        self._shift = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._shift = int(rng.integers(0, self.slack + 1))
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch

    def offsets(self, batch_index: int) -> np.ndarray:
        """Start offsets (batch_size,) of the windows of batch `batch_index`."""
        starts = []
        for g in range(batch_index * self.batch_size, (batch_index + 1) * self.batch_size):
            epoch, k = divmod(g, self.windows_per_epoch)
            self._load_epoch(epoch)
            starts.append(self._shift + int(self._order[k]) * self.seq_len)
        return np.array(starts, dtype=np.int64)


def gather_windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """(len(offsets), seq_len + 1) int64 array of the windows starting at `offsets`."""
    return np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets])
