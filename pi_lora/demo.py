"""The CPU demo: a tiny LLaMA and a short public-domain text, made on this machine (no downloads).

The same builder makes the tiny models the tests use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TEXT = Path(__file__).parent / "assets" / "genesis.txt"  # KJV Genesis, public domain
DEMO_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)


def home() -> Path:
    return Path(os.environ.get("PI_LORA_HOME", Path.home() / ".cache" / "pi-lora"))


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the demo text: deterministic, offline, under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised LLaMA and its tokenizer to `folder` (from_pretrained-ready)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    settings = {**DEMO_CONFIG, **overrides}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=settings.pop("tie_word_embeddings", False),
        **settings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pretrain(folder: Path, steps: int = 300, batch: int = 8, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train the tiny model at its own length, so the demo extends a model that has learned something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    length = model.config.max_position_embeddings
    ids = torch.tensor(tokenizer(TEXT.read_text())["input_ids"])
    rows = ids[: len(ids) // length * length].view(-1, length)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    for _ in range(steps):
        batch_ids = rows[torch.randint(len(rows), (batch,), generator=gen)]
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(folder)
    return losses


def demo_base() -> Path:
    """The demo base model folder (tiny LLaMA pretrained at 256 tokens), built once and reused."""
    folder = home() / "demo-base"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=folder.parent))
    try:
        build_tiny_llama(tmp)
        pretrain(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
