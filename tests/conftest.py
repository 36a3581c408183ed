"""Shared test setup: a private, offline Hugging Face cache and the shared data folder.

The environment is set before anything imports huggingface_hub, which reads HF_HOME and
HF_HUB_OFFLINE once at import: every test runs against an empty cache in a temporary folder
with downloads switched off, so nothing here can reach (or depend on) the network.
"""

import os
import shutil
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="minigpt2-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(var, None)

import pytest  # noqa: E402
from checkpoints import populate_hub_cache, random_hf_model  # noqa: E402

DATA_ENV = "MINIGPT2_SHARED_DATA"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (GPT-2 tokenizer files, Chinese and English texts).

    Found through $MINIGPT2_SHARED_DATA, never a hard-coded path. Missing on a user's machine,
    the tests that need it are skipped with this reason; in CI (CI=true) that is a failure.
    """
    value = os.environ.get(DATA_ENV)
    path = Path(value) if value else None
    if path is None or not (path / "gpt2" / "vocab.json").is_file():
        reason = (
            f"shared data not found: set {DATA_ENV} to the folder holding gpt2/vocab.json, zh/ and en/ (now {value!r})"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def hub_gpt2(shared_data, hf_home):
    """`openai-community/gpt2` in the Hugging Face cache: a tiny random GPT-2 in the official
    layout plus the real tokenizer files. Returns the transformers model it was written from."""
    model = random_hf_model(n_layer=2, n_head=2, n_embd=128, n_positions=128, seed=1234)
    populate_hub_cache(
        hf_home / "hub",
        "openai-community/gpt2",
        model,
        extra_files={name: shared_data / "gpt2" / name for name in ("vocab.json", "merges.txt")},
    )
    return model
