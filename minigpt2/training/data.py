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
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt2.errors import DataError, MiniGPT2Error, OutputError  # noqa: F401  (DataError: re-exported, it used to live here)
from minigpt2.files import WRITE_ADVICE, binary_file_error, write_error
from minigpt2.io.tokenizer import tokenizer_fingerprint
from minigpt2.training.formats import (
    HF_PREFIX,
    DatasetSource,
    format_of,
    is_text_name,
    iter_rows,
    normalise,
    open_binary,
    open_dataset,
    stream_errors,
    text_lines,
)

CACHE_ENV = "MINIGPT2_CACHE"
FORMAT_VERSION = 3  # bump when the token file layout, the cleaning rules, the split or meta.json change
READ_BLOCK = 1 << 20  # bytes per read when hashing and checking files
VAL_ROWS_SEED = 1234  # which whole documents are held out (fixed: the same data always holds out the same rows)
CHUNK_CHARS = 1 << 18  # characters per tokenizer call (a few MB of RAM per thread at most)


# ----- finding and checking the input files -----------------------------------------------------


def find_text_files(specs: Iterable[str | os.PathLike]) -> list[Path | str]:
    """Expand `--data` arguments into a list of files (and `hf:` datasets), in a stable order,
    without duplicates.

    A file is taken as it is (its name says how it is read: see formats.py); a directory means
    every `.txt` file below it (compressed ones too), sorted; `hf:...` is a dataset; anything else
    is tried as a glob pattern.
    """
    files: list[Path | str] = []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith(HF_PREFIX):
            files.append(spec)
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_text_name(p) and p.is_file())
            rows = sorted({p.suffix for p in path.rglob("*") if format_of(p)[0] != "text" and p.is_file()})
            if found and rows:  # never skipped without a word: the user may think they are read
                raise DataError(
                    f"directory '{path}' holds .txt files and also {', '.join(rows)} files, which a folder is not "
                    f"read for; give the .txt files as '{path}/**/*.txt' and the others by name"
                )
            if not found:
                raise DataError(
                    f"directory '{path}' holds no .txt files; point `data` at text files or a folder of them"
                    + (
                        f" (it holds {', '.join(rows)} files: give them by name or as a glob such as "
                        f"'{path}/*{rows[0]}', or load the folder as a dataset with hf:{path})"
                        if rows
                        else ""
                    )
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
        files.extend(p.resolve() for p in found)
    if not files:
        raise DataError("no input text given")
    return list(dict.fromkeys(files))


@dataclass
class FileInfo:
    """One input and what one pass over it learned: its content hash, size, characters, documents.

    A text file is one document; a row file (JSON Lines, JSON, CSV, TSV, Parquet) or a dataset is
    one document per row, its text in `text_field`.
    """

    path: Path  # for a dataset: its `hf:` spec, as a Path (its .name, .stem name it in messages)
    sha256: str  # of the content (a text file's decompressed bytes, a row file's bytes, a dataset's fingerprint)
    bytes: int
    chars: int  # after turning CRLF / CR line ends into LF, before --drop-lines
    format: str = "text"  # "text", "jsonl", "json", "csv", "tsv", "parquet" or "dataset"
    compression: str | None = None
    text_field: str | None = None  # the field each row's text is read from (row formats)
    rows: int = 1  # documents: 1 for a text file
    empty_rows: int = 0  # rows of only whitespace: skipped (nothing to learn from), and counted
    dataset: object = field(default=None, repr=False)  # formats.DatasetSource of an `hf:` input
    validation: FileInfo | None = None  # a dataset's own validation split, when it has one

    def key(self) -> dict | str:
        """What identifies this input's documents in the token cache."""
        if self.format == "text":
            return self.sha256
        return {"sha256": self.sha256, "format": self.format, "field": self.text_field}


def check_text_file(path: Path, encoding_errors: str = "strict", compression: str | None = None) -> FileInfo:
    """Hash a file and make sure it is usable text, reading it in blocks (flat memory).

    A NUL byte means a binary file (no text format uses it); bytes that are not UTF-8 are an error
    naming the byte offset, so the user can look at exactly that spot, unless `encoding_errors`
    is `replace` (each bad byte becomes U+FFFD). A file with no text in it, empty or only blank
    lines, is an error too (one rule for both): it almost always means a wrong path or a failed
    export. A compressed file is checked as the text it holds (offsets count decompressed bytes).
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    size = chars = crlf = 0
    last_was_cr = has_text = False
    unpacked = " (decompressed)" if compression else ""
    with stream_errors(path, compression), open_binary(path, compression) as f:
        while block := f.read(READ_BLOCK):
            nul = block.find(b"\x00")
            if nul >= 0:
                advice = "give plain UTF-8 text files (UTF-16 text must be converted to UTF-8 first)"
                raise binary_file_error(f"'{path}'", f"{size + nul}{unpacked}", advice)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:
                offset = size - pending + e.start
                raise DataError(
                    f"'{path}' is not valid UTF-8: byte 0x{block[max(e.start - pending, 0)]:02x} "
                    f"at offset {offset}{unpacked} "
                    f"({e.reason}). Convert the file to UTF-8, or pass `encoding_errors='replace'` to "
                    "replace undecodable bytes with U+FFFD"
                ) from None
            digest.update(block)
            size += len(block)
            chars += len(text)
            crlf += text.count("\r\n") + (last_was_cr and text.startswith("\n"))
            last_was_cr = text.endswith("\r")
            has_text = has_text or not (text.isspace() or not text)
        try:
            chars += len(decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            raise DataError(
                f"'{path}' is not valid UTF-8: it ends in the middle of a character (offset {size}{unpacked}). "
                "Convert the file to UTF-8, or pass `encoding_errors='replace'`"
            ) from None
    if size == 0:
        raise DataError(f"'{path}' is empty; remove it from the files given or give the right file")
    if not has_text:
        raise DataError(
            f"'{path}' holds no text, only blank lines and spaces; remove it from the files given or give the "
            "right file"
        )
    return FileInfo(path=path, sha256=digest.hexdigest(), bytes=size, chars=chars - crlf, compression=compression)


def check_row_file(
    path: Path, fmt: str, compression: str | None, text_field: str, encoding_errors: str = "strict"
) -> FileInfo:
    """Read every row of a row file once: each must hold text in `text_field` (else an error naming
    the row and the field), and at least one must hold more than whitespace."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                digest.update(block)
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    rows = empty = chars = 0
    for row in iter_rows(path, fmt, compression, text_field, encoding_errors):
        rows += 1
        empty += row.text.isspace() or not row.text
        chars += len(normalise(row.text))
    return _rows_info(path, digest.hexdigest(), path.stat().st_size, chars, fmt, compression, text_field, rows, empty)


def _rows_info(path, sha256, size, chars, fmt, compression, text_field, rows, empty, **extra) -> FileInfo:
    what = "dataset" if fmt == "dataset" else "file"
    if rows == 0:
        raise DataError(f"the {what} '{path}' holds no rows; give the right {what}")
    if empty == rows:
        raise DataError(
            f"the {what} '{path}' holds no text: its {rows:,} rows' '{text_field}' fields are all empty or blank; "
            "choose the field with `text_field`"
        )
    return FileInfo(path=path, sha256=sha256, bytes=size, chars=chars, format=fmt, compression=compression,
                    text_field=text_field, rows=rows, empty_rows=empty, **extra)  # fmt: skip


def check_dataset(spec: str, text_field: str, split: str | None = None) -> FileInfo:
    """Open an `hf:` dataset (from its cache when offline) and check its `text_field` column; the
    dataset's own validation split comes along when it has one and no split was named."""
    source = open_dataset(spec, text_field, split)
    info = _dataset_info(spec, source, text_field)
    if source.validation is not None:
        info.validation = _dataset_info(f"{spec}@{source.validation.split}", source.validation, text_field)
    return info


def _dataset_info(label: str, source: DatasetSource, text_field: str) -> FileInfo:
    rows = empty = chars = 0
    for row in source.rows():
        rows += 1
        empty += row.text.isspace() or not row.text
        chars += len(normalise(row.text))
    return _rows_info(Path(label), source.fingerprint, source.bytes, chars, "dataset", None, text_field, rows, empty,
                      dataset=source)  # fmt: skip


def check_source(spec: Path | str, encoding_errors: str = "strict", text_field: str = "text") -> FileInfo:
    """Check one input found by `find_text_files`, in the way its name says it is read."""
    if isinstance(spec, str):
        return check_dataset(spec, text_field)
    fmt, compression = format_of(spec)
    if fmt == "text":
        return check_text_file(spec, encoding_errors, compression)
    return check_row_file(spec, fmt, compression, text_field, encoding_errors)


# ----- documents, and where the held-out text comes from -----------------------------------------


def documents(info: FileInfo, encoding_errors: str = "strict") -> Iterator[tuple[int, int | None, str | Iterable[str]]]:
    """(index, characters or None, text) of each document of an input, line ends made "\\n": a text
    file's lines as they are read (a novel need not fit in memory), a row's text as one string.
    Rows of only whitespace are left out (they keep their index, so the held-out rows do not
    depend on them)."""
    if info.format == "text":
        yield 0, info.chars, text_lines(info.path, info.compression, encoding_errors)
        return
    rows = (
        info.dataset.rows()
        if info.format == "dataset"
        else iter_rows(info.path, info.format, info.compression, info.text_field, encoding_errors)
    )
    for row in rows:
        if row.text and not row.text.isspace():
            text = normalise(row.text)
            yield row.index, len(text), text


def _lines(text: str | Iterable[str]) -> Iterable[str]:
    return text.splitlines(keepends=True) if isinstance(text, str) else text


def read_chunks(
    path: Path | FileInfo,
    *,
    encoding_errors: str = "strict",
    drop_lines: re.Pattern | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[str]:
    """The cleaned text of `path` (every document of it, one after the other) in pieces of about
    `chunk_chars` characters.

    Line ends are normalised to "\\n" (as Python's text mode does); lines matching `drop_lines`
    are left out.

    Chunks are cut where GPT-2's pre-tokenizer is sure to cut too, so tokenizing the chunks one by
    one gives exactly the tokens of tokenizing the whole text at once (a run of spaces or a word
    split in two would otherwise be tokenized differently). See `_last_safe_cut`.
    """
    info = path if isinstance(path, FileInfo) else FileInfo(Path(path), "", 0, 0, compression=format_of(path)[1])
    chunker = _Chunker(chunk_chars)
    for _, _, text in documents(info, encoding_errors):
        for line in _lines(text):
            if drop_lines is None or not drop_lines.search(line):
                yield from chunker.add(line)
    yield from chunker.flush()


def head_text(info: FileInfo, limit: int, encoding_errors: str = "replace") -> str:
    """About the first `limit` characters of an input's text (its documents one after the other)."""
    pieces, size = [], 0
    for chunk in read_chunks(info, encoding_errors=encoding_errors, chunk_chars=min(limit, CHUNK_CHARS)):
        pieces.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return "".join(pieces)[:limit]


class _Chunker:
    """Gathers lines into chunks of about `chunk_chars`, each cut where tokenizing it alone gives
    the tokens the whole text would (see `_last_safe_cut`).

    Linear in the text: each line is searched for a safe cut once (from its end, so prose stops
    after a character or two). Re-joining and re-searching the pending text on every line took
    over 300 s for a 1 MB word list, one word per line, which has no safe cut at all.
    """

    def __init__(self, chunk_chars: int = CHUNK_CHARS) -> None:
        self.chunk_chars = chunk_chars
        self.lines: list[str] = []
        self.size = 0
        self.searched = 0  # lines known to hold no safe cut after the first character of the text
        self.cut: tuple[int, int] | None = None  # the last safe cut found: (line, offset in it)

    def add(self, line: str) -> Iterator[str]:
        if not line:
            return
        self.lines.append(line)
        self.size += len(line)
        if self.size < self.chunk_chars:
            return
        self._search()
        if self.cut is None and self.size < 4 * self.chunk_chars:
            return  # no safe place yet: read on
        k, at = self.cut or (len(self.lines) - 1, len(line))  # pathological text: cut at the line end anyway
        head = "".join(self.lines[:k]) + self.lines[k][:at]
        rest = self.lines[k][at:]
        yield head
        self.lines = ([rest] if rest else []) + self.lines[k + 1 :]
        self.size -= len(head)
        self.searched, self.cut = len(self.lines), None  # the last cut was taken: none is left after it

    def _search(self) -> None:
        """Find the last safe cut in the lines not searched yet (a later cut wins)."""
        for k in range(len(self.lines) - 1, self.searched - 1, -1):
            before = self.lines[k - 1][-1] if k else ""
            at = _last_safe_cut(before + self.lines[k]) - len(before)
            if at > 0 or (at == 0 and before):
                self.cut = (k, at)
                break
        self.searched = len(self.lines)

    def flush(self) -> Iterator[str]:
        if self.size:
            yield "".join(self.lines)
        self.lines, self.size, self.searched, self.cut = [], 0, 0, None


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


def _split_point(chars: int, tail_fraction: float) -> int | None:
    """Where (in characters) a document's held-out tail should start, or None for no tail."""
    if tail_fraction <= 0:
        return None
    return max(1, math.floor(chars * (1 - tail_fraction)))


SENTENCE_ENDS = frozenset("。！？；…」』”.!?;\n")


def _cut_in_line(line: str, at: int, limit: int) -> int:
    """Where to cut a line that straddles the held-out split at offset `at`: just after the first
    sentence end in [at, limit), else the first space there, else at `at` itself."""
    for i in range(at, min(limit, len(line))):
        if i > 0 and line[i - 1] in SENTENCE_ENDS:
            return i
    for i in range(at, min(limit, len(line))):
        if line[i].isspace():
            return i
    return at


def _route(
    lines: Iterable[str], chars: int | None, split: int | None, drop_lines: re.Pattern | None = None
) -> Iterator[tuple[bool, str]]:
    """(in the tail?, line or piece of a line) for each kept line of a document split at character
    `split` (None: no split); lines matching `drop_lines` are left out.

    Lines starting before the split belong to the head, the others to the tail: the tail starts
    at a line end. But when the line across the split is so long that the tail would keep less
    than half its share (the last paragraph of a Chinese novel is often longer than 0.5% of it),
    that line is cut inside, after a sentence if there is one: a document of any reasonable size
    has held-out text.
    """
    position = 0
    for line in lines:
        begin, position = position, position + len(line)
        if drop_lines is not None and drop_lines.search(line):
            continue
        if split is None or chars is None or position <= split or begin >= split:
            yield split is not None and begin >= split, line
        elif chars - position >= (chars - split) / 2:  # the tail still gets at least half its share
            yield False, line
        else:
            cut = _cut_in_line(line, split - begin, split - begin + (chars - split) // 2)
            yield False, line[:cut]
            yield True, line[cut:]


def held_out_rows(rows: int, fraction: float) -> frozenset[int] | None:
    """The document numbers held out whole, or None to hold out the tail of each document instead.

    When the fraction of the documents is at least one document (a dataset of many short rows,
    or a folder of many files), whole documents are held out: a seeded random choice of them
    (the seed is fixed: the same data always holds out the same rows). Otherwise (a few long
    documents, e.g. novels) each document gives its tail: a 0.5% tail of a 100-character row
    would be nothing, and one of four novels would be far too much.
    """
    count = math.floor(rows * fraction + 0.5) if fraction > 0 else 0
    if count < 1:
        return None
    rng = np.random.default_rng(VAL_ROWS_SEED)
    return frozenset(int(i) for i in rng.choice(rows, size=count, replace=False))


class _TokenWriter:
    """Appends token ids to a uint16 file, counting tokens and the characters they encode."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.tokens = 0
        self.chars = 0
        self.crc32 = 0  # of the bytes written: checked each time the cache is used
        self.has_text = False  # anything but whitespace: blank lines alone are nothing to learn from

    def write(self, ids: list[int] | np.ndarray, chars: int = 0) -> None:
        data = np.asarray(ids, dtype=np.uint16).tobytes()
        self.file.write(data)  # not ndarray.tofile: its OSError ("30465 requested and 3667 written") has no cause
        self.crc32 = zlib.crc32(data, self.crc32)
        self.tokens += len(data) // 2
        self.chars += chars

    def close(self) -> None:
        self.file.close()


class _Encoder:
    """Text pieces for several writers, tokenized a batch at a time with every core, written in order.

    Documents of many short rows are batched together (one tokenizer call per row would leave the
    cores idle); at most about `2 * threads` chunks of text are held at once.
    """

    def __init__(self, enc, threads: int, chunk_chars: int, progress: Callable[[int], None] | None = None) -> None:
        self.enc, self.threads, self.progress = enc, threads, progress
        self.done = 0  # characters tokenized so far, for `progress`
        self.limit = 2 * threads * chunk_chars
        self.items: list[tuple[_TokenWriter, str | None]] = []
        self.chars = 0

    def eot(self, writer: _TokenWriter) -> None:
        self.items.append((writer, None))

    def text(self, writer: _TokenWriter, text: str) -> None:
        self.items.append((writer, text))
        self.chars += len(text)
        if self.chars >= self.limit or len(self.items) >= 8192:
            self.flush()

    def flush(self) -> None:
        texts = [t for _, t in self.items if t is not None]
        encoded = iter(self.enc.encode_ordinary_batch(texts, num_threads=self.threads) if texts else [])
        pending: dict[_TokenWriter, list] = {}  # each writer's ids in order, written at once (a write per row is slow)
        chars: dict[_TokenWriter, int] = {}
        for writer, text in self.items:
            if text is None:
                pending.setdefault(writer, []).append([self.enc.eot_token])
            else:
                pending.setdefault(writer, []).append(next(encoded))
                chars[writer] = chars.get(writer, 0) + len(text)
                writer.has_text = writer.has_text or not text.isspace()
        for writer, parts in pending.items():
            ids = np.fromiter(itertools.chain.from_iterable(parts), np.uint16, count=sum(map(len, parts)))
            writer.write(ids, chars.get(writer, 0))
        self.done += self.chars
        self.items, self.chars = [], 0
        if self.progress is not None:
            self.progress(self.done)


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
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Tokenize every document into `head`, EOT before each, and hold out `tail_fraction` of the
    text into `tail`: whole documents or the tail of each (see `held_out_rows`). `progress(done,
    total)` is told the characters tokenized so far, after each batch."""
    threads = threads or os.cpu_count() or 1
    total = sum(f.chars for f in files)
    tell = None if progress is None else (lambda done: progress(min(done, total), total))
    encoder = _Encoder(enc, threads, chunk_chars, tell)
    if tell is not None:
        tell(0)
    held = held_out_rows(sum(f.rows for f in files), tail_fraction) if tail is not None else None
    offset = 0  # documents of the files before this one
    for info in files:
        for index, chars, text in documents(info, encoding_errors):
            split = _split_point(chars, tail_fraction) if tail is not None and held is None else None
            writers = {False: tail if held is not None and offset + index in held else head, True: tail}
            if isinstance(text, str) and split is None and drop_lines is None and len(text) < chunk_chars:
                encoder.eot(writers[False])  # a short row, whole: what the chunker would give, without its cost
                encoder.text(writers[False], text)
                continue
            chunkers = {False: _Chunker(chunk_chars), True: _Chunker(chunk_chars)}
            parts = (False, True) if split is not None else (False,)
            for part in parts:  # EOT first: each part of a document starts afresh
                encoder.eot(writers[part])
            for in_tail, piece in _route(_lines(text), chars, split, drop_lines):
                for chunk in chunkers[in_tail].add(piece):
                    encoder.text(writers[in_tail], chunk)
            for part in parts:
                for chunk in chunkers[part].flush():
                    encoder.text(writers[part], chunk)
        offset += info.rows
    encoder.flush()
    if progress is not None and encoder.done < total:  # (--drop-lines leaves some characters untokenized)
        progress(total, total)


# ----- the cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$MINIGPT2_CACHE, else $XDG_CACHE_HOME/minigpt2/tokens, else ~/.cache/minigpt2/tokens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minigpt2" / "tokens"


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
            **({"empty_rows": sum(f.empty_rows for f in self.files)} if any(f.empty_rows for f in self.files) else {}),
            "key": self.key,
            "chars": self.chars,
            "tokens": self.tokens,
            "tokens_per_char": self.tokens / max(self.chars, 1),
            "train_tokens": len(self.train),
            "val_tokens": len(self.val) if self.val is not None else 0,
            "cached": self.cached,
            "rebuilt_because": self.rebuilt_because,
        }


def check_inputs(
    specs: Iterable[str | os.PathLike], encoding_errors: str = "strict", text_field: str = "text"
) -> list[FileInfo]:
    """Find every input and check it (exists, holds text, not binary, UTF-8; every row's
    `text_field` is text): the cheap pass that makes a bad input fail at once, before a tokenizer
    or a model is loaded."""
    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"`encoding_errors` must be 'strict' or 'replace', not {encoding_errors!r}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"`text_field` must name a field, not {text_field!r}")
    return [check_source(p, encoding_errors, text_field) for p in find_text_files(specs)]


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
    text_field: str = "text",
    progress: Callable[[int, int], None] | None = None,
) -> Corpus:
    """Tokenize the inputs (paths, directories, globs, or `check_inputs`' result), or reuse the
    cached result.

    The cache entry is keyed by the files' contents (not their names or dates), the tokenizer,
    the cleaning options and the validation share, so any change re-tokenizes and an unchanged
    corpus starts at once. `progress(done, total)`: characters tokenized, when not cached.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"`val_fraction` must be in [0, 1), got {val_fraction}")
    pattern = compile_drop_lines(drop_lines)
    inputs = list(inputs)
    if inputs and all(isinstance(x, FileInfo) for x in inputs):
        files = inputs
    else:
        files = check_inputs(inputs, encoding_errors, text_field)

    key_material = {
        "format": FORMAT_VERSION,
        "files": [f.key() for f in files],
        "tokenizer": tokenizer_fingerprint(enc),
        "drop_lines": drop_lines or None,
        "encoding_errors": encoding_errors,
        "val_fraction": val_fraction,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / key
    cached = (entry / "meta.json").is_file()
    damaged = verify_entry(entry, enc.n_vocab, key_material) if cached else None
    if damaged is not None:  # never train on a damaged cache: move it out of the way, tokenize again
        _discard_entry(entry)
        cached = False
    if not cached:
        _build_entry(entry, key_material, files, enc, val_fraction=val_fraction, drop_lines=pattern,
                     encoding_errors=encoding_errors, threads=threads, progress=progress)  # fmt: skip
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


def verify_entry(entry: Path, vocab_size: int, request: dict | None = None) -> str | None:
    """Why a cache entry cannot be trusted, or None if it can.

    The entry must belong to the request: its meta.json records what it was built from (each
    input file's content hash and size, the tokenizer's fingerprint, the cleaning options), which
    must equal `request`, the same record for the corpus asked for, so an entry copied or renamed
    over another corpus's key is never used for it. The files are checked against what was
    recorded when they were written: their sizes, a CRC-32 of their bytes (a full read, ~0.1 s
    per 100 MB), and every id below the vocabulary size. A truncated or overwritten token file
    would otherwise be trained on silently.
    """
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if request is not None and meta.get("request") != request:
            built = ", ".join(Path(str(f)).name for f in meta.get("files") or []) or "unrecorded input"
            return f"it was built from other input ({built}), not from these files with this tokenizer and options"
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
    entry: Path,
    request: dict,
    files: list[FileInfo],
    enc,
    *,
    val_fraction,
    drop_lines,
    encoding_errors,
    threads,
    progress=None,
) -> None:
    """Tokenize into a temporary folder beside the entry, then rename it into place (atomic)."""
    if enc.n_vocab > 65536:
        raise DataError(f"the tokenizer has {enc.n_vocab} ids, too many for uint16 token files")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as e:
        raise cache_write_error(entry.parent, e) from None
    try:
        _tokenize_into(tmp, entry, request, files, enc, val_fraction, drop_lines, encoding_errors, threads, progress)
    except OSError as e:  # a full disk, a file size limit, ...: the cache folder is named, with what to do
        if e.errno not in WRITE_ADVICE:
            raise
        raise cache_write_error(entry.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_write_error(path: Path, error: OSError) -> OutputError:
    return OutputError(
        f"{write_error(path, error)}. Tokenizing needs room for 2 bytes per token in the token cache "
        "(choose another one with `cache_dir`)"
    )


def _tokenize_into(
    tmp: Path, entry: Path, request: dict, files, enc, val_fraction, drop_lines, encoding_errors, threads, progress
) -> None:
    """Tokenize the files into the folder `tmp` (train.bin, val.bin, meta.json), then rename it to `entry`."""
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
            progress=progress,
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
        "request": request,  # what the entry was built from (verify_entry checks it on every use)
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "meta.json").is_file():  # not just another process finishing first
            raise


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
