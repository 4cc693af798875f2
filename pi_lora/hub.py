"""The Hugging Face hub, when a base or a dataset is named by hub id.

Without a network, huggingface_hub retries each request for about 30 s and transformers and datasets
then fail with several screens of retry lines. One short connection attempt per command tells
beforehand: when the hub cannot be reached, the libraries are switched to their own offline mode
(cached copies only, no retries, as HF_HUB_OFFLINE=1 would), and a name that is not cached is a
one-line error at once.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import PiLoraError

TIMEOUT = 3.0  # seconds for the one connection attempt


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


@functools.lru_cache(maxsize=None)
def reachable() -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), TIMEOUT).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """The libraries' offline mode, for the rest of this process (what HF_HUB_OFFLINE=1 sets at import)."""
    import datasets
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def cached_model(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def cached_dataset(repo_id: str) -> bool:
    import datasets
    from huggingface_hub import constants

    folders = [Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}",
               Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")]
    return any(f.is_dir() for f in folders)


def require(repo_id: str, kind: str) -> None:
    """Before `repo_id` (kind "model" or "dataset") is read from the hub: go offline if the hub
    cannot be reached, and refuse at once what is not cached then."""
    if offline() or reachable():
        if offline() and not (cached_model(repo_id) if kind == "model" else cached_dataset(repo_id)):
            raise PiLoraError(f"{kind} '{repo_id}' is not in the local cache, and hub access is off "
                              "(HF_HUB_OFFLINE): give a local file or folder, or allow the hub.")
        return
    go_offline()
    if not (cached_model(repo_id) if kind == "model" else cached_dataset(repo_id)):
        raise PiLoraError(f"cannot reach the Hugging Face hub for the {kind} '{repo_id}', and it is not in the "
                          "local cache: give a local file or folder, or run where the hub can be reached.")
