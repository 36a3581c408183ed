import dataclasses

import pytest
import torch

from minigpt2 import GPT, PRESETS, CheckpointError, GPTConfig


@pytest.mark.parametrize(
    "name, count",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_params() == count


def test_hf_config_round_trip_and_transformers_agrees():
    from transformers import GPT2Config

    for config in PRESETS.values():
        hf = config.to_hf_config()
        assert GPTConfig.from_hf_config(hf) == config
        # transformers reads our config.json into the same shape
        t = GPT2Config(**hf)
        assert (t.n_layer, t.n_head, t.n_embd, t.n_positions, t.vocab_size) == (
            config.n_layer,
            config.n_head,
            config.n_embd,
            config.n_positions,
            config.vocab_size,
        )
    # and we read transformers' own config.json
    t = GPT2Config(n_layer=5, n_head=3, n_embd=63, n_positions=77, layer_norm_epsilon=1e-6, resid_pdrop=0.2)
    assert GPTConfig.from_hf_config(t.to_dict()) == GPTConfig(
        n_layer=5, n_head=3, n_embd=63, n_positions=77, layer_norm_eps=1e-6, dropout=0.2
    )


def test_preset_overrides():
    c = GPTConfig.from_preset("gpt2", n_layer=2, dropout=0.1)
    assert (c.n_layer, c.n_embd, c.dropout) == (2, 768, 0.1)
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_name(change, message):
    hf = {**PRESETS["gpt2"].to_hf_config(), **change}
    with pytest.raises(CheckpointError, match=message):
        GPTConfig.from_hf_config(hf)


def test_config_is_validated():
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        dataclasses.replace(PRESETS["gpt2"], dropout=1.5)
