"""Where a model's files come from: a local path or the Hugging Face hub.

A *source* is what the user types after `--model`:

- a short name, `gpt2`, `gpt2-medium`, `gpt2-large` or `gpt2-xl` (the official OpenAI models,
  hosted under `openai-community/` on the hub);
- any hub repo id in the GPT-2 layout, `owner/name`;
- a local directory holding `config.json` + `model.safetensors` (what `save_model` writes);
- a single local `.safetensors` file.

Hub files go through huggingface_hub's own download and cache (`HF_HOME`, `HF_HUB_OFFLINE`,
revisions), so a model downloaded once is found again offline. Every failure becomes one
`CheckpointError` that says what to do.
"""

from __future__ import annotations

import functools
from pathlib import Path

from minigpt2.errors import CheckpointError

OFFICIAL_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


class MissingHubFile(CheckpointError):
    """The hub repo exists but has no file of that name (not: the file could not be fetched)."""


def local_path(source: str | Path) -> Path | None:
    """The local file or directory `source` names, or None if it names a hub model.

    Anything that exists on disk is local. So is anything that cannot be a hub id: a path with
    more than one `/`, one that starts with `.`, `/` or `~`, or one ending in `.safetensors`.
    Those are returned even when missing, so the caller reports "no such file" rather than
    asking the hub for a repo called `runs/zh/final`.
    """
    path = Path(source).expanduser()
    text = str(source)
    if path.exists() or text.endswith(".safetensors") or text.startswith((".", "/", "~")):
        return path
    if str(source) in OFFICIAL_REPOS or text.count("/") == 1:
        return None
    return path


def repo_id(source: str) -> str:
    """`gpt2` → `openai-community/gpt2`; any other id unchanged."""
    return OFFICIAL_REPOS.get(source, source)


def hub_file(source: str, filename: str, *, revision: str | None = None) -> Path:
    """Download (or find in the cache) one file of a hub model and return its local path."""
    import huggingface_hub
    from huggingface_hub import errors

    repo = repo_id(source)
    at = f" at revision {revision!r}" if revision else ""
    try:
        try:  # the cache first: no network, no waiting
            return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision, local_files_only=True))
        except errors.LocalEntryNotFoundError:
            if huggingface_hub.is_offline_mode():
                raise
        unreachable = hub_unreachable()
        if unreachable:
            raise CheckpointError(
                f"'{filename}' of model '{repo}'{at} is not in the Hugging Face cache "
                f"({huggingface_hub.constants.HF_HUB_CACHE}) and the hub could not be reached ({unreachable}). "
                "Connect to the internet to download it once, or pass a local checkpoint directory or "
                ".safetensors file instead."
            )
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision))
    except errors.LocalEntryNotFoundError:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        why = (
            "downloads are switched off (HF_HUB_OFFLINE=1)"
            if huggingface_hub.is_offline_mode()
            else "the hub could not be reached"
        )
        raise CheckpointError(
            f"'{filename}' of model '{repo}'{at} is not in the Hugging Face cache ({cache}) and "
            f"{why}. Connect to the internet once (with HF_HUB_OFFLINE unset) to download it, "
            "or pass a local checkpoint directory or .safetensors file instead."
        ) from None
    except errors.GatedRepoError:
        raise CheckpointError(
            f"model '{repo}' is gated on the Hugging Face hub: accept its terms on its page and "
            "log in with `hf auth login`."
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"'{source}' is not a local path, and there is no model '{repo}' on the Hugging Face "
            f"hub (or it is private: log in with `hf auth login`). Known names: "
            f"{', '.join(OFFICIAL_REPOS)}; or give a checkpoint directory or .safetensors file."
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(
            f"model '{repo}' has no revision {revision!r}; check the branch, tag or commit."
        ) from None
    except errors.EntryNotFoundError:
        hint = (
            " minigpt2 reads only safetensors weights (never pickled .bin files); convert the "
            "checkpoint with transformers' save_pretrained(safe_serialization=True)."
            if filename.endswith(".safetensors")
            else ""
        )
        raise MissingHubFile(f"model '{repo}'{at} has no file '{filename}'.{hint}") from None
    except errors.HFValidationError:
        raise CheckpointError(
            f"'{source}' is neither an existing local path nor a valid hub repo id ('owner/name'). "
            f"Known names: {', '.join(OFFICIAL_REPOS)}."
        ) from None
    except OSError as e:  # connection problems, HTTP errors, a cache we cannot write, ...
        raise CheckpointError(f"could not fetch '{filename}' of model '{repo}'{at}: {e}") from None


PROBE_TIMEOUT_S = 5


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (None if it can), asked once per process in a few seconds.

    Without this, a missing file with no network makes huggingface_hub retry for about 30 s,
    printing a "Retrying in 8s" line each time, before the same "could not be reached" error.
    One HEAD request to the endpoint, with a short timeout and no retries, tells the same.
    """
    import huggingface_hub
    from huggingface_hub.utils import get_session

    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # httpx's ConnectError, TimeoutException, ...: the network's own errors
        return f"{endpoint}: {str(e) or type(e).__name__}"
    return None
