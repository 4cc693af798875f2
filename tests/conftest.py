import os
from pathlib import Path

import pytest

# Before any test module is collected: huggingface_hub reads HF_HUB_OFFLINE once, at its import,
# which collecting a module that imports pi_lora.cli already does.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Keep the demo base and token caches of the tests out of the user's home."""
    home = tmp_path_factory.mktemp("pi-lora-home")
    os.environ["PI_LORA_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny LLaMA (trained length 64) with a byte-level BPE tokenizer, saved like a hub model."""
    from pi_lora.demo import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A few plain-text documents (about 6k tokens of Genesis in all)."""
    from pi_lora.demo import TEXT

    folder = tmp_path_factory.mktemp("corpus")
    text = TEXT.read_text()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(text[i * 6000 : (i + 1) * 6000])
    return folder
