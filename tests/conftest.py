"""Shared test setup: a private, offline Hugging Face cache, the test texts and shared fixtures.

The environment is set before anything imports huggingface_hub, which reads HF_HOME and
HF_HUB_OFFLINE once at import: every test runs against an empty cache in a temporary folder
with downloads switched off, so nothing here can reach (or depend on) the network.

Texts: `test_data` is what every test reads by default: GPT-2's tokenizer files shipped in the
package (minigpt2/assets/gpt2) and excerpts of the public-domain texts in tests/data (see its
README), in the layout of the shared data folder, so a fresh clone runs every test of the fast
tier. `shared_data` is the whole shared folder, for the few slow tests that need whole novels.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="minigpt2-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(var, None)

import pytest  # noqa: E402
from checkpoints import populate_hub_cache, random_hf_model  # noqa: E402

from minigpt2.io.tokenizer import GPT2_DIR, load_tokenizer  # noqa: E402

DATA_ENV = "MINIGPT2_SHARED_DATA"
TEST_DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_finish(session):
    """Slow tests that run the scripts are collected (the subprocess batteries, torchrun): start the
    zygote that runs those that need a process of their own (tests/zygote.py) now, its imports beside
    the first tests, rather than when the first run waits for it. The fast tier calls the scripts in
    this process (tests/clis.py: call_main) and starts the zygote only if a test asks for it."""
    clis = sys.modules.get("clis")
    slow = any(item.get_closest_marker("slow") is not None for item in session.items)
    if clis is not None and slow and not session.config.option.collectonly:
        clis.prestart_zygote()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The fast tier runs in a fresh clone, without the shared data folder (CI runs it so): a test
    that reads the whole novels belongs to the slow tier."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} reads the shared data folder (the whole novels), so it must be "
                                    "marked slow: the fast tier runs in a fresh clone without that folder")  # fmt: skip


@pytest.fixture(scope="session")
def test_data(tmp_path_factory) -> Path:
    """gpt2/ (the package's tokenizer files), zh/ and en/ (tests/data's excerpts) in one folder,
    laid out as the shared data folder is: always there, in any clone."""
    root = tmp_path_factory.mktemp("test-data")
    for name, target in (("gpt2", GPT2_DIR), ("zh", TEST_DATA / "zh"), ("en", TEST_DATA / "en")):
        (root / name).symlink_to(target, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def enc():
    """GPT-2's tokenizer, from the files shipped in the package."""
    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The whole shared data folder (GPT-2 tokenizer files, whole Chinese and English texts), for
    the slow tests that need whole novels; everything else reads `test_data`.

    Found through $MINIGPT2_SHARED_DATA, never a hard-coded path. Missing on a user's machine,
    the tests that need it are skipped with this reason; in CI (CI=true) that is a failure.
    """
    value = os.environ.get(DATA_ENV)
    path = Path(value) if value else None
    if path is None or not (path / "gpt2" / "vocab.json").is_file():
        reason = (
            f"needs the whole novels of the shared data: set {DATA_ENV} to the folder holding gpt2/vocab.json, "
            f"zh/ and en/ (now {value!r})"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def hub_gpt2(hf_home):
    """`openai-community/gpt2` in the Hugging Face cache: a tiny random GPT-2 in the official
    layout plus the real tokenizer files. Returns the transformers model it was written from."""
    model = random_hf_model(n_layer=2, n_head=2, n_embd=128, n_positions=128, seed=1234)
    populate_hub_cache(
        hf_home / "hub",
        "openai-community/gpt2",
        model,
        extra_files={name: GPT2_DIR / name for name in ("vocab.json", "merges.txt")},
    )
    return model
