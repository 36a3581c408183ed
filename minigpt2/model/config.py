"""Model hyperparameters: the five numbers that decide a GPT-2's shape, plus dropout.

The four official sizes differ only in width, depth and head count; all share the 50,257-token
byte-level BPE vocabulary and a 1,024-token context. Hugging Face stores the same numbers in a
`config.json` under slightly different names (`n_positions`, `layer_norm_epsilon`, ...), so this
module also converts to and from that file, which lets a checkpoint written by minigpt2 load in
transformers and the other way round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minigpt2.checks import finite, positive_int
from minigpt2.errors import CheckpointError, OptionError


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2.

    Attributes:
        vocab_size: number of token ids (50,257: 256 bytes + 50,000 merges + `<|endoftext|>`).
        n_positions: context length, the number of learned position embeddings.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; `n_embd` must divide evenly among them.
        n_embd: width of the residual stream.
        layer_norm_eps: the epsilon added to the variance inside every LayerNorm.
        dropout: dropout probability for embeddings, attention weights and residual branches
            (the official models were trained with 0.1; fine-tuning often uses 0.0).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # OptionError is a ValueError too. Checked here, so a config.json with "n_head": "12" or
        # "layer_norm_epsilon": -1 (or NaN, which passes every `< 0` test) never builds a model.
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise OptionError(
                "n_embd",
                f"({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets an equal slice of the width",
            )
        finite("layer_norm_eps", self.layer_norm_eps, low=0, low_open=True)
        finite("dropout", self.dropout, low=0, high=1, high_open=True)

    @property
    def head_size(self) -> int:
        """Width of one attention head (64 in every official GPT-2)."""
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """One of the four official sizes, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ----- Hugging Face config.json -------------------------------------------------------

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` that transformers' `GPT2LMHeadModel` expects for this shape."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_eps,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, where: str = "config.json") -> GPTConfig:
        """Read a Hugging Face GPT-2 `config.json` (already parsed into a dict).

        Variants the hand-written model does not implement (another activation, a custom MLP
        width, untied embeddings, layer-scaled attention) are refused with a message naming the
        setting, rather than loaded into a model that would silently compute something else.
        """
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise CheckpointError(
                f"{where}: model_type is {model_type!r}, but minigpt2 only implements GPT-2 "
                "('gpt2'); pick a GPT-2 checkpoint"
            )
        unsupported = {
            "activation_function": ("gelu_new", hf.get("activation_function", "gelu_new")),
            "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
            "tie_word_embeddings": (True, hf.get("tie_word_embeddings", True)),
            "add_cross_attention": (False, hf.get("add_cross_attention", False)),
        }
        n_embd = hf.get("n_embd", 768)
        n_inner = hf.get("n_inner")
        if n_inner is not None and isinstance(n_embd, int) and n_inner != 4 * n_embd:
            unsupported["n_inner"] = (None, n_inner)
        for key, (want, got) in unsupported.items():
            if want != got:
                raise CheckpointError(
                    f"{where}: {key}={got!r} is not supported (minigpt2 implements the original "
                    f"GPT-2, where it is {want!r})"
                )
        try:
            return cls(
                vocab_size=hf.get("vocab_size", 50257),
                n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_layer=hf.get("n_layer", 12),
                n_head=hf.get("n_head", 12),
                n_embd=n_embd,
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                dropout=hf.get("resid_pdrop", 0.1),  # transformers' default too
            )
        except OptionError as e:  # named as in the file: layer_norm_epsilon, not layer_norm_eps
            field = HF_NAMES.get(e.option, e.option)
            raise CheckpointError(f"{where}: {field} {e.detail}; the file is damaged or not a GPT-2 config") from None


# GPTConfig's field -> its name in a Hugging Face config.json, for error messages
HF_NAMES = {"layer_norm_eps": "layer_norm_epsilon", "dropout": "resid_pdrop"}

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
