"""minigpt2.analysis.causal: transplants, the logit lens and per-character changes, each checked
against a case whose answer is known (a B that differs from A in one unit only; a fine-tune with
one block trainable), and compare.py's --json holding the new fields."""

import copy
import dataclasses
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from clis import run_script

from minigpt2 import GPT, GPTConfig, save_model
from minigpt2.analysis.causal import (
    ReadOut,
    Transplanter,
    char_nats,
    layer_attribution,
    logit_lens,
    passages,
    plain_tensors,
    score_with_tokens,
    shares,
    text_changes,
    transplanted,
    unit_of,
    units,
)
from minigpt2.errors import CheckpointError
from minigpt2.model.evaluate import char_counts, score_text, text_stream
from minigpt2.model.snapshots import capture_block_outputs

TINY = GPTConfig(n_layer=3, n_head=2, n_embd=32, n_positions=32, vocab_size=1024)


def random_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # random biases and LayerNorms too, so no unit is the identity
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def changed(model: GPT, unit: str, seed: int = 1) -> GPT:
    """A copy of `model` with every tensor of `unit` moved at random."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if unit_of(name) == unit:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return other


def dense(enc, text: str, tokens: int) -> tuple[list[int], np.ndarray]:
    """A real text as a scoring stream over a small vocabulary: GPT-2's tokens of `text` (EOT first)
    renumbered densely in order of appearance, with each one's characters, so a tiny model's output
    layer is small and its evaluations fast."""
    stream, _ = text_stream(enc, text, tokens)
    ids = {t: i for i, t in enumerate(dict.fromkeys(stream))}
    counts = char_counts(enc)
    chars = np.zeros(VOCAB, dtype=np.int64)
    for token, i in ids.items():
        chars[i] = counts[token]
    return [ids[t] for t in stream], chars


VOCAB = 1024  # the tiny models' vocabulary: enough for the renumbered tokens of a few thousand characters


@pytest.fixture(scope="module")
def text(enc, test_data):
    """A Chinese excerpt (red chamber) in the tiny models' renumbered vocabulary."""
    return dense(enc, (test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8"), 300)


def bpc(model, text) -> float:
    stream, chars = text
    return score_text(model, stream, chars).bits_per_char


@pytest.mark.parametrize("unit", ["embedding", "h.0", "h.1", "h.2", "ln_f"])
def test_a_change_in_one_unit_is_found_in_that_unit_alone(unit, text):
    a = random_model()
    b = changed(a, unit)
    bpc_a, bpc_b = bpc(a, text), bpc(b, text)
    assert abs(bpc_a - bpc_b) > 1e-3  # the change matters on this text
    rows = layer_attribution(a, b, *text)
    assert [r["unit"] for r in rows] == units(3)
    for row in rows:
        if row["unit"] == unit:  # A with B's unit is B, and B with A's unit is A
            assert row["bpc_a_with_b"] == pytest.approx(bpc_b, rel=1e-6)
            assert row["bpc_b_with_a"] == pytest.approx(bpc_a, rel=1e-6)
        else:  # every other unit is the same in both: moving it changes nothing
            assert row["bpc_a_with_b"] == pytest.approx(bpc_a, rel=1e-6)
            assert row["bpc_b_with_a"] == pytest.approx(bpc_b, rel=1e-6)
    found = {s["unit"]: s for s in shares(rows, bpc_a, bpc_b)}
    assert found[unit]["alone"] == pytest.approx(1.0, rel=1e-4)
    assert found[unit]["needed"] == pytest.approx(1.0, rel=1e-4)


def test_all_units_at_once_give_b_and_the_models_are_left_as_they_were(text):
    a = random_model()
    b = random_model(seed=5)  # every unit differs
    before = {k: v.clone() for k, v in a.state_dict().items()}
    lab = Transplanter(a, b)
    stream, chars = text
    assert lab.score("a", units(3), stream, chars).bits_per_char == pytest.approx(bpc(b, text), rel=1e-6)
    assert lab.score("b", units(3), stream, chars).bits_per_char == pytest.approx(bpc(a, text), rel=1e-6)
    assert lab.score("a", [], stream, chars).bits_per_char == pytest.approx(bpc(a, text), rel=1e-6)
    # the working model got its own tensors back after each transplant (the `finally`)
    assert all(torch.equal(p, lab.tensors["a"][n]) for n, p in lab.model.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())


def test_the_output_layer_moves_with_the_embedding(text):
    a, b = random_model(), random_model(seed=5)
    lab = Transplanter(a, b)
    with_b = lab.become("a")
    with transplanted(with_b, lab.tensors["b"], ["embedding"]) as model:
        assert model.lm_head.weight is model.wte.weight
        assert torch.equal(model.lm_head.weight, b.wte.weight)
    assert torch.equal(with_b.lm_head.weight, a.wte.weight)


def test_the_logit_lens_ends_at_the_models_own_bpc_and_reads_each_depth(text):
    a = random_model()
    curve = logit_lens(a, *text)
    assert len(curve) == TINY.n_layer + 1
    assert curve[-1] == pytest.approx(bpc(a, text), abs=1e-5)
    # depth 1 is the residual stream after h.0, as the hooks capture it, through ln_f and lm_head
    stream, chars = text
    idx = torch.tensor([stream[:32]])
    with capture_block_outputs(a, ["h.0", "h.1.mlp"]) as captured:
        a(idx)
    assert set(captured) == {"h.0", "h.1.mlp"} and captured["h.1.mlp"].shape == (1, 32, 32)
    assert torch.allclose(ReadOut(a, 1)(idx), a.lm_head(a.ln_f(captured["h.0"])), atol=1e-5)
    assert not any(m._forward_hooks for m in a.modules())  # hooks removed


def test_a_grown_vocabulary_runs_in_bs_tokens_with_as_rows_extended():
    a = random_model()
    grown = dataclasses.replace(TINY, vocab_size=TINY.vocab_size + 8)
    b = GPT(grown).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "wte" not in k and "lm_head" not in k}, strict=False)
    with torch.no_grad():
        b.wte.weight[: TINY.vocab_size] = a.wte.weight * 1.1
        b.wte.weight[TINY.vocab_size :] = torch.randn(8, 32) * 0.1
        b.h[1].mlp.c_fc.weight.add_(0.1)
    lab = Transplanter(a, b)
    assert lab.grown == 8
    wte = lab.tensors["a"]["wte.weight"]  # A extended: its own rows, then B's new ones
    assert torch.equal(wte[: TINY.vocab_size], a.wte.weight) and torch.equal(wte[TINY.vocab_size :], b.wte.weight[-8:])
    stream = [0, *range(100, 140), TINY.vocab_size + 3, *range(200, 230), TINY.vocab_size + 7, 5]
    chars = np.ones(grown.vocab_size, dtype=np.int64)
    assert lab.score("a", units(3), stream, chars).bits_per_char == pytest.approx(
        score_text(b, stream, chars).bits_per_char, rel=1e-6
    )
    with pytest.raises(CheckpointError, match="fewer vocabulary rows"):
        Transplanter(b, a)


def test_different_shapes_are_refused_in_one_line():
    with pytest.raises(CheckpointError, match=r"different shapes \(layers 3 vs 2\)") as e:
        Transplanter(random_model(), random_model(dataclasses.replace(TINY, n_layer=2)))
    assert "\n" not in str(e.value)


def test_lora_is_transplanted_merged_and_int8_dequantized(text):
    from minigpt2.model.lora import apply_lora, merged_state_dict
    from minigpt2.model.quantize import quantize_model

    a = random_model()
    b = apply_lora(copy.deepcopy(a), r=2, seed=0)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    merged = merged_state_dict(b)
    tensors = plain_tensors(b)
    assert torch.equal(tensors["h.0.attn.c_attn.weight"], merged["h.0.attn.c_attn.weight"])
    lab = Transplanter(a, b)
    assert lab.score("a", units(3), *text).bits_per_char == pytest.approx(bpc(b, text), rel=1e-5)

    q = quantize_model(copy.deepcopy(a))
    layer = q.h[0].mlp.c_fc
    assert torch.equal(plain_tensors(q)["h.0.mlp.c_fc.weight"], layer.weight.float() * layer.scale[:, None])
    assert "lm_head.weight" not in plain_tensors(q) and "h.0.mlp.c_fc.scale" not in plain_tensors(q)


def test_a_finetune_of_one_block_puts_the_gain_in_that_block(enc, test_data):
    """A real fine-tune: A trained a little on English, B = A trained on Chinese with only h.1
    trainable. The gain on held-out Chinese is carried by h.1; the lens agrees until h.1."""
    zh = (test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")
    stream, chars = dense(enc, zh[:12000], 5000)
    train_ids, held_out = torch.tensor(stream[:4000]), stream[4000:]
    torch.manual_seed(0)
    a = GPT(dataclasses.replace(TINY, dropout=0.0))
    b = copy.deepcopy(a).train()
    for name, p in b.named_parameters():
        p.requires_grad_(name.startswith("h.1."))
    opt = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(train_ids) - 33, (8,), generator=g)
        rows = torch.stack([train_ids[s : s + 33] for s in starts])  # (8, 33)
        _, loss = b(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    a.eval(), b.eval()
    text = ([0, *held_out], chars)
    bpc_a, bpc_b = bpc(a, text), bpc(b, text)
    assert bpc_b < bpc_a - 0.2  # it learned
    rows = layer_attribution(a, b, *text)
    found = {s["unit"]: s for s in shares(rows, bpc_a, bpc_b)}
    assert found["h.1"]["alone"] > 0.9 and found["h.1"]["needed"] > 0.9
    assert max(abs(found[u]["alone"]) for u in found if u != "h.1") < 0.05
    lens_a, lens_b = logit_lens(a, *text), logit_lens(b, *text)
    assert lens_a[:2] == pytest.approx(lens_b[:2], abs=1e-6)  # after the embedding and h.0: unchanged
    assert lens_b[2] < lens_a[2] - 0.1  # after h.1: the change shows


def test_per_character_changes_add_up_and_find_the_passage(enc):
    text = "今天的天气很好。我们去公园散步。The weather is nice today."
    stream, _ = text_stream(enc, text)
    chars = char_counts(enc)
    model = random_model(dataclasses.replace(TINY, vocab_size=enc.n_vocab))
    score, nats = score_with_tokens(model, stream, chars)
    assert len(nats) == len(stream) - 1 and sum(nats) == pytest.approx(score.nats, rel=1e-6)
    spelled, per_char = char_nats(enc, stream, nats)
    assert spelled == text and len(per_char) == len(text)
    assert per_char.sum() == pytest.approx(score.nats, rel=1e-6)
    # B better by 2 bits on every character of the second sentence only
    delta = np.zeros(len(text))
    second = text.index("我")
    delta[second : text.index("。", second) + 1] = -2.0
    found = passages(text, delta)
    assert found["gained"][0]["text"] == "我们去公园散步。" and found["lost"] == []
    assert found["gained"][0]["delta_bits"] == pytest.approx(-16.0)
    changes = text_changes(enc, stream, nats, enc, stream, [n + 0.5 for n in nats])
    assert changes["excerpt"]["text"] == text
    assert sum(changes["excerpt"]["delta_bits"]) == pytest.approx(0.5 * len(nats) / math.log(2), rel=1e-3)


def test_compare_json_holds_the_attribution_and_the_lens(tmp_path, test_data):
    a = random_model(dataclasses.replace(TINY, vocab_size=50257))
    b = changed(a, "h.1")
    tok = test_data / "gpt2"
    pa = save_model(a, tmp_path / "a", tokenizer_source=tok)
    pb = save_model(b, tmp_path / "b", tokenizer_source=tok)
    out, page = tmp_path / "c.json", tmp_path / "c.html"
    zh = test_data / "zh" / "水浒传.txt"
    r = run_script("compare.py", pa, pb, "--text", zh, "--max-eval-tokens", 256, "--json", out, "--html", page,
                   timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "transplants on 水浒传.txt: 2 x (3 + 2) = 10 evaluations" in r.stderr or "transplants" in r.stdout
    html = page.read_text(encoding="utf-8")
    assert 'id="layers"' in html and 'id="where"' in html
    where = html[html.index('id="where"') :]
    assert "《水浒传》" in where and "background:rgba(" in where  # the excerpt, its characters shaded
    behaviour = json.loads(out.read_text(encoding="utf-8"))["behaviour"][0]
    rows = behaviour["layer_attribution"]
    assert [row["unit"] for row in rows] == ["embedding", "h.0", "h.1", "h.2", "ln_f"]
    assert set(rows[0]) == {"unit", "bpc_a_with_b", "bpc_b_with_a"}
    assert len(behaviour["logit_lens"]["a"]) == len(behaviour["logit_lens"]["b"]) == 4
    assert behaviour["logit_lens"]["b"][-1] == pytest.approx(behaviour["b"]["bits_per_char"], abs=1e-5)
    assert rows[2]["bpc_a_with_b"] == pytest.approx(behaviour["b"]["bits_per_char"], rel=1e-6)
    assert rows[0]["bpc_a_with_b"] == pytest.approx(behaviour["a"]["bits_per_char"], rel=1e-6)
    assert "== Which units carry the change" in r.stdout and "gained most" in r.stdout
    quick = run_script("compare.py", pa, pb, "--text", zh, "--max-eval-tokens", 256, "--no-layers", timeout=180)
    assert quick.returncode == 0 and "Which units" not in quick.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium fonts-noto-cjk)")
def test_the_shaded_excerpt_renders_in_a_real_browser(enc, tmp_path):
    """Headless chromium draws the new sections at a phone's width: not blank, and the shading is
    there (green and red pixels), under the characters it shades."""
    from minigpt2.analysis.htmlreport import _layers, _where, page

    text = "话说大宋仁宗天子在位，嘉佑三年三月三日五更三点。The weather is nice today. 天子驾坐紫宸殿。"
    delta = [(-3.0 if i < 12 else 3.0 if i > len(text) - 10 else 0.0) for i in range(len(text))]
    rows = [{"unit": u, "bpc_a_with_b": 5.0, "bpc_b_with_a": 4.0} for u in units(2)]
    t = {"file": "水浒传.txt", "layer_attribution": rows, "shares": shares(rows, 5.5, 4.5),
         "transplant_base": {"a": 5.5, "b": 4.5}, "logit_lens": {"a": [9, 7, 5.5], "b": [9, 6, 4.5]},
         "changes": {"excerpt": {"text": text, "delta_bits": delta},
                     "passages": passages(text, np.array(delta))}}  # fmt: skip
    path = tmp_path / "r.html"
    path.write_text(page("causal", [_layers({"behaviour": [t]}), _where({"behaviour": [t]})]), encoding="utf-8")
    shot = tmp_path / "shot.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=390,1600",
               f"--screenshot={shot}", path.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr
    from matplotlib import image

    pixels = image.imread(shot)[..., :3]  # (height, width, 3)
    assert pixels.std() > 0.05
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((g > r + 0.05) & (g > b + 0.05)).sum() > 200  # green behind the characters B gained on
    assert ((r > g + 0.05) & (r > b + 0.05)).sum() > 200  # red behind those it lost on


def test_the_python_api_takes_a_text_and_a_tokenizer_or_a_token_tensor(enc):
    import sys

    import minigpt2.analysis as analysis

    text = "今天的天气很好。我们去公园散步。The weather is nice today."
    stream, _ = text_stream(enc, text)
    model = random_model(dataclasses.replace(TINY, vocab_size=enc.n_vocab))
    b = changed(model, "h.2")
    by_text = analysis.logit_lens(model, text, enc=enc)
    assert by_text == analysis.logit_lens(model, torch.tensor(stream), char_counts(enc))
    rows = analysis.layer_attribution(model, b, text, enc=enc)
    assert rows == analysis.layer_attribution(model, b, torch.tensor(stream), enc=enc)
    found = analysis.where_changed(model, b, text, enc)
    assert found["excerpt"]["text"] == text
    assert "torch" in sys.modules and analysis.capture_block_outputs is capture_block_outputs


def test_compare_skips_the_transplants_in_one_line_where_b_has_fewer_rows(enc, tmp_path):
    from minigpt2.analysis.causal import layer_sections

    config = dataclasses.replace(TINY, vocab_size=enc.n_vocab)
    b = random_model(config)
    a = GPT(dataclasses.replace(config, vocab_size=enc.n_vocab + 8)).eval()  # A grown, B not: no transplants
    a_path, b_path = save_model(a, tmp_path / "a"), save_model(b, tmp_path / "b")
    stream, _ = text_stream(enc, "今天的天气很好。我们去公园散步。")
    texts = [{"file": "t.txt", "ids": {"A": stream, "B": stream}}]
    (found,) = layer_sections(a_path, b_path, texts, {"A": enc, "B": enc})
    assert found["layer_attribution"] == [] and "fewer vocabulary rows" in found["transplants_skipped"]
    assert found["logit_lens"]["b"][-1] == pytest.approx(bpc(b, (stream, char_counts(enc))), abs=1e-5)
