"""Loading and saving checkpoints: layouts, round trips, and every way a checkpoint can be wrong."""

import json
import shutil

import pytest
import torch
from checkpoints import official_state_dict, random_hf_model, write_official_layout
from safetensors.torch import load_file, save_file

from minigpt2 import CheckpointError, load_model, save_model
from minigpt2.io.weights import LoadedModel, official_shapes, open_model
from minigpt2.model.quantize import is_quantized


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(n_layer=2, n_head=2, n_embd=128, n_positions=64, seed=11)


@pytest.fixture
def official(hf, tmp_path):
    return write_official_layout(hf, tmp_path / "official")


IDX = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(5))


def assert_same_logits(model, hf):
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), hf(IDX).logits, rtol=0, atol=1e-4)


def test_conv1d_weights_are_transposed_by_value_not_just_shape(hf, official):
    model = load_model(official)
    # attn.c_proj is square: a missing transpose would load without error, so compare values.
    stored = hf.transformer.h[1].attn.c_proj.weight
    assert stored.shape[0] == stored.shape[1]
    torch.testing.assert_close(model.h[1].attn.c_proj.weight, stored.t(), rtol=0, atol=0)
    assert not torch.equal(model.h[1].attn.c_proj.weight, stored)
    torch.testing.assert_close(model.h[0].mlp.c_fc.weight, hf.transformer.h[0].mlp.c_fc.weight.t(), rtol=0, atol=0)


def test_bare_safetensors_file_infers_the_config(hf, official):
    model = load_model(official / "model.safetensors")
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (2, 2, 128, 64, 50257)
    assert_same_logits(model, hf)


def test_open_model_returns_what_it_read_and_pins_nothing_on_the_model(official):
    folder, bare = open_model(official), open_model(official / "model.safetensors", quantize="int8")
    assert isinstance(folder, LoadedModel) and folder.source == str(official) and not folder.config_inferred
    assert bare.source == str(official / "model.safetensors") and bare.config_inferred
    assert not is_quantized(folder.model) and is_quantized(bare.model)  # the one way to tell: the modules
    for model in (folder.model, bare.model, load_model(official)):
        assert not {"source", "inferred_config", "quantized"} & set(vars(model))


def test_prefix_and_tied_lm_head_are_accepted(hf, tmp_path):
    tensors = {"transformer." + k: v for k, v in official_state_dict(hf).items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_same_logits(load_model(tmp_path / "model.safetensors"), hf)


def test_dtype_and_eval_mode(official):
    model = load_model(official, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    assert model.lm_head.weight is model.wte.weight


def test_save_load_round_trip_is_bit_exact_and_transformers_reads_it(hf, official, tmp_path):
    from transformers import GPT2LMHeadModel

    model = load_model(official)
    out = save_model(model, tmp_path / "saved")
    again = load_model(out)
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # the file holds transformers' layout: prefixed, Conv1D orientation, no lm_head
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored and "transformer.h.0.attn.c_attn.weight" in stored
    assert set(stored) == {"transformer." + k for k in official_shapes(model.config)}
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDX).logits, model(IDX), rtol=0, atol=1e-5)
    assert_same_logits(again, hf)


def test_save_never_overwrites_a_checkpoint(official, tmp_path):
    model = load_model(official)
    out = save_model(model, tmp_path / "saved")
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.ln_f.bias.add_(1.0)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_model(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    save_model(model, out, overwrite=True)
    assert torch.equal(load_model(out).ln_f.bias, model.ln_f.bias)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left


def test_save_copies_tokenizer_files(official, tmp_path, test_data):
    model = load_model(official)
    out = save_model(model, tmp_path / "saved", tokenizer_source=test_data / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (test_data / "gpt2" / name).read_bytes()
    # a model opened from that directory carries them along when saved again, from the source its record names
    loaded = open_model(out)
    out2 = save_model(loaded.model, tmp_path / "again", tokenizer_source=loaded.source)
    assert (out2 / "vocab.json").is_file() and (out2 / "merges.txt").is_file()


def test_compiled_model_saves_clean_names(official, tmp_path):
    model = load_model(official)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    wrapped.config = model.config
    out = save_model(wrapped, tmp_path / "compiled")
    assert not any("_orig_mod" in k for k in load_file(str(out / "model.safetensors")))
    assert torch.equal(load_model(out).wte.weight, model.wte.weight)


# ----- bad checkpoints: one clear error naming the problem ---------------------------------


def _edit(official, tmp_path, edit):
    tensors = load_file(str(official / "model.safetensors"))
    edit(tensors)
    target = tmp_path / "edited"
    target.mkdir()
    shutil.copy(official / "config.json", target / "config.json")
    save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("h.1.mlp.c_fc.bias"), r"missing tensors: h\.1\.mlp\.c_fc\.bias"),
        (
            lambda t: t.__setitem__("h.0.attn.c_proj.weight", torch.zeros(128, 100)),
            r"wrong shapes: h\.0\.attn\.c_proj\.weight is \[128, 100\], expected \[128, 128\]",
        ),
        (lambda t: t.__setitem__("h.0.attn.extra", torch.zeros(3)), r"unexpected tensors: h\.0\.attn\.extra"),
        (
            lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["wte.weight"])),
            "lm_head.weight differs from wte.weight",
        ),
    ],
)
def test_checkpoint_mismatches_are_named(official, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(_edit(official, tmp_path, edit))


def test_config_that_does_not_fit_the_weights(official):
    cfg = json.loads((official / "config.json").read_text())
    cfg["n_layer"] = 3
    (official / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors: h\.2\.ln_1\.weight"):
        load_model(official)


def test_truncated_safetensors(official):
    path = official / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(official)


def test_corrupted_safetensors_header(official):
    path = official / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage that is not JSON at all"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(official)


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never loads"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model 'gpt5' not found.*gpt2, gpt2-medium"):
        load_model("gpt5")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_model(tmp_path / "weights.pt")


def test_not_a_gpt2(tmp_path):
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor 'wte.weight'"):
        load_model(tmp_path / "model.safetensors")


def test_loading_draws_no_random_weights_first(official, hf, monkeypatch):
    """load_model builds the model where it will live and fills it from the file; it never draws
    random initial values first (on the meta device that imported torch._dynamo: 2-3 s of every
    sample.py and compare.py start). Every random initialiser fails here, and loading still works."""

    def refuse(*args, **kwargs):
        raise AssertionError("a random initial value was drawn while loading")

    for name in ("normal_", "uniform_", "bernoulli_", "exponential_"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    model = load_model(official)
    assert_same_logits(model, hf)
    assert model.lm_head.weight is model.wte.weight
    half = load_model(official, dtype="bfloat16")
    assert half.lm_head.weight is half.wte.weight and half.wte.weight.dtype == torch.bfloat16
    with pytest.raises(AssertionError, match="random initial value"):  # the check can fail: building a GPT draws
        from minigpt2.model.gpt import GPT

        GPT(model.config)
