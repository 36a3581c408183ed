"""minigpt2: a from-scratch GPT-2 in pure PyTorch that loads the official weights.

    from minigpt2 import load_model, load_tokenizer
    model = load_model("gpt2")
    enc = load_tokenizer("gpt2")
"""

from .config import PRESETS, GPTConfig
from .errors import CheckpointError, DataError, MiniGPT2Error, OptionError, OutputError, user_message
from .generate import generate
from .model import GPT, KVCache
from .tokenizer import load_tokenizer
from .weights import load_model, save_model

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "KVCache",
    "CheckpointError",
    "DataError",
    "MiniGPT2Error",
    "OptionError",
    "OutputError",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
    "user_message",
]
