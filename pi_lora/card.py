"""Model cards: the README.md beside an adapter, saying what it is, how it was made and how it did."""

from __future__ import annotations

import math

from .recipe import Recipe, dump
from .rope import METHODS


def adapter_card(meta: dict, recipe: Recipe, metrics: list[dict]) -> str:
    """The adapter's README: base, PI setting, lengths, data, steps, losses, and how to load it."""
    steps = [r for r in metrics if "loss" in r]
    validated = [r for r in metrics if "val_loss" in r]
    where = meta.get("base_path") or meta["base"]  # loadable as written
    lines = [
        f"# LoRA adapter: {meta['base']} extended to {meta['target_len']:,} tokens",
        "",
        _how(meta),
        "",
        "| | |",
        "|---|---|",
        f"| base | `{meta['base']}` ({meta['quant']} while training, compute {meta['compute_dtype']}) |",
        f"| LoRA | r={recipe.lora.rank}, alpha={recipe.lora.alpha:g}, on {_modules(recipe.lora.target_modules)}"
        + (f"; also trained: {', '.join(recipe.lora.trainable)}" if recipe.lora.trainable else "") + " |",
        f"| data | `{recipe.data.source}`" + (f", {recipe.data.eval_fraction:g} held out" if recipe.data.eval_fraction else "")
        + " |",
        f"| steps | {meta.get('adapter_step', recipe.train.steps)} x {recipe.train.batch_size * recipe.train.grad_accum} "
        f"sequences of {_trained_len(recipe):,} tokens, lr {recipe.train.lr:g} ({recipe.train.schedule}) |",
    ]
    if recipe.rope.train_len and recipe.rope.train_len < recipe.rope.target_len:
        lines.append(f"| short windows (PoSE) | {recipe.rope.train_len:,} tokens, positions spread over "
                     f"{recipe.rope.target_len:,} in {recipe.rope.pose_chunks} chunks |")
    if steps:
        lines.append(f"| training loss | {steps[0]['loss']:.4f} at step {steps[0]['step']} -> "
                     f"{steps[-1]['loss']:.4f} at step {steps[-1]['step']} |")
    if validated:
        best = min(validated, key=lambda r: r["val_loss"])
        last = validated[-1]
        lines.append(f"| validation at {meta['target_len']:,} tokens | loss {last['val_loss']:.4f} (perplexity "
                     f"{math.exp(min(last['val_loss'], 50)):.2f}) at step {last['step']}; best {best['val_loss']:.4f} "
                     f"at step {best['step']} |")
    lines += [
        "",
        "The rope setting is not part of a PEFT adapter: set it on the base config before attaching this "
        "adapter, or merge it (`pi-lora merge RUN`) into a model whose config.json carries it.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        f'config = AutoConfig.from_pretrained("{where}")',
        f"config.rope_parameters = {meta['rope_parameters']!r}",
        f"config.max_position_embeddings = {meta['target_len']}",
        f'model = AutoModelForCausalLM.from_pretrained("{where}", config=config)',
        'model = PeftModel.from_pretrained(model, "adapter")',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        dump(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _how(meta: dict) -> str:
    if meta["rope_type"] == "none":
        return (f"Trained by pi-lora {meta['pi_lora_version']} with plain RoPE (no position scaling, rope_theta "
                f"{meta['rope_theta']:g}); the base was trained to {meta['original_len']:,} tokens.")
    return (f"Trained by pi-lora {meta['pi_lora_version']} with {METHODS[meta['rope_type']]}: the base was "
            f"trained to {meta['original_len']:,} tokens; its rope (rope_type `{meta['rope_type']}`, factor "
            f"{meta['factor']:g}, rope_theta {meta['rope_theta']:g}) is scaled so {meta['target_len']:,} tokens "
            "stay in the trained range.")


def _trained_len(recipe: Recipe) -> int:
    return recipe.rope.train_len or recipe.rope.target_len


def _modules(target) -> str:
    return target if isinstance(target, str) else ", ".join(target)
