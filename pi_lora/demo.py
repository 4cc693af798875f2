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


PRETRAIN = dict(steps=300, batch=8, lr=3e-3, seed=0)


def pretrain(folder: Path, steps: int = 300, batch: int = 8, lr: float = 3e-3, seed: int = 0,
             progress=None) -> list[float]:
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
    task = progress.add_task("demo base", total=steps) if progress else None
    losses = []
    for _ in range(steps):
        batch_ids = rows[torch.randint(len(rows), (batch,), generator=gen)]
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress:
            progress.update(task, advance=1, info=f"loss {losses[-1]:.3f}")
    model.save_pretrained(folder)
    return losses


def demo_key() -> str:
    """What the demo base is made from (architecture, pretraining, text, library versions): a cache
    shared by several checkouts or versions never hands one of them another's model."""
    import hashlib
    import json

    import torch
    import transformers

    blob = json.dumps([DEMO_CONFIG, PRETRAIN, hashlib.sha256(TEXT.read_bytes()).hexdigest(),
                       torch.__version__, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demo_config():
    """The demo base's config: its own once built, else as build_tiny_llama will make it (the tokenizer's
    512 tokens, <s> and </s> first), for planning without building it."""
    from transformers import AutoConfig, LlamaConfig

    folder = home() / f"demo-base-{demo_key()}"
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    return LlamaConfig(vocab_size=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, **DEMO_CONFIG)


def demo_base(progress=None) -> Path:
    """The demo base model folder (tiny LLaMA pretrained at 256 tokens), built once and reused."""
    from .run import publish

    folder = home() / f"demo-base-{demo_key()}"
    if (folder / "config.json").is_file():
        return folder
    if progress is not None:
        progress.console.print(f"building the demo base once: a tiny LLaMA pretrained at "
                               f"{DEMO_CONFIG['max_position_embeddings']} tokens for {PRETRAIN['steps']} steps "
                               f"(about a minute of CPU time), cached in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=folder.parent))
    try:
        build_tiny_llama(tmp)
        pretrain(tmp, **PRETRAIN, progress=progress)
        publish(tmp)  # mkdtemp makes it 0700; the cache may be shared
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
