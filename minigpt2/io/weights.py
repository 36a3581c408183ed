"""Reading and writing GPT-2 checkpoints in the official safetensors layout.

The official checkpoint and minigpt2's model use the same tensor names, with three differences
that this module translates, explicitly and in one place:

    official checkpoint                       minigpt2                     why
    ----------------------------------------  ---------------------------  -----------------------
    [transformer.]wte.weight       (V, C)     wte.weight       (V, C)      prefix from transformers
    [transformer.]wpe.weight       (P, C)     wpe.weight       (P, C)
    [transformer.]h.N.ln_1.weight|bias (C,)   h.N.ln_1.weight|bias         same
    [transformer.]h.N.attn.c_attn.weight  (C, 3C)   h.N.attn.c_attn.weight  (3C, C)  Conv1D: (in, out)
    [transformer.]h.N.attn.c_attn.bias    (3C,)     h.N.attn.c_attn.bias    (3C,)
    [transformer.]h.N.attn.c_proj.weight  (C, C)    h.N.attn.c_proj.weight  (C, C)   Conv1D, transposed
    [transformer.]h.N.ln_2.weight|bias    (C,)      h.N.ln_2.weight|bias
    [transformer.]h.N.mlp.c_fc.weight     (C, 4C)   h.N.mlp.c_fc.weight     (4C, C)  Conv1D, transposed
    [transformer.]h.N.mlp.c_proj.weight   (4C, C)   h.N.mlp.c_proj.weight   (C, 4C)  Conv1D, transposed
    [transformer.]ln_f.weight|bias        (C,)      ln_f.weight|bias
    [transformer.]h.N.attn.bias, .masked_bias       (none)       causal-mask buffers, skipped
    lm_head.weight  (optional)            (V, C)    = wte.weight             tied, must equal wte

OpenAI's TensorFlow code used a "Conv1D" layer that is a plain matrix multiply with the weight
stored (in, out); `nn.Linear` stores (out, in). On the square `attn.c_proj` a forgotten transpose
still loads without a shape error and silently computes garbage, which is why the parity tests
compare values, not shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

from minigpt2 import files
from minigpt2.device import resolve_device, resolve_dtype
from minigpt2.errors import CheckpointError
from minigpt2.files import write_atomically
from minigpt2.io.adapter import (
    ADAPTER_WEIGHTS,
    adapter_base,
    adapter_checkpoint,
    adapter_targets,
    is_adapter_folder,
    merged_checkpoint,
    read_adapter_config,
)
from minigpt2.io.hub import OFFICIAL_REPOS, hub_file, local_path
from minigpt2.io.runs import CONFIG, WEIGHTS, RunFolder, other_checkpoints_hint
from minigpt2.model.config import GPTConfig
from minigpt2.model.gpt import GPT

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
PREFIX = "transformer."


def is_conv1d(name: str) -> bool:
    """True for the four weights the official checkpoint stores transposed, (in, out)."""
    return name.endswith(CONV1D_WEIGHTS)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Inside it, torch.nn.init's functions (what modules call to initialise their weights) do nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def empty_model(config: GPTConfig, device: torch.device | str = "meta") -> GPT:
    """A GPT of this shape whose weights hold no chosen values: on the meta device (the default) only
    each tensor's name and shape, elsewhere uninitialised memory, for weights that are filled next.

    Its random initialisation is skipped: the values would be thrown away, and it would cost much
    time, on the meta device most of all: there normal_ imports torch._dynamo (2-3 s of every
    sample.py and compare.py start), and moving a meta model to a device (`to_empty`) imports
    PyTorch's shape machinery (another 1-1.5 s), which building it on its device in the first
    place does not.
    """
    with torch.device(device), _SkipInit():
        return GPT(config)


def official_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an official checkpoint of this shape holds (unprefixed), with its shape."""
    model = empty_model(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte.weight; not stored
        shapes[name] = tuple(reversed(tensor.shape)) if is_conv1d(name) else tuple(tensor.shape)
    return shapes


# ----- finding the files ------------------------------------------------------------------


def run_checkpoint(source: str | os.PathLike) -> Path | None:
    """The checkpoint a training run's directory stands for (its final, else newest), or None when
    `source` is not a run's directory."""
    path = local_path(source)
    if path is not None and path.is_dir() and not (path / WEIGHTS).exists() and RunFolder.is_run(path):
        return RunFolder(path).model_checkpoint()
    return None


def checkpoint_files(source: str | os.PathLike, revision: str | None = None) -> tuple[Path | None, Path]:
    """(config.json or None, model.safetensors) for a source; see `minigpt2.io.hub` for the forms."""
    path = local_path(source)
    if path is None:
        return hub_file(str(source), CONFIG, revision=revision), hub_file(str(source), WEIGHTS, revision=revision)
    path = run_checkpoint(path) or path  # a training run stands for its final (or newest) checkpoint
    path = adapter_checkpoint(path)  # a run's adapter/ stands for the merged model beside it
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.is_file():
            extra = ""
            if (path / f"{WEIGHTS}.index.json").exists():
                extra = (
                    " It holds a sharded checkpoint (model.safetensors.index.json), which minigpt2 does not read yet."
                )
            elif (path / "pytorch_model.bin").exists():
                extra = " It holds pytorch_model.bin, a pickle, which minigpt2 never loads: convert it to safetensors."
            raise CheckpointError(f"directory '{path}' has no {WEIGHTS}.{extra}")
        config = path / CONFIG
        if not config.is_file():
            raise CheckpointError(
                f"directory '{path}' has {WEIGHTS} but no {CONFIG}, which holds the model's shape (its head "
                f"count cannot be read from the weights). Copy the {CONFIG} that belongs to these weights "
                "into it, "
                f"or load '{weights}' itself to have the shape guessed (heads of 64, as in the official models)."
            )
        return config, weights
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"'{path}' is not a .safetensors file; give a checkpoint directory, a .safetensors file or a model name"
            )
        return None, path
    raise CheckpointError(
        f"model '{source}' not found: it is not an existing file or directory, one of the known names "
        f"({', '.join(OFFICIAL_REPOS)}), or a hub repo id ('owner/name')."
    )


def read_json_object(path: Path, expected: str) -> dict:
    """A JSON file that must hold an object, or a `CheckpointError` saying what it should be."""
    return files.read_json_object(path, expected, CheckpointError)


def read_config(path: Path) -> GPTConfig:
    return GPTConfig.from_hf_config(read_json_object(path, "a GPT-2 config.json"), where=str(path))


def read_header(f, where: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from an open safetensors file's header (no data is read)."""
    try:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:
        raise CheckpointError(f"'{where}' is corrupted ({e}); download or save it again.") from None


def checkpoint_config(config_path: Path | None, stored: dict[str, tuple[int, ...]], where: Path) -> GPTConfig:
    """The model's shape: from config.json, or (a bare .safetensors file) inferred from its tensors."""
    unprefixed = {key.removeprefix(PREFIX): shape for key, shape in stored.items()}
    if config_path is None:
        return infer_config(unprefixed, where)
    config = read_config(config_path)
    check_config_fits(config, unprefixed, config_path, where)
    return config


def check_config_fits(config: GPTConfig, shapes: dict[str, tuple[int, ...]], config_path: Path, where: Path) -> None:
    """Refuse a config.json whose sizes the tensors' header contradicts, before anything is built.

    Building the model (even on the meta device) and listing its expected tensors both grow with
    `n_layer`, `n_embd` and the vocabulary: a config.json saying `n_layer: 10000000` would spend
    minutes and gigabytes before the shapes are compared. The block count, the embedding's
    (vocabulary, width) and the position table's length are all in the header, so comparing them
    first makes any impossible size fail at once; `match_keys` then checks every tensor.
    """
    found = {
        "n_layer": block_count(shapes),
        "vocab_size": shapes.get("wte.weight", (None, None))[0],
        "n_embd": shapes.get("wte.weight", (None, None))[-1],
        "n_positions": shapes.get("wpe.weight", (None,))[0],
    }
    wrong = [
        f"{name} {getattr(config, name)} where the tensors have {value}"
        for name, value in found.items()
        if value is not None and getattr(config, name) != value
    ]
    if wrong:
        detail = ""
        if len(wrong) == 1 and config.n_layer > found["n_layer"]:  # the first missing block, as match_keys names it
            first = official_shapes(dataclasses.replace(config, n_layer=found["n_layer"] + 1))
            detail = f" (missing tensors: {_names([name for name in first if name not in shapes])})"
        raise CheckpointError(
            f"'{config_path}' does not belong to '{where}': it says {'; '.join(wrong)}{detail}. "
            f"Use the {CONFIG} saved with these weights (or load the .safetensors file alone to infer the shape)."
        )


def block_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of transformer blocks, from the highest `h.N.` index among the tensor names."""
    return max((int(m.group(1)) for name in shapes if (m := re.match(r"h\.(\d+)\.", name))), default=-1) + 1


def infer_config(shapes: dict[str, tuple[int, ...]], where: Path) -> GPTConfig:
    """The shape of a model from its tensors alone, for a bare .safetensors file.

    Width and vocabulary come from `wte`, the context from `wpe`, the depth from the highest block
    index. The head count is not stored anywhere; every official GPT-2 uses heads of 64, so
    heads = width / 64.
    """
    for needed in ("wte.weight", "wpe.weight"):
        if needed not in shapes:
            raise CheckpointError(f"'{where}' has no tensor '{needed}'; it is not a GPT-2 checkpoint.")
    vocab_size, n_embd = shapes["wte.weight"]
    n_positions = shapes["wpe.weight"][0]
    if n_embd % 64:
        raise CheckpointError(
            f"'{where}': width {n_embd} is not a multiple of 64, so the head count cannot be inferred; "
            "put a config.json beside the weights and load the directory."
        )
    return GPTConfig(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=block_count(shapes),
        n_head=n_embd // 64,
        n_embd=n_embd,
    )


# ----- loading ----------------------------------------------------------------------------


def open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, or OSError for unreadable files
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({e}). It is probably truncated or corrupted: "
            "download or save it again (for a hub model, delete it from the Hugging Face cache first)."
            + other_checkpoints_hint(path)  # a training run's checkpoint: the others it has
        ) from None


def match_keys(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: Path) -> dict[str, str]:
    """Map each expected (unprefixed) name to its key in the file; raise on any mismatch."""
    found: dict[str, str] = {}
    unexpected: list[str] = []
    for key in stored:
        name = key.removeprefix(PREFIX)
        if MASK_BUFFERS.fullmatch(name) or name == "lm_head.weight":
            continue
        if name in expected and name not in found:
            found[name] = key
        else:
            unexpected.append(key)
    problems = []
    missing = [name for name in expected if name not in found]
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    wrong = [
        f"{found[name]} is {list(stored[found[name]])}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(stored[found[name]]) != shape
    ]
    if wrong:
        problems.append(
            "wrong shapes: " + "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    if problems:
        raise CheckpointError(
            f"'{where}' does not match a GPT-2 of this shape ({'; '.join(problems)}). "
            "Check that config.json belongs to these weights and that the file is a GPT-2 checkpoint."
        )
    return found


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `open_model` read, for the callers that need more than the model.

    `source` is the checkpoint as given (a name, a hub repo id, a folder, a run, a file): the
    tokenizer files to save beside the model come from it (`save_model(tokenizer_source=...)`), and
    PEFT's adapter names it as its base. `config_inferred` is True for a bare .safetensors file,
    whose shape was inferred from its tensors (see `infer_config`): a script may say so. Whether
    the model is quantized is the model's own to tell (`minigpt2.model.quantize.is_quantized`).
    """

    model: GPT
    source: str
    config_inferred: bool


def open_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """`load_model`, returning what it read as a `LoadedModel`: the model, its source, whether its
    shape was inferred."""
    device = resolve_device(device or "cpu")
    dtype = resolve_dtype(dtype or "float32", device)
    if (path := local_path(source)) is not None and is_adapter_folder(path):  # its base, adapted and merged
        model, inferred = read_adapted(path, device, dtype, revision), False
    else:
        config_path, weights_path = checkpoint_files(source, revision)
        model, inferred = read_model(config_path, weights_path, device, dtype), config_path is None
    if quantize is not None:  # once the file is closed and nothing else holds the float weights it replaces
        from minigpt2.model.quantize import quantize_model

        model = quantize_model(model, quantize)
    return LoadedModel(model, str(source), config_inferred=inferred)


def load_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    quantize: str | None = None,
) -> GPT:
    """Load a GPT-2 from a model name, hub repo id, checkpoint directory or .safetensors file.

    Args:
        source: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, a hub repo id in the GPT-2 layout,
            a directory with config.json + model.safetensors, or a single .safetensors file.
        device: where to put the model (`cpu`, `cuda`, `mps`, `auto`); default cpu.
        dtype: parameter dtype (`float32`, `bfloat16`, `float16`, or a torch.dtype); default float32.
        revision: a branch, tag or commit of a hub model.
        quantize: `int8` for int8 weight-only linear layers (faster decoding, inference only;
            see `minigpt2.model.quantize`). The file itself is always the float weights.

    The model is returned in eval mode. Loading is strict: a missing, unexpected or mis-shaped
    tensor, an integer or non-finite one, raises a `CheckpointError` naming it. A caller that needs
    to know where the model came from, or whether its shape was inferred, calls `open_model`.
    """
    return open_model(source, device=device, dtype=dtype, revision=revision, quantize=quantize).model


def read_checkpoint_config(source: str | os.PathLike, revision: str | None = None) -> GPTConfig:
    """A checkpoint's shape (config.json checked against the tensors' header), without reading weights."""
    config_path, weights_path = checkpoint_files(source, revision)
    with open_safetensors(weights_path) as f:
        return checkpoint_config(config_path, read_header(f, weights_path), weights_path)


def read_model(config_path: Path | None, weights_path: Path, device: torch.device, dtype: torch.dtype) -> GPT:
    """The float model of `load_model`, read tensor by tensor from its safetensors file."""
    with open_safetensors(weights_path) as f:
        stored = read_header(f, weights_path)
        config = checkpoint_config(config_path, stored, weights_path)
        keys = match_keys(stored, official_shapes(config), weights_path)

        # Build the model on its device without initialising random weights, then fill every
        # tensor from the file, one at a time.
        model = empty_model(config, device)
        model.to(dtype)  # converts each tensor in place: wte and lm_head stay one tensor
        params = model.state_dict()
        with torch.no_grad():
            for name, key in keys.items():
                tensor = get_tensor(f, key, weights_path)
                params[name].copy_(tensor.t() if is_conv1d(name) else tensor)
            lm_head = next((k for k in stored if k.removeprefix(PREFIX) == "lm_head.weight"), None)
            if lm_head is not None and not torch.equal(
                get_tensor(f, lm_head, weights_path), get_tensor(f, keys["wte.weight"], weights_path)
            ):
                raise CheckpointError(
                    f"'{weights_path}': lm_head.weight differs from wte.weight. minigpt2's GPT-2 ties the "
                    "output layer to the token embedding, so an untied checkpoint cannot be loaded faithfully."
                )
    model.eval()
    return model


def read_adapted(adapter_dir: Path, device: torch.device, dtype: torch.dtype, revision: str | None) -> GPT:
    """The base of a LoRA adapter folder with the adapter (and its trainable token rows) applied and
    merged: a plain GPT, what the run's merged model.safetensors holds too (see `minigpt2.io.adapter`)."""
    from safetensors.torch import load_file

    from minigpt2.model.lora import add_trainable_tokens, apply_lora, load_adapter_state, merged_state_dict

    beside = merged_checkpoint(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if beside is not None and not config.get("base_model_name_or_path"):  # a random start: the merged model
        return read_model(*checkpoint_files(beside), device, dtype)
    base, config = adapter_base(adapter_dir, config)
    try:
        model = read_model(*checkpoint_files(base, revision), device, torch.float32)
    except CheckpointError as e:
        raise CheckpointError(f"'{adapter_dir}' is a LoRA adapter of '{base}', which cannot be loaded: {e}") from None
    apply_lora(model, config["r"], config.get("lora_alpha"), 0.0, adapter_targets(adapter_dir, config))
    if config.get("trainable_token_indices"):
        add_trainable_tokens(model, config["trainable_token_indices"])
    load_adapter_state(model, load_file(str(adapter_dir / ADAPTER_WEIGHTS), device=str(device)))
    plain = empty_model(model.config, device)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.to(dtype).eval()


def get_tensor(f, key: str, where: Path) -> torch.Tensor:
    """One weight from an open safetensors file, refused unless it is floating point and finite.

    An integer tensor would be cast silently to the model's dtype (a checkpoint that was
    quantised or mislabelled), and a single NaN or inf spreads to every logit of every token:
    the model "loads" and then writes garbage. Checking here, tensor by tensor, costs one pass
    over each weight (a fraction of a second for the 124M model) and names the culprit.
    """
    try:
        tensor = f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(
            f"'{where}': tensor {key} cannot be read ({e}); the file is probably truncated or corrupted: "
            "download or save it again." + other_checkpoints_hint(where)
        ) from None
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"'{where}': tensor {key} holds {str(tensor.dtype).removeprefix('torch.')} values, but GPT-2 weights are "
            "floating point (float32, float16 or bfloat16); this is not a plain GPT-2 checkpoint (quantised?)."
        )
    if not torch.isfinite(tensor).all():
        nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise CheckpointError(
            f"'{where}': tensor {key} holds non-finite values ({nans} NaN, {infs} inf of {tensor.numel()}); the "
            "checkpoint is broken (a diverged training run?): use an earlier checkpoint."
        )
    return tensor


# ----- saving -----------------------------------------------------------------------------


def save_model(
    model: GPT,
    directory: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike | None = None,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as config.json + model.safetensors (+ vocab.json, merges.txt when known).

    The layout is exactly what transformers' `save_pretrained` writes for a `GPT2LMHeadModel`
    (`transformer.` prefix, Conv1D orientation, no lm_head: it is tied), so
    `GPT2LMHeadModel.from_pretrained(directory)` and `load_model(directory)` both read it.

    Tokenizer files are copied from `tokenizer_source` (a checkpoint folder, a hub name or a run,
    e.g. the `source` of `open_model`'s record) when given; without it none are written. An
    existing checkpoint in `directory` is never replaced unless `overwrite=True`; files are written
    under temporary names and renamed into place, so an interrupted save leaves no half-written
    checkpoint behind.

    `state_dict` replaces `model.state_dict()` when the model's own tensors are not whole, e.g.
    the full weights gathered from an FSDP-sharded model (`distributed.full_model_state`).
    """
    from safetensors.torch import save_file

    from minigpt2.model.quantize import is_quantized

    if is_quantized(model):
        raise CheckpointError(
            "this model is quantized (int8) for inference; a checkpoint always holds the float "
            "weights: save the model before quantizing it, or load the original checkpoint again."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to '{directory}': it is a file, not a directory.")
    if not overwrite and any((directory / name).exists() for name in (WEIGHTS, CONFIG)):
        raise CheckpointError(
            f"'{directory}' already holds a checkpoint; choose another directory (nothing was overwritten)."
        )
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        name = name.removeprefix("_orig_mod.")  # torch.compile's wrapper adds this prefix
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        tensors[PREFIX + name] = (tensor.t() if is_conv1d(name) else tensor).contiguous()

    config = model.config.to_hf_config()
    write_atomically(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    from minigpt2.io.tokenizer import TOKENIZER_FILES

    vocab_size = model.config.vocab_size
    tokenizer_dir = None
    if tokenizer_source is not None:
        tokenizer_dir = _tokenizer_dir(tokenizer_source, vocab_size)
    if tokenizer_dir is not None and tokenizer_dir.resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            write_atomically(directory / name, lambda tmp, name=name: shutil.copyfile(tokenizer_dir / name, tmp))
    return directory


def _tokenizer_dir(source: str | os.PathLike, vocab_size: int) -> Path | None:
    """The directory holding a source's own vocab.json and merges.txt (fetching them if from the
    hub); a `CheckpointError` for a source that has none."""
    from minigpt2.io.tokenizer import locate_tokenizer

    (vocab, merges), standing_in = locate_tokenizer(source, explicit=True, vocab_size=vocab_size)
    if standing_in:
        return None
    if vocab.parent != merges.parent:  # hub cache snapshots keep both in one folder; be safe anyway
        return None
    return vocab.parent
