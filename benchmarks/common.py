"""Pieces the benchmark scripts share."""

from pathlib import Path

import numpy as np

from minigpt2.training.data import TokenFile


def random_token_file(folder: Path, vocab_size: int, n: int = 200_000) -> TokenFile:
    """`n` seeded random token ids in `folder`/tokens.bin, as a training run's token file."""
    tokens = np.random.default_rng(0).integers(0, vocab_size, n, dtype=np.uint16)
    tokens.tofile(Path(folder) / "tokens.bin")
    return TokenFile(Path(folder) / "tokens.bin", chars=len(tokens))
