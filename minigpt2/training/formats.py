"""The containers text comes in: plain text, JSON Lines, JSON, CSV/TSV, Parquet, compressed or not,
and Hugging Face datasets, each read as a stream of documents with flat memory.

    notes.txt[.gz|.bz2|.xz|.zst]           one document: the whole file
    rows.jsonl / .json  (+ compression)    one document per object, from its `text_field`
    rows.csv / .tsv     (+ compression)    one document per row, from the column `text_field`
    rows.parquet                           one document per row, from the column `text_field`
    hf:OWNER/NAME[:CONFIG][@SPLIT]         one document per row of a `datasets` dataset
    hf:./folder                            a local folder that `datasets` can load

Why not just read everything as text: a `.jsonl` file trained on as raw text teaches the model
keys, quotes and braces (254,141 tokens for two documents whose `.txt` twins give 252,048), and
nothing says so. Here the container decides how a file is read, by its name, and a row that is
not what it should be (bad JSON, a missing field, a number where text should be) is an error that
names the file, the row and the field. Nothing here holds more than one block of rows at a time.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from minigpt2.errors import DataError
from minigpt2.files import parse_json

HF_PREFIX = "hf:"
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
ROW_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
TEXT_SUFFIXES = (".txt",)  # what a folder given to `data` is searched for (and their compressed forms)
ROW_BATCH = 1024  # rows per Parquet / datasets batch
READ_BLOCK = 1 << 20
# The most one row (a JSON line, a JSON object, a CSV record) may hold. A row is read whole, so without a
# bound a 2 MB `.jsonl.gz` holding one 1 GiB row (gzip packs repeated text 1000:1) took over 3 GB of memory
# before it failed. 64 MiB is a long novel in one cell; a longer row is refused, naming its line.
MAX_ROW_BYTES = 64 << 20
SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON "\ud800" escape alone: no character, and no UTF-8 for it


def format_of(path: str | os.PathLike) -> tuple[str, str | None]:
    """(format, compression) from a file's name: ("jsonl", "gzip") for rows.jsonl.gz.

    Any name that is not a row format is text, as a `.txt` file is: the user named the file, and
    text is what `data` always read.
    """
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (ROW_FORMATS.get(suffixes[-1], "text") if suffixes else "text"), compression


def is_text_name(path: Path) -> bool:
    """A `.txt` file, compressed or not (what a folder given to `data` is searched for)."""
    name = path.name.lower()
    return any(name.endswith(t + c) for t in TEXT_SUFFIXES for c in ("", *COMPRESSIONS))


# ----- compressed streams ------------------------------------------------------------------------


def open_binary(path: Path, compression: str | None):
    """The file's bytes, decompressed as they are read. Damage shows up while reading: wrap the
    reading in `stream_errors`."""
    if compression is None:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bzip2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f"'{path}' is zstd-compressed, and reading it needs the zstandard package: "
            'pip install -e ".[zstd]" (or decompress it first)'
        ) from None
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    return io.BufferedReader(raw, READ_BLOCK)  # lines and iteration, which the raw reader lacks


@contextlib.contextmanager
def stream_errors(path: Path, compression: str | None):
    """Turn a damaged or truncated compressed stream, or an unreadable file, into one DataError."""
    errors: tuple = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
    with contextlib.suppress(ImportError):
        import zstandard

        errors += (zstandard.ZstdError,)
    try:
        yield
    except errors as e:
        kind = compression or "compressed"
        raise DataError(
            f"'{path}' is not a valid {kind} stream ({e or type(e).__name__}): the file is damaged or "
            "cut short; download or compress it again"
        ) from None
    except OSError as e:
        if compression and "invalid" in str(e).lower():  # bz2: "Invalid data stream"
            raise DataError(
                f"'{path}' is not a valid {compression} stream ({e}); download or compress it again"
            ) from None
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None


def text_lines(path: Path, compression: str | None, encoding_errors: str) -> Iterator[str]:
    """The lines of a (compressed) text file, line ends made "\\n", as Python's text mode does."""
    with stream_errors(path, compression), open_binary(path, compression) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors=encoding_errors, newline=None)
        while line := stream.readline(MAX_ROW_BYTES):  # a longer line comes in pieces: memory stays bounded
            yield line


def normalise(text: str) -> str:
    """Line ends made "\\n", as a text file read in Python's text mode: so a row and its `.txt`
    twin give the same tokens."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


# ----- rows ----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One document of a row source: where it is (for error messages) and its text."""

    index: int  # 0-based, counting every row (the held-out rows are chosen by it)
    where: str  # "line 12", "row 7", "object 3"
    text: str


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def row_text(record, field: str, path, where: str) -> str:
    """The text of `field` in one record (a dict), or a DataError naming the file, row and field."""
    if not isinstance(record, dict):
        raise DataError(f"'{path}' {where} is {_kind(record)}, not an object with a '{field}' field")
    if field not in record:
        fields = ", ".join(f"'{k}'" for k in list(record)[:8]) or "none"
        raise DataError(
            f"'{path}' {where} has no field '{field}' (its fields: {fields}); choose the field with `text_field`"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"'{path}' {where}: the field '{field}' holds {_kind(value)}, not text")
    bad = SURROGATE.search(value)
    if bad:
        raise DataError(
            f"'{path}' {where}: the field '{field}' holds the escape \\u{ord(bad.group()):04x} at character "
            f"{bad.start()}, half of a UTF-16 pair and no character; fix the row (write the character itself)"
        )
    return value


def iter_rows(path: Path, fmt: str, compression: str | None, field: str, encoding_errors: str) -> Iterator[Row]:
    """Every row of a row file, in order, its text checked (see `row_text`)."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}
    with stream_errors(path, compression):
        yield from readers[fmt](path, fmt, compression, field, encoding_errors)


def _decode(data: bytes, path: Path, where: str, encoding_errors: str) -> str:
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' {where} is not valid UTF-8 (byte 0x{data[e.start]:02x}, {e.reason}). Convert the file to "
            "UTF-8, or pass `encoding_errors='replace'` to replace undecodable bytes with U+FFFD"
        ) from None


def _jsonl_rows(path, fmt, compression, field, encoding_errors) -> Iterator[Row]:
    index = 0
    with open_binary(path, compression) as f:
        for number, line in enumerate(bounded_lines(f, path), 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = parse_json(_decode(line, path, where, encoding_errors))
            except json.JSONDecodeError as e:
                raise DataError(f"'{path}' {where} is not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # nested too deeply, a number of thousands of digits (see files.parse_json)
                raise DataError(f"'{path}' {where} is not valid JSON here: {e}") from None
            yield Row(index, where, row_text(record, field, path, where))
            index += 1


def bounded_lines(f, path, limit: int = MAX_ROW_BYTES) -> Iterator:
    """The lines of a binary (or text) stream, each read with at most `limit` bytes held: a longer
    line is refused, naming it (see MAX_ROW_BYTES)."""
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit:
            raise DataError(
                f"'{path}' line {number} is longer than {limit >> 20} MiB, more than one row may hold; split it "
                "into rows (or give it as a .txt file, which is read in pieces)"
            )
        yield line


def _json_rows(path, fmt, compression, field, encoding_errors) -> Iterator[Row]:
    """A .json file: an array of objects (read incrementally, one object at a time), or JSON Lines."""
    with open_binary(path, compression) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors=encoding_errors)
        try:
            head = stream.read(READ_BLOCK)
        except UnicodeDecodeError as e:
            raise DataError(f"'{path}' is not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
        if not head.lstrip().startswith("["):
            stream.detach()
            raw.close()
            yield from _jsonl_rows(path, fmt, compression, field, encoding_errors)
            return
        yield from _json_array(stream, head, path, field)


def _json_array(stream, buffer: str, path, field) -> Iterator[Row]:
    decoder = json.JSONDecoder()
    pos = buffer.index("[") + 1
    index, expect_value, done = 0, True, False
    eof = False

    def more() -> bool:
        nonlocal buffer, pos, eof
        try:
            block = stream.read(READ_BLOCK)
        except UnicodeDecodeError as e:
            raise DataError(f"'{path}' is not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
        buffer, pos, eof = buffer[pos:] + block, 0, not block
        if len(buffer) > MAX_ROW_BYTES + READ_BLOCK:  # one object (the unread part starts with it) past the bound
            raise DataError(
                f"'{path}' object {index + 1} of the array is larger than {MAX_ROW_BYTES >> 20} MiB, more than one "
                "row may hold; split it into rows"
            )
        return bool(block)

    while not done:
        while pos < len(buffer) and buffer[pos] in " \t\r\n":
            pos += 1
        if pos >= len(buffer):
            if not more():
                raise DataError(f"'{path}' ends inside its JSON array (after {index} objects): the file is cut short")
            continue
        c = buffer[pos]
        if c == "]" and (expect_value is not True or index == 0):
            done = True
            continue
        if c == "," and not expect_value:
            pos, expect_value = pos + 1, True
            continue
        if not expect_value:
            raise DataError(f"'{path}' is not valid JSON: expected ',' or ']' after object {index} of the array")
        where = f"object {index + 1} of the array"
        while True:
            try:
                record, end = decoder.raw_decode(buffer, pos)
                if end == len(buffer) and not eof and more():  # a number may go on in the next block
                    continue
                break
            except json.JSONDecodeError as e:
                if not eof and more():
                    continue
                raise DataError(f"'{path}' {where} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"'{path}' {where} is nested too deeply to be a row") from None
            except ValueError:  # int()'s digit limit (see files.parse_json)
                raise DataError(f"'{path}' {where} holds a number of more than 4300 digits, no row's") from None
        pos = end
        yield Row(index, where, row_text(record, field, path, where))
        index, expect_value = index + 1, False
    pos += 1  # past the "]": nothing but whitespace may follow (a second array would be dropped unread)
    while True:
        if buffer[pos:].strip():
            found = buffer[pos:].strip()[:20]
            raise DataError(
                f"'{path}' holds more after its JSON array of {index} objects ({found!r}...): one .json file is one "
                "array; join the arrays, or write the rows as JSON Lines (.jsonl)"
            )
        pos = len(buffer)
        if not more():
            return


@contextlib.contextmanager
def _big_csv_fields():
    """A novel in one CSV cell is more than the csv module's 128 KiB default: lift the limit to a
    row's bound (MAX_ROW_BYTES) while reading, and put it back."""
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_ROW_BYTES)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_rows(path, fmt, compression, field, encoding_errors) -> Iterator[Row]:
    """Read strictly: a quote opened and never closed would otherwise swallow every later row into
    one cell without a word; it is refused, naming the line where the record began."""
    with open_binary(path, compression) as raw, _big_csv_fields():
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors=encoding_errors, newline="")
        reader = csv.reader(bounded_lines(stream, path), delimiter="\t" if fmt == "tsv" else ",", strict=True)
        began = 1  # the line the record being read began on
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"'{path}' holds no rows, not even a header; give a file with a '{field}' column")
            if field not in header:
                columns = ", ".join(f"'{c}'" for c in header[:8])
                raise DataError(
                    f"'{path}' has no column '{field}' (its header: {columns}); choose the column with `text_field`"
                )
            column = header.index(field)
            began = reader.line_num + 1
            for index, values in enumerate(reader):
                where = f"row {index + 1} (line {began})"
                if any("\x00" in v for v in values):
                    raise DataError(
                        f"'{path}' {where} holds a NUL byte: a binary file, not text; give UTF-8 text (UTF-16 must "
                        "be converted to UTF-8 first)"
                    )
                if column >= len(values):
                    raise DataError(f"'{path}' {where} has {len(values)} values, no '{field}' value")
                yield Row(index, where, values[column])
                began = reader.line_num + 1
        except csv.Error as e:
            why = "a quote opened there is never closed" if "end of data" in str(e) else str(e)
            raise DataError(
                f"'{path}' is not valid {fmt.upper()} at the record that begins on line {began}: {why}; fix the "
                'quoting there (a quote inside a cell is written twice: "")'
            ) from None
        except UnicodeDecodeError as e:
            raise DataError(
                f"'{path}' is not valid UTF-8 near line {reader.line_num + 1} ({e.reason}). Convert the file to "
                "UTF-8, or pass `encoding_errors='replace'`"
            ) from None


def _require_pyarrow(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow, an optional extra: pip install -e \".[parquet]\"") from None
    return pq


def _parquet_rows(path, fmt, compression, field, encoding_errors) -> Iterator[Row]:
    pq = _require_pyarrow(path)
    import pyarrow as pa

    with contextlib.ExitStack() as stack:
        source = path
        if compression:  # Parquet needs to seek: decompress into a temporary file first
            source = stack.enter_context(tempfile.TemporaryFile())
            with open_binary(path, compression) as f:
                while block := f.read(READ_BLOCK):
                    source.write(block)
            source.seek(0)
        try:
            # Read column chunks through a small buffer, page by page: pyarrow's default (pre-buffer
            # whole row groups) keeps every row group it has read allocated, so memory grew with the
            # file (170 MB for 90 MB of text); buffered, it stays flat whatever the file's size.
            pf = pq.ParquetFile(source, buffer_size=READ_BLOCK, pre_buffer=False)
            schema = pf.schema_arrow
            if field not in schema.names:
                columns = ", ".join(f"'{c}'" for c in schema.names[:8])
                raise DataError(
                    f"'{path}' has no column '{field}' (its columns: {columns}); choose the column with `text_field`"
                )
            kind = schema.field(field).type
            if pa.types.is_dictionary(kind):  # (common in real files: repeated values stored once)
                kind = kind.value_type
            is_view = getattr(pa.types, "is_string_view", lambda t: False)  # (pyarrow 16 and later)
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
                raise DataError(f"'{path}': the column '{field}' holds {kind}, not text")
            index = 0
            for batch in pf.iter_batches(batch_size=ROW_BATCH, columns=[field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        raise DataError(f"'{path}' row {index + 1}: the column '{field}' is null, not text")
                    yield Row(index, f"row {index + 1}", value)
                    index += 1
        except (pa.ArrowException, OSError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"'{path}' cannot be read as Parquet ({why}): the file is damaged or not Parquet") from None


# ----- Hugging Face datasets ----------------------------------------------------------------------


VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`hf:OWNER/NAME[:CONFIG][@SPLIT]` -> (name or local folder, config or None, split or None)."""
    rest = spec.removeprefix(HF_PREFIX)
    name, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and not split.strip():
        raise DataError(f"'{spec}' names no split after '@'; write hf:OWNER/NAME@SPLIT, or leave out '@' for train")
    config = None
    head, colon, tail = name.rpartition(":")
    if colon and head and "/" not in tail:
        name, config = head, tail
    if not name:
        raise DataError(f"'{spec}' names no dataset; write hf:OWNER/NAME, hf:OWNER/NAME:CONFIG@SPLIT or hf:./folder")
    return name, config or None, split or None


@dataclass
class DatasetSource:
    """One split of a `datasets` dataset, read row by row from its Arrow files (memory-mapped)."""

    spec: str
    dataset: object = dataclass_field(repr=False)  # datasets.Dataset
    text_field: str
    split: str
    validation: DatasetSource | None = None

    @property
    def fingerprint(self) -> str:
        """What the token cache is keyed by: the dataset's fingerprint (which `datasets` derives
        from the dataset's revision and files, or stores beside a saved dataset), its split and size."""
        key = {"fingerprint": self.dataset._fingerprint, "split": self.split, "rows": self.dataset.num_rows}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    @property
    def bytes(self) -> int:
        return int(self.dataset.data.nbytes)

    def rows(self) -> Iterator[Row]:
        index = 0
        for batch in self.dataset.select_columns([self.text_field]).iter(batch_size=ROW_BATCH):
            for value in batch[self.text_field]:
                where = f"row {index + 1}"
                if not isinstance(value, str):
                    raise DataError(f"the dataset '{self.spec}' {where}: the field '{self.text_field}' holds "
                                    f"{_kind(value)}, not text")  # fmt: skip
                yield Row(index, where, value)
                index += 1


def open_dataset(spec: str, text_field: str, split: str | None = None) -> DatasetSource:
    """Load an `hf:` dataset with the `datasets` library: a hub dataset (from its cache when
    HF_HUB_OFFLINE=1), a folder written by `save_to_disk`, or a local folder of data files.

    Without a split named, the "train" split is read (or the only one), and a validation split
    ("validation", "valid", "val" or "dev") comes along as `validation`.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading the dataset '{spec}' needs the datasets library, an optional extra: "
            'pip install -e ".[datasets]"'
        ) from None
    name, config, wanted = parse_dataset_spec(spec)
    wanted = wanted or split
    local = Path(name).expanduser()
    unreachable = None
    try:
        if local.is_dir() and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(local))
            if config:
                raise DataError(f"'{spec}': a dataset saved with save_to_disk has no configs; leave out ':{config}'")
        elif not local.exists() and name.startswith((".", "/", "~")):
            raise DataError(f"the dataset folder '{name}' does not exist; give a folder or a hub dataset OWNER/NAME")
        elif local.is_dir():
            loaded = datasets.load_dataset(str(local), config)
        else:
            unreachable = _hub_unreachable(datasets)
            with _offline(datasets, unreachable is not None):
                loaded = datasets.load_dataset(name, config)
    except DataError:
        raise
    except Exception as e:  # the datasets library's many errors (not found, offline, bad config, bad files)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local.is_dir() and unreachable:
            first += f"; the hub could not be reached ({unreachable}) and the dataset is not in the cache"
        raise DataError(f"cannot load the dataset '{spec}': {first}") from None
    splits = dict(loaded) if isinstance(loaded, dict) else {"train": loaded}
    chosen = wanted or ("train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else None)
    if chosen not in splits:
        names = ", ".join(splits)
        raise DataError(
            f"the dataset '{spec}' has no split '{chosen}' (it has: {names}); name one as {HF_PREFIX}{name}@SPLIT"
            if chosen
            else f"the dataset '{spec}' has several splits ({names}) and none is called train; name one as "
            f"{HF_PREFIX}{name}@SPLIT"
        )
    source = _dataset_split(spec, splits[chosen], text_field, chosen)
    if wanted is None:
        own = next((s for s in VALIDATION_SPLITS if s in splits and s != chosen), None)
        if own is not None:
            source.validation = _dataset_split(f"{spec}@{own}", splits[own], text_field, own)
    return source


def _hub_unreachable(datasets) -> str | None:
    """Why the hub cannot be reached, unless downloads are off anyway (see hub.hub_unreachable)."""
    if datasets.config.HF_HUB_OFFLINE:
        return None
    from minigpt2.io.hub import hub_unreachable

    return hub_unreachable()


@contextlib.contextmanager
def _offline(datasets, offline: bool):
    """With no network, read the dataset from the cache at once, as HF_HUB_OFFLINE=1 does, instead
    of retrying for half a minute: datasets' own switch, set for this one call and put back."""
    old = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = old or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = old


def _dataset_split(spec: str, dataset, text_field: str, split: str) -> DatasetSource:
    if text_field not in dataset.column_names:
        columns = ", ".join(f"'{c}'" for c in dataset.column_names[:8])
        raise DataError(
            f"the dataset '{spec}' has no field '{text_field}' (its fields: {columns}); choose the field with "
            "`text_field`"
        )
    kind = getattr(dataset.features[text_field], "dtype", None)
    if kind not in ("string", "large_string", "string_view"):
        raise DataError(f"the dataset '{spec}': the field '{text_field}' holds {kind or 'nested values'}, not text")
    return DatasetSource(spec, dataset, text_field, split)
