"""Tokenizing speed and memory per input format: the shared Chinese novels, and the same text 10x larger.

The same text goes in as plain `.txt` (the reference: one file per novel), and as one row per
paragraph in JSON Lines, a JSON array, CSV, Parquet, gzip-compressed JSON Lines, zstd-compressed
text and a `datasets` dataset saved with save_to_disk (the formats whose package is installed).
Each format and size runs in a fresh process with an empty token cache and reports the text's
megabytes per second (checking, reading the rows, tokenizing with every core, writing the uint16
file) and the process's peak memory: resident (RSS), and anonymous (what it allocated itself; RSS
also counts the page cache of memory-mapped files, as a `datasets` dataset is read). Memory should
be flat in the input size: rows are read a block at a time and tokens written out as they come, so
10x the text costs 10x the time, not the RAM.

    MINIGPT2_SHARED_DATA=/path/to/data python benchmarks/bench_data.py [--times 10] [--formats txt jsonl ...]

MB/s counts the UTF-8 bytes of the text itself (not of its container), so the formats compare.
The last line gives each format's speed as a ratio to `.txt` (1x input) and its peak-memory
growth from 1x to 10x, resident and anonymous.
"""

import argparse
import csv
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time


def peak_mb():
    # VmHWM: this process's own peak (getrusage's ru_maxrss would carry the parent's over a fork)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_mb():
    # RssAnon: memory the process allocated itself. RSS also counts the pages of memory-mapped
    # files (a `datasets` dataset's Arrow files), which are the page cache: clean, shared, dropped
    # under pressure. Sampled every 10 ms by a thread: the kernel keeps no peak of it.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


import threading
peak_anon = [0.0]
def watch_anon():
    while True:
        peak_anon[0] = max(peak_anon[0], anon_mb())
        time.sleep(0.01)
threading.Thread(target=watch_anon, daemon=True).start()


from minigpt2.training.data import prepare_corpus
from minigpt2.io.tokenizer import encoding_from_files
spec, gpt2, cache = sys.argv[1:4]
enc = encoding_from_files(gpt2 + "/vocab.json", gpt2 + "/merges.txt")
if spec.startswith("hf:"):
    import datasets  # (imported before the clock starts, as pyarrow is for Parquet)
if spec.endswith(".parquet"):
    import pyarrow.parquet
before = peak_mb()
start = time.perf_counter()
corpus = prepare_corpus(spec.split("\n"), enc, val_fraction=0.005, cache_dir=cache)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": corpus.tokens, "chars": corpus.chars,
                  "rss_before_mb": before, "peak_rss_mb": peak_mb(), "peak_anon_mb": max(peak_anon[0], anon_mb())}))
"""

FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "jsonl.gz", "txt.zst", "hf")
NEEDS = {"parquet": "pyarrow", "txt.zst": "zstandard", "hf": "datasets"}


def write_input(fmt: str, texts: list[str], times: int, folder: Path) -> str:
    """The novels `times` over in format `fmt` under `folder`; returns the --data spec(s), one per line."""
    folder.mkdir(parents=True)
    paragraphs = lambda: (p for _ in range(times) for t in texts for p in t.splitlines(keepends=True) if p.strip())  # noqa: E731
    if fmt in ("txt", "txt.zst"):
        paths = []
        for i, text in enumerate(texts):
            path = folder / f"novel{i}.txt"
            with open(path, "w", encoding="utf-8", newline="") as f:
                for _ in range(times):
                    f.write(text)
            if fmt == "txt.zst":
                import zstandard

                with open(path, "rb") as src, open(f"{path}.zst", "wb") as dst:
                    zstandard.ZstdCompressor().copy_stream(src, dst)
                path.unlink()
                path = Path(f"{path}.zst")
            paths.append(str(path))
        return "\n".join(paths)
    if fmt in ("jsonl", "jsonl.gz"):
        path = folder / f"rows.{fmt}"
        with (gzip.open if fmt == "jsonl.gz" else open)(path, "wt", encoding="utf-8") as f:
            for p in paragraphs():
                f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
        return str(path)
    if fmt == "json":
        path = folder / "rows.json"
        with open(path, "w", encoding="utf-8") as f:
            f.write("[\n")
            for i, p in enumerate(paragraphs()):
                f.write(("," if i else "") + json.dumps({"text": p}, ensure_ascii=False) + "\n")
            f.write("]\n")
        return str(path)
    if fmt == "csv":
        path = folder / "rows.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text"])
            writer.writerows([p] for p in paragraphs())
        return str(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "rows.parquet"
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        batch = []
        for p in paragraphs():
            batch.append(p)
            if len(batch) == 20_000:
                writer.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        writer.write_table(pa.table({"text": batch}, schema=schema))
    if fmt == "parquet":
        return str(path)
    import datasets

    saved = folder / "dataset"
    datasets.Dataset.from_parquet(str(path), cache_dir=str(folder / "hf-cache")).save_to_disk(str(saved))
    path.unlink()
    return f"hf:{saved}"


def measure(spec: str, gpt2: Path) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, spec, str(gpt2), cache], capture_output=True, text=True, cwd=ROOT
        )
    if out.returncode:
        raise SystemExit(f"error: the child failed on {spec!r}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("MINIGPT2_SHARED_DATA"), help="the shared data folder")
    p.add_argument("--times", type=int, default=10, help="how much larger the big input is (default 10)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="(default: all installed)")
    args = p.parse_args()
    if not args.data:
        p.error("set MINIGPT2_SHARED_DATA or pass --data")
    data = Path(args.data)
    texts = [(data / "zh" / name).read_bytes().decode("utf-8").replace("\r\n", "\n") for name in NOVELS]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    formats = ["txt"] + [f for f in args.formats if f != "txt"]
    results: dict[str, dict[int, dict]] = {}
    for fmt in formats:
        if fmt in NEEDS and importlib.util.find_spec(NEEDS[fmt]) is None:
            print(f"{fmt:>8}: skipped, {NEEDS[fmt]} is not installed")
            continue
        results[fmt] = {}
        for times in (1, args.times):
            with tempfile.TemporaryDirectory() as tmp:
                spec = write_input(fmt, texts, times, Path(tmp) / "in")
                r = measure(spec, data / "gpt2")
            r["mb"] = mb * times
            results[fmt][times] = r
            print(
                f"{fmt:>8} {times:>3}x: {r['mb']:6.1f} MB of text, {r['tokens']:>11,} tokens in {r['seconds']:6.2f} s "
                f"= {r['mb'] / r['seconds']:5.2f} MB/s; peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(after imports {r['rss_before_mb']:.0f} MB), peak anonymous {r['peak_anon_mb']:.0f} MB",
                flush=True,
            )
    base = results["txt"][1]["mb"] / results["txt"][1]["seconds"]
    parts = []
    for fmt, r in results.items():
        one, big = r[1], r[args.times]
        parts.append(
            f"{fmt} {one['mb'] / one['seconds'] / base:.2f}x "
            f"(RSS {args.times}x-1x {big['peak_rss_mb'] - one['peak_rss_mb']:+.0f} MB, "
            f"anonymous {big['peak_anon_mb'] - one['peak_anon_mb']:+.0f} MB)"
        )
    print(f"speed vs .txt ({base:.2f} MB/s, 1x, {os.cpu_count()} cores): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
