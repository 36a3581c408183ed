"""The real huggingface_hub code path, offline, against a fake cache (see conftest.py)."""

import pytest
import torch
from checkpoints import random_hf_model, write_official_layout

from minigpt2 import CheckpointError, load_model, load_tokenizer, save_model


def test_load_model_by_short_name_from_the_cache(hub_gpt2):
    idx = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(2))
    for source in ("gpt2", "openai-community/gpt2"):
        model = load_model(source)
        with torch.no_grad():
            torch.testing.assert_close(model(idx), hub_gpt2(idx).logits, rtol=0, atol=1e-4)
    assert load_model("gpt2", revision="main").config.n_layer == 2


def test_load_tokenizer_from_the_cache(hub_gpt2, hf_home):
    enc = load_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.decode(enc.encode("今天的天气")) == "今天的天气"


def test_offline_and_not_cached(hub_gpt2):
    with pytest.raises(
        CheckpointError, match=r"openai-community/gpt2-medium.*not in the Hugging Face cache.*HF_HUB_OFFLINE=1"
    ):
        load_model("gpt2-medium")
    with pytest.raises(CheckpointError, match="someone/missing"):
        load_model("someone/missing")


def test_unknown_revision(hub_gpt2):
    with pytest.raises(CheckpointError, match="v9"):
        load_model("gpt2", revision="v9")


def test_hub_model_saved_locally_keeps_its_tokenizer(hub_gpt2, tmp_path, test_data):
    out = save_model(load_model("gpt2"), tmp_path / "copy", tokenizer_source="gpt2")
    assert (out / "merges.txt").read_bytes() == (test_data / "gpt2" / "merges.txt").read_bytes()
    assert load_tokenizer(out).encode("Hello world") == [15496, 995]


def test_checkpoint_without_tokenizer_files_uses_gpt2s(hub_gpt2, tmp_path):
    ckpt = write_official_layout(random_hf_model(n_layer=1, n_head=1, n_embd=64, n_positions=32), tmp_path / "bare")
    assert not (ckpt / "vocab.json").exists()
    assert load_tokenizer(ckpt).encode("Hello world") == [15496, 995]
