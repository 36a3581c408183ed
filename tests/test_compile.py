"""torch.compile sees one whole graph, compiled once: the training step and both decode steps.

A graph break splits a step into pieces run with Python in between; a recompile throws the
compiled code away and compiles again. Either costs a GPU most of its speed, and both show on a
CPU: dynamo's `CompileCounter` backend counts the graphs it is handed, without compiling them.
"""

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from minigpt2 import GPT, GPTConfig
from minigpt2.generation.generate import generate_tokens
from minigpt2.training.data import TokenFile
from minigpt2.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.slow  # dynamo traces the model: 25-40 s each on the shared 2-core machine


@pytest.fixture
def counted_compile(monkeypatch):
    """torch.compile with every option kept but the backend: a CompileCounter; recompiling is an error."""
    counter, compile = CompileCounter(), torch.compile

    def counting(fn, **options):
        options.pop("mode", None)  # a mode chooses inductor options; the counter is no inductor
        return compile(fn, backend=counter, **options)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    yield counter
    torch._dynamo.reset()


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=500, n_positions=32, n_layer=2, n_head=2, n_embd=32))


def test_compiled_training_step_is_one_graph_compiled_once(counted_compile, tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 500, 4096, dtype=np.uint16).tofile(path)
    config = TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=0, warmup=2)
    trainer = Trainer(tiny(), TokenFile(path, chars=4096), {}, config, tmp_path / "run", compile=True)
    trainer.read_every = 4  # as on a GPU: steps that are not read
    losses = [trainer.train_step(read=False)["loss"] for _ in range(4)]
    assert counted_compile.frame_count == 1  # one graph: no break, no recompile over warm-up and decay
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("static", [False, True], ids=["eager-dynamic-shapes", "static"])
def test_compiled_decode_step_is_one_graph_compiled_once(counted_compile, static):
    model = tiny().eval()
    prompts = [[1, 2, 3], [4]]  # padded, and 40 new tokens cross the 32-token context: the window restarts
    expected = list(generate_tokens(model, prompts, 40))
    assert list(generate_tokens(model, prompts, 40, compile=True, static=static)) == expected
    assert counted_compile.frame_count == 1
