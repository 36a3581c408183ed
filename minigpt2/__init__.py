"""minigpt2: a from-scratch GPT-2 in pure PyTorch that loads the official weights.

    from minigpt2 import load_model, load_tokenizer
    model = load_model("gpt2")
    enc = load_tokenizer("gpt2")

The names below that need PyTorch are imported on first use, so a script can check its options
and print a usage error without paying the ~2 s of importing torch first.
"""

from __future__ import annotations

import importlib

from minigpt2.errors import CheckpointError, DataError, MiniGPT2Error, OptionError, OutputError, user_message

_LAZY = {
    "GPT": "model.gpt",
    "KVCache": "model.kvcache",
    "GPTConfig": "model.config",
    "PRESETS": "model.config",
    "generate": "generation.generate",
    "load_tokenizer": "io.tokenizer",
    "load_model": "io.weights",
    "open_model": "io.weights",
    "save_model": "io.weights",
}

__all__ = ["CheckpointError", "DataError", "MiniGPT2Error", "OptionError", "OutputError", "user_message", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minigpt2' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minigpt2.{_LAZY[name]}"), name)
