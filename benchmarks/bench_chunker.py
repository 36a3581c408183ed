"""How long the chunker takes on a text with no safe cut: a word list, one word per line.

    python benchmarks/bench_chunker.py            # a 1 MB word list (issue 31 C2)
    python benchmarks/bench_chunker.py --mb 8

A word list has no place where a letter meets punctuation (`_last_safe_cut`), so the chunker finds
no cut until the pending text is 4 x its chunk size. It used to join the pending lines and search
them again on every line: quadratic (over 300 s for 1 MB, killed there). Each line is searched once now.
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt2.training.data import read_chunks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=1.0)
    a = p.parse_args()
    rng = random.Random(0)
    words, size = [], 0
    while size < a.mb * (1 << 20):
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))))
        size += len(words[-1]) + 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "words.txt"
        path.write_text("\n".join(words) + "\n")
        start = time.perf_counter()
        chars = sum(len(c) for c in read_chunks(path))
        print(f"{chars:,} characters ({len(words):,} lines) in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
