"""Tokenizing speed and memory: the four shared Chinese novels, and the same text 10x larger.

Each size runs in a fresh process with an empty token cache and reports the input's megabytes
per second (checking, cleaning, tokenizing with every core, writing the uint16 file) and the
process's peak resident memory. Memory should be flat in the input size: text is read and
tokenized in chunks and written out as it goes, so 10x the text costs 10x the time, not the RAM.

    MINIGPT2_SHARED_DATA=/path/to/data python benchmarks/bench_data.py [--times 10]

The last line gives the speed on the 1x input and the peak-memory difference between 10x and 1x.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")

CHILD = r"""
import json, resource, sys, time
from minigpt2.data import prepare_corpus
from minigpt2.tokenizer import encoding_from_files
path, gpt2, cache = sys.argv[1:4]
enc = encoding_from_files(gpt2 + "/vocab.json", gpt2 + "/merges.txt")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
corpus = prepare_corpus([path], enc, val_fraction=0.005, cache_dir=cache)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "tokens": corpus.tokens, "chars": corpus.chars,
                  "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024}))
"""


def measure(path: Path, gpt2: Path) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(gpt2), cache], capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("MINIGPT2_SHARED_DATA"), help="the shared data folder")
    p.add_argument("--times", type=int, default=10, help="how much larger the big input is (default 10)")
    args = p.parse_args()
    if not args.data:
        p.error("set MINIGPT2_SHARED_DATA or pass --data")
    data = Path(args.data)
    text = b"".join((data / "zh" / name).read_bytes() for name in NOVELS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for times in (1, args.times):
            path = Path(tmp) / f"novels-x{times}.txt"
            with open(path, "wb") as f:
                for _ in range(times):
                    f.write(text)
            r = measure(path, data / "gpt2")
            r["mb"] = len(text) * times / 1e6
            results[times] = r
            print(
                f"{times:>3}x: {r['mb']:7.1f} MB, {r['chars']:>11,} chars, {r['tokens']:>11,} tokens "
                f"({r['tokens'] / r['chars']:.2f}/char) in {r['seconds']:6.2f} s = {r['mb'] / r['seconds']:5.1f} MB/s; "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_before_mb']:.0f} MB)"
            )
            path.unlink()
    one, big = results[1], results[args.times]
    print(
        f"tokenizing: {one['mb'] / one['seconds']:.1f} MB/s on {os.cpu_count()} cores (1x), "
        f"{big['mb'] / big['seconds']:.1f} MB/s ({args.times}x); peak RSS {args.times}x - 1x = "
        f"{big['peak_rss_mb'] - one['peak_rss_mb']:+.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
