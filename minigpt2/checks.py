"""Checking numbers at the boundary: the library's public functions and the scripts' arguments.

Why a module for something as plain as "is lr positive?": NaN passes every comparison-based
check (`nan < 0` and `nan <= 0` are both False), so `if lr <= 0: raise` lets `--lr nan` through
to train one step of garbage and then blame the learning rate. Every float here must first be
finite (`math.isfinite`), and then lie in an explicit range. Integers must be real ints, not
bools (`True` is an int in Python) nor floats nor strings read from a JSON file.

The library functions raise `OptionError(name, detail)`; the `arg_*` wrappers turn the same
checks into argparse `type=` functions, so a script refuses a bad value while parsing its
arguments, before any data or model is loaded. `ArgumentParser` prints argparse's errors as the
single `error: ...` line every minigpt2 script uses.
"""

from __future__ import annotations

import argparse
import math
import os
import re

from minigpt2.errors import CheckpointError, OptionError

# New tokens per sample, everywhere one is drawn (sample.py --max-new-tokens, train.py and compare.py
# --sample-tokens, and the same read back from run.json): a bound that a typo (an extra zero or three)
# cannot pass unnoticed: ~2 MB of text, hours on a CPU.
MAX_NEW_TOKENS = 1_000_000
SEED_MAX = 2**63 - 1  # random seeds: 0 .. the largest signed 64-bit integer (torch, numpy and JSON all take it)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    def show(x):
        return str(x) if isinstance(x, int) else f"{x:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {show(high)}"
    return ""


def finite(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float, if it is a finite number in the range; else an `OptionError`.

    `low_open` / `high_open` exclude the bound itself: finite("lr", x, low=0, low_open=True)
    accepts every finite x > 0.
    """
    where = _range_text(low, high, low_open, high_open)
    wanted = "a finite number" + (f" {where}" if where else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"must be {wanted}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if (
        not math.isfinite(value)
        or (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
    ):
        raise OptionError(name, f"must be {wanted}, got {value:g}")
    return value


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high]; else an `OptionError`."""
    where = _range_text(low, high, False, False)
    wanted = "an integer" + (f" {where}" if where else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be {wanted}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise OptionError(name, f"must be {wanted}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    return integer(name, value, low=1)


def non_negative_int(name: str, value) -> int:
    return integer(name, value, low=0)


# ----- argparse ---------------------------------------------------------------------------


def arg_float(**limits):
    """An argparse `type=` accepting a finite float within `limits` (the keywords of `finite`)."""
    return _arg_type(float, "a number", lambda name, value: finite(name, value, **limits))


def text_arg(value: str) -> str:
    """An argparse `type=` for text typed on the command line (a prompt), as the user typed it.

    Under a locale that is not UTF-8 (LC_ALL=C with PYTHONUTF8=0), Python hands non-ASCII
    arguments over as their bytes escaped into surrogates ("\\udce4\\udcbd..."): tokenized as they
    are, a Chinese prompt would silently become other tokens. Those bytes are UTF-8 on any
    terminal that shows the text, so they are decoded as such."""
    if not any("\ud800" <= c <= "\udfff" for c in value):
        return value
    try:
        return os.fsencode(value).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:  # (encode: a surrogate no byte came from)
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 text ({_bad_text(value, e)}); give the text in UTF-8"
        ) from None
    # Where it is refused, not kept: a lone surrogate cannot be written as UTF-8, so it would fail as a
    # traceback much later, when run.json, the merges or the page are written.


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds a lone surrogate (no character, and no UTF-8 for it), said for an error, or None."""
    found = re.search("[\ud800-\udfff]", text)
    if found is None:
        return None
    return f"\\u{ord(found.group()):04x} at character {found.start()}"


def _bad_text(value: str, error: UnicodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"byte 0x{error.object[error.start]:02x} at byte {error.start}"
    return lone_surrogate(value) or "a lone surrogate"


def arg_int(**limits):
    """An argparse `type=` accepting an integer within `limits` (the keywords of `integer`)."""
    return _arg_type(int, "an integer", lambda name, value: integer(name, value, **limits))


def _arg_type(convert, kind: str, check):
    """`convert` the text (else "must be {kind}"), then `check` the value; argparse words each error.

    The rule stays reachable as `.check(name, value)` (raising `OptionError(name, ...)`), so code that
    takes the same value from Python applies the very rule the option declares (`TrainConfig`)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return check("value", value)
        except OptionError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    parse.__name__ = kind.split()[-1]  # argparse names the type in "invalid number value: ..."
    parse.check = check
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line `error: ...` (exit status 2) that every
    minigpt2 error is, instead of a usage block followed by `prog: error: ...`.

    "argument --lr: must be ..." is shortened to "--lr must be ...", the wording `user_message`
    gives the library's own `OptionError`s."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+?)(/\S+)?: (must |is |has )", r"\1 \3", message)
        self.exit(2, f"error: {message}\n")


# ----- will it fit? -----------------------------------------------------------------------


def decode_memory_bytes(config, batch: int, prompt_tokens: int, dtype_bytes: int) -> int:
    """Bytes that sampling `batch` sequences at once allocates beyond the model's weights.

    The KV cache (keys and values, every layer, the whole context: 2 x n_layer x B x
    n_positions x n_embd), the prefill's logits for every prompt position (B x T x vocab) and its
    attention scores (B x heads x T x T), and a few float32 rows of next-token logits (B x vocab).
    """
    t = min(prompt_tokens, config.n_positions)
    kv_cache = 2 * config.n_layer * batch * config.n_positions * config.n_embd * dtype_bytes
    prefill = batch * t * config.vocab_size * dtype_bytes + batch * config.n_head * t * t * 4
    logits = 4 * batch * config.vocab_size * 4  # float32 copies: scaled, softmax, noise, mask
    return kv_cache + prefill + logits


def available_memory(device) -> int | None:
    """Free bytes on `device` (a torch.device): the GPU's free memory, or the kernel's estimate
    of what can be allocated without swapping (MemAvailable in /proc/meminfo); None if unknown."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_decode_memory(config, batch: int, prompt_tokens: int, dtype_bytes: int, device) -> None:
    """Refuse a batch whose sampling memory cannot fit, with the estimate, rather than being
    killed by the kernel's out-of-memory killer a minute later (or swapping the machine to a halt)."""
    need, free = decode_memory_bytes(config, batch, prompt_tokens, dtype_bytes), available_memory(device)
    if free is not None and need > free:
        raise OptionError(
            "num_samples",
            f"{batch} needs about {need / 2**30:,.1f} GiB to sample at once (mostly the KV cache: 2 x {config.n_layer} "
            f"layers x {batch} x {config.n_positions} positions x {config.n_embd} x {dtype_bytes} bytes), but only "
            f"{free / 2**30:,.1f} GiB is available on {device}; ask for fewer samples at a time",
        )


def train_memory_bytes(
    config, batch: int, seq_len: int, dtype_bytes: int, *, lora: bool = False, shards: int = 1, recompute: bool = False
) -> dict[str, int]:
    """Bytes one training process needs, by part: a lower bound, to refuse what cannot fit at all.

    weights: float32 (4 bytes each); gradients: float32, one per trainable weight; AdamW: two float32
    moments per trainable weight (with LoRA the trainable part is small and counted as none). Sharding
    splits these three over `shards` ranks. Activations kept for backward, per block about 17 values
    per width unit per token (Korthikanti et al. 2022, without the attention matrix, which SDPA never
    stores) in the compute dtype, or one block's worth plus each block's input with `recompute`;
    and the logits in float32 with their gradient (B x T x vocab x 2).
    """
    c = config
    params = c.vocab_size * c.n_embd + c.n_positions * c.n_embd + c.n_layer * 12 * c.n_embd * c.n_embd
    trainable = 0 if lora else params
    tokens = batch * seq_len
    per_block = 17 * tokens * c.n_embd * dtype_bytes
    blocks = (per_block + c.n_layer * tokens * c.n_embd * 4) if recompute else c.n_layer * per_block
    return {
        "weights": 4 * params // shards,
        "gradients": 4 * trainable // shards,
        "AdamW state": 8 * trainable // shards,
        "activations": blocks + 2 * 4 * tokens * c.vocab_size,
    }


def check_train_memory_fits(config, batch: int, seq_len: int, dtype_bytes: int, device, **kwargs) -> None:
    """Refuse a training batch that cannot fit on `device` (see `train_memory_bytes`), with the
    estimate and what to change, before the model is built: not an allocation failure minutes later."""
    parts, free = train_memory_bytes(config, batch, seq_len, dtype_bytes, **kwargs), available_memory(device)
    need = sum(parts.values())
    if free is not None and need > free:
        shown = ", ".join(f"{k} {v / 2**30:,.1f}" for k, v in parts.items())
        raise OptionError(
            "batch_size",
            f"{batch} at sequence length {seq_len} needs at least {need / 2**30:,.1f} GiB to train ({shown} GiB), "
            f"but only {free / 2**30:,.1f} GiB is available on {device}; give a smaller batch size or sequence "
            "length (with `grad_accum` to keep the batch), or `activation_checkpointing`",
        )


def check_vocab_fits(
    model_config, enc, *, model_name: str = "the model", tokenizer_name: str = "its tokenizer"
) -> None:
    """Refuse a model with fewer token ids than its tokenizer produces.

    Every id the tokenizer can emit indexes a row of the embedding; an id past the end is an
    IndexError deep inside the forward pass (or a CUDA assert). A larger model vocabulary is
    fine (padded vocabularies are common): the extra ids are never produced by the tokenizer,
    and the sampler's UTF-8 guard never picks them.
    """
    if model_config.vocab_size < enc.n_vocab:
        raise CheckpointError(
            f"{model_name} has a vocabulary of {model_config.vocab_size} tokens, smaller than the "
            f"{enc.n_vocab} of {tokenizer_name} (largest id {enc.n_vocab - 1}, <|endoftext|> is {enc.eot_token}): "
            "they do not belong together; use the tokenizer the model was trained with"
        )


def check_embed_warmup(embed_warmup: int, steps: int | None) -> None:
    """An embedding warm-up (the new rows alone) must leave steps for everything else."""
    non_negative_int("embed_warmup", embed_warmup)
    if embed_warmup and steps is not None and embed_warmup >= steps:
        raise OptionError(
            "embed_warmup",
            f"must be fewer than the {steps} steps, or nothing but the new rows would ever train; "
            "give fewer warm-up steps or more steps",
        )
