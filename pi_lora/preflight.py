"""What `pi-lora train` checks before any weight loads: rope on the base config, the memory plan, data.

Everything that can fail on bad input (recipe, base config, rope, tokenizer, data) fails here, before
the run folder is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from . import data, distributed, kernels, model, pose, rope, run
from . import plan as planner
from .errors import PiLoraError
from .recipe import Recipe


@dataclass
class Prepared:
    """What a run needs, checked before any weight is loaded."""

    recipe: Recipe
    config: object  # base config with PI applied
    pi: rope.Interpolation
    data: object  # data.PackedData | data.StreamedData
    validation: torch.Tensor | None  # held-out sequences of target_len, or None
    folder: Path
    memory: planner.Decision

    @property
    def per_step(self) -> int:
        """Sequences per optimizer step, over all data-parallel ranks."""
        return self.recipe.train.batch_size * self.recipe.train.grad_accum * distributed.current().size

    @property
    def settings(self) -> planner.Settings:
        """What the run computes with: the recipe's memory settings with every `auto` resolved."""
        return self.memory.estimate.settings


def config_for(recipe: Recipe, plan_only: bool = False):
    """The base's config with the recipe's rope setting applied, and that setting. `plan_only`: the
    config a plan needs (the demo's without building the demo base; see model.plan_config)."""
    m = recipe.model
    load = model.plan_config if plan_only else model.load_config
    config = load(m.base, m.revision, m.trust_remote_code)
    model.check_rank(config, recipe.lora)
    pi = rope.of_recipe(config, recipe.rope, model.TRAINED_LEN.get(m.base))
    rope.check_trainable(pi)
    pose.check(recipe.rope, rope.extends(pi))
    rope.apply(config, pi)
    return config, pi


def prepare(recipe: Recipe, progress: Progress | None = None, resume: bool = False) -> Prepared:
    """The run's config, plan, data and held-out data; resuming, the plan keeps what the run resolved."""
    m = recipe.model
    if m.base == model.DEMO:
        from .demo import demo_base

        demo_base(progress)
    config, pi = config_for(recipe)
    resolved = run.read_meta(Path(recipe.output)).get("resolved") if resume else None
    decision = plan_memory(recipe, config, resolved)
    tokenizer = model.load_tokenizer(m.base, m.revision, m.trust_remote_code)
    from .demo import home

    cache = home() / "tokens"
    packed = data.load(recipe.data, tokenizer, pose.train_len(recipe.rope), recipe.train.seed, cache, progress)
    held_out = data.validation(recipe.data, tokenizer, pi.target_len, recipe.train.eval_sequences, cache, progress)
    return Prepared(recipe, config, pi, packed, held_out, Path(recipe.output), decision)


def plan_memory(recipe: Recipe, config, resolved: dict | None = None) -> planner.Decision:
    """Run the memory plan before any weight is loaded: resolve `auto` settings (or take the ones a
    resumed run resolved, so it computes exactly as before), refuse what cannot fit. The recipe keeps
    `auto`, so the same recipe re-plans on another GPU."""
    on = model.device()
    shape = planner.Shape.of(config)
    compute_bytes = model.compute_dtype(recipe.model.compute_dtype, on).itemsize
    if recipe.model.gpus > 1 and distributed.current().size > 1:
        raise PiLoraError("model.gpus > 1 splits one model across GPUs; with torchrun each process has one GPU. "
                          "Use one or the other.")
    if recipe.model.shard and distributed.current().size == 1:
        raise PiLoraError("model.shard shards the model across data-parallel processes: launch with "
                          "torchrun --nproc_per_node N -m pi_lora train ... (or set model.shard false).")
    if recipe.model.shard and getattr(config, "tie_word_embeddings", False):
        raise PiLoraError(f"model.shard: {recipe.model.base} ties its head to its embeddings, which sharding "
                          "does not support; small tied models fit one GPU without it.")
    if recipe.model.gpus > 1 and recipe.model.gpus > torch.cuda.device_count():
        raise PiLoraError(f"model.gpus is {recipe.model.gpus} but this machine has {torch.cuda.device_count()} GPU(s).")
    kernels.check(recipe.train.kernels, on)  # liger-kernel missing: said before any data or weight loads
    planned = recipe.model_copy(update={"train": recipe.train.model_copy(update=resolved or {})})
    decision = planner.decide(shape, planned, compute_bytes, on.type == "cuda", processes=distributed.current().size)
    if not decision.fits:
        raise PiLoraError(planner.refusal(decision, shape, planner.auto_keys(planned.train)))
    return decision


def describe(p: Prepared, console: Console) -> None:
    """What the run will do: the extension, the data, the budget, validation and memory."""
    t, pi = p.recipe.train, p.pi
    console.print(
        f"[bold]context[/]: {pi.base_len} -> {pi.target_len} tokens, rope '{pi.rope_type}' factor "
        f"{pi.factor:g}" + (f" over the original {pi.original_len}" if pi.base_len != pi.original_len else "")
        + (f", rope_theta {pi.rope_theta:g} -> {pi.ntk_theta():g}" if pi.rope_type == "ntk"
           else f", rope_theta {pi.rope_theta:g} (kept)")
    )
    need = t.steps * p.per_step
    console.print(f"[bold]data[/]: {p.data.describe()}")
    if pose.active(p.recipe.rope):
        console.print(f"[bold]short windows[/] (PoSE): {pose.train_len(p.recipe.rope):,} tokens each, positions "
                      f"spread over 0..{pi.target_len - 1:,} in {p.recipe.rope.pose_chunks} chunks")
    epochs = f", {need / p.data.count:.2f} epochs" if p.data.count else ""
    console.print(
        f"[bold]budget[/]: {t.steps} steps x {t.batch_size} x {t.grad_accum} accum = {need} sequences, "
        f"{need * pose.train_len(p.recipe.rope):,} tokens{epochs}"
    )
    if t.steps < t.warmup_steps:
        console.print(f"[yellow]warning[/]: train.steps ({t.steps}) is shorter than train.warmup_steps "
                      f"({t.warmup_steps}): the learning rate never reaches train.lr ({t.lr:g}).")
    if p.validation is not None:
        console.print(f"[bold]validation[/]: {len(p.validation)} held-out sequences of {pi.target_len} tokens, "
                      f"every {t.eval_every or t.steps} steps and at the end")
    d = p.memory
    chosen = planner.spell(planner.Shape.of(p.config), d.chosen) or "none"
    console.print(
        f"[bold]memory[/]: needs {d.estimate.needs / planner.GiB:.2f} of {d.budget / planner.GiB:.2f} GiB per "
        f"device (auto settings: {chosen}; breakdown: pi-lora plan)"
    )
