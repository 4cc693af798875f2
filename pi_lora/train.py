"""`pi-lora train`: the loop that trains LoRA on the prepared run, and can be killed and resumed.

`preflight` checks everything that can fail on bad input before this module touches the run folder;
`checkpoint` writes and restores the loop's state; `model.build` makes the model it trains.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from . import __version__, distributed, kernels, loss, memory, model, pose, run
from . import checkpoint as checkpoint_mod
from . import plan as planner
from .console import note, progress_bar
from .errors import Interrupted, OutOfMemory, PiLoraError, interrupts, saving_after_interrupt, stop_if_interrupted
from .preflight import Prepared
from .recipe import Recipe, dump


def metadata(p: Prepared) -> dict:
    """pi_lora.json: what later commands need of the run (base, rope, quantization, resolved settings, versions)."""
    import peft
    import transformers

    base = p.recipe.model.base
    where = model.locate(base)
    return {
        "base": base,
        "base_path": str(Path(where).resolve()) if Path(where).exists() else where,
        "revision": p.recipe.model.revision or getattr(p.config, "_commit_hash", None),
        **p.pi.as_dict(),
        "rope_parameters": p.pi.rope_parameters(),
        "quant": p.recipe.model.quant,
        "double_quant": p.recipe.model.double_quant,
        "compute_dtype": str(model.compute_dtype(p.recipe.model.compute_dtype, model.device())).removeprefix("torch."),
        "trainable": p.recipe.lora.trainable,
        # merge, export, eval and a resume of this run run the base's code only when told again
        "trust_remote_code": p.recipe.model.trust_remote_code,
        "planned_peak_gib": round(p.memory.estimate.peak / planner.GiB, 3),
        # the recipe may say `auto`; a resume computes with what this run resolved
        "resolved": planner.resolved(p.memory.estimate.shape, p.settings),
        "pi_lora_version": __version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "recipe": p.recipe.model_dump(mode="json"),  # what a resume is checked against
    }


def scheduler(optimizer, t):
    """Linear warmup to train.lr that starts at lr/warmup_steps, not 0 (a step at lr 0 trains
    nothing), then constant, or cosine down to 0 at train.steps."""

    def factor(done: int) -> float:  # `done`: optimizer steps taken so far
        if done < t.warmup_steps:
            return (done + 1) / t.warmup_steps
        if t.schedule == "cosine":
            progress = min(1.0, (done - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compare_memory(p: Prepared, on: torch.device, before_gb: float) -> str:
    """Planned against measured peak, after the first step (on a CPU: growth of resident memory)."""
    measured = memory.peak_gib(on) - (0 if on.type == "cuda" else before_gb)
    planned = p.memory.estimate.peak / planner.GiB
    kind = "max allocated" if on.type == "cuda" else "resident memory growth"
    return (f"memory after the first step: peak of the tensors {measured:.2f} GiB measured ({kind}), "
            f"{planned:.2f} GiB planned")


def oom_message(p: Prepared, on: torch.device) -> str:
    """What ran out, at what size, and the settings that use less."""
    total = torch.cuda.get_device_properties(on).total_memory / 2**30 if on.type == "cuda" else 0
    peak = memory.peak_gib(on)
    return (
        f"out of memory at length {p.pi.target_len} x batch {p.recipe.train.batch_size} "
        f"(device has {total:.1f} GiB, peak allocated {peak:.1f} GiB). To use less: "
        "train.batch_size 1 (raise train.grad_accum to keep the batch), model.quant nf4, "
        "train.gradient_checkpointing true, a smaller train.loss_chunk, fewer lora.target_modules, "
        "a shorter rope.target_len, or more GPUs."
    )


def after_stop(folder: Path) -> str:
    """What a stopped run left and how to go on."""
    saved = run.checkpoints(folder)
    if not saved:
        return "No checkpoint was written yet, so nothing is kept; run the same command again."
    return f"Checkpoint {saved[-1].name} is saved; continue with: pi-lora train --resume --output {folder}"


def autocast(on: torch.device, dtype: torch.dtype):
    """Mixed precision in the compute dtype; none for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(on.type, dtype=dtype)


def step_loss(model, batches, t, on: torch.device, dtype: torch.dtype) -> float:
    """One optimizer step's worth of forward/backward; returns the mean loss. `model` is a loss module
    (loss.ChunkedLoss, bare or as DDP or FSDP2 wrap it). Under DDP the gradients are averaged across
    processes once, in the last micro-batch's backward."""
    total = 0.0
    for a in range(t.grad_accum):
        ids, positions = unpack_batch(next(batches), on)
        last = a == t.grad_accum - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(on, dtype):  # the forward only; checkpoint recomputes restore it
                value = model(ids) if positions is None else model(ids, positions)
            (value / t.grad_accum).backward()
        total += value.item()
    return total / t.grad_accum


def unpack_batch(batch, on: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's ids and position ids (None: 0..n-1) on the device; short windows come as a pair."""
    ids, positions = batch if isinstance(batch, tuple) else (batch, None)
    return ids.to(on), None if positions is None else positions.to(on)


def already_complete(folder: Path, steps: int, checkpoint: Path | None) -> str | None:
    """Why a resume has nothing to do (its checkpoint reached train.steps), or None."""
    done = run.step_of(checkpoint) if checkpoint else 0
    if done < steps:
        return None
    if complete_adapter(folder, checkpoint):
        return (f"run '{folder}' is complete at step {done}; its adapter was not whole, and is written again "
                f"from {checkpoint.name}.")
    return (f"run '{folder}' is already complete: {done} steps done, train.steps is {steps}; nothing changed. "
            f"To train longer: pi-lora train --resume --output {folder} --steps N (N > {done}).")


def complete_adapter(folder: Path, checkpoint: Path) -> bool:
    """A process killed while it wrote the final adapter leaves none, or the one before: write it again
    from the last checkpoint, which holds the same adapter. Whether it had to."""
    run.recover(folder / run.ADAPTER)
    meta, step = run.read_meta(folder), run.step_of(checkpoint)
    try:
        run.verify_adapter(folder / run.ADAPTER)
        if meta.get("adapter_step") == step:
            return False
    except PiLoraError:
        pass
    from .card import adapter_card

    recipe = Recipe.model_validate(meta["recipe"])
    with run.atomic_dir(folder / run.ADAPTER) as tmp:
        shutil.copytree(checkpoint / run.ADAPTER, tmp, dirs_exist_ok=True)
        meta = {**meta, "adapter_step": step}
        (tmp / "README.md").write_text(adapter_card(meta, recipe, run.read_metrics(folder)))
    run.write_json(folder / run.META, meta)
    return True


def fit(p: Prepared, console: Console, resume: bool, overwrite: bool = False,
        checkpoint: tuple[Path, dict] | None = None) -> Path:
    """Train from `checkpoint` (see checkpoint.latest) or from step 0; returns the run folder. A fresh
    run that fails before its first checkpoint leaves nothing. Rank 0 holds the run folder's lock."""
    folder, world = p.folder, distributed.current()
    if not world.main:  # rank 0 writes the run folder; the others wait until it is ready
        distributed.barrier(world)
        return _loop(p, console, checkpoint)
    fresh = not (folder / run.RECIPE).is_file()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PiLoraError(f"cannot create the run folder '{folder}': {e.strerror}.") from None
    with run.writing(folder):  # held since the command started unless the folder's parent was new
        previous = None
        if overwrite:  # run.claim checked it is a run folder; all input is checked now
            previous = run.set_aside(folder)  # kept until the new run has a checkpoint
            fresh = True
        sweep_run(folder)
        try:
            with interrupts():  # also while the weights load: a SIGTERM then leaves nothing
                # on resume too: a longer train.steps must survive the next --resume
                run.write_text(folder / run.RECIPE, f"# pi-lora {__version__}: resolved recipe\n" + dump(p.recipe))
                if not resume or not (folder / run.META).is_file():
                    run.write_json(folder / run.META, metadata(p))
                distributed.barrier(world)
                done = _loop(p, console, checkpoint)
        except BaseException as e:
            clean_up(folder, fresh, previous, e)
            raise
        run.drop(previous)
        return done


def clean_up(folder: Path, fresh: bool, previous: Path | None, error: BaseException) -> None:
    """After `error` stopped the run: a fresh run without a checkpoint is removed (and the run that
    --overwrite set aside is put back); an interrupt becomes Interrupted, saying what was kept. Other
    errors are the caller's to raise again."""
    if fresh and not run.checkpoints(folder):
        shutil.rmtree(folder, ignore_errors=True)
        if previous is not None:
            run.put_back(previous, folder)
            kept = f"No checkpoint was written yet; the previous run in {folder} is kept as it was."
            if isinstance(error, (KeyboardInterrupt, Interrupted)):
                raise Interrupted(f"interrupted. {kept}") from None
            note(f"[yellow]note[/]: {kept}")
            return
    run.drop(previous)
    if isinstance(error, KeyboardInterrupt):
        raise Interrupted(f"interrupted. {after_stop(folder)}") from None


def sweep_run(folder: Path) -> None:
    """Remove what killed saves left in the run folder (a checkpoint's temporary is as big as the
    trainable state), except temporaries of outputs another process is writing right now."""
    for parent in (folder, folder / run.CHECKPOINTS):
        if not parent.is_dir():
            continue
        names = {p.name.split(run.MARK)[0][1:] for p in parent.iterdir() if run.MARK in p.name}
        for name in names:
            try:
                with run.writing(parent / name):
                    run.sweep(parent / name)
            except run.Busy:
                pass


@dataclass
class Trainee:
    """The model being trained and what updates it."""

    net: object  # the peft model (its adapter is saved)
    model: torch.nn.Module  # its loss module, as DDP or FSDP2 wrap it: what a step calls
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object


def build(p: Prepared, console: Console, on: torch.device, dtype: torch.dtype) -> Trainee:
    """The model (model.build), sharded when asked, with its optimizer and schedule."""
    m, t, world = p.recipe.model, p.recipe.train, distributed.current()
    console.print(f"loading {m.base} ({m.quant}, compute {str(dtype).removeprefix('torch.')}) on {on.type}")
    if kernels.describe(t.kernels, on):
        console.print(kernels.describe(t.kernels, on))
    net = model.build(p.recipe, p.config, on, dtype, p.settings, p.memory.split if m.gpus > 1 else None)
    step_model = loss.ChunkedLoss(net, t.loss_chunk, p.settings.offload_activations)
    if m.shard:
        distributed.shard_model(step_model)
        console.print(f"sharded (FSDP2) across {world.size} processes")
    elif world.size > 1:
        step_model = distributed.data_parallel(step_model, on)
    params = list(model.trainable(net).values())  # after sharding: FSDP replaces them with sharded ones
    console.print(f"trainable parameters: {sum(x.numel() for x in params):,}")
    optimizer = torch.optim.AdamW(param_groups(net, p.recipe), lr=t.lr, betas=tuple(t.betas),
                                  weight_decay=t.weight_decay)
    return Trainee(net, step_model, params, optimizer, scheduler(optimizer, t))


def param_groups(net, recipe: Recipe) -> list[dict]:
    """AdamW's groups: everything at train.lr, the trained embeddings at lora.embed_lr when set (the
    schedule scales every group alike)."""
    weights = model.trainable(net)
    if recipe.lora.embed_lr is None or "embed" not in recipe.lora.trainable:
        return [{"params": list(weights.values())}]
    embed = {n for n in weights if "embed_tokens" in n}
    return [{"params": [w for n, w in weights.items() if n not in embed]},
            {"params": [weights[n] for n in sorted(embed)], "lr": recipe.lora.embed_lr}]


@torch.no_grad()
def validate(model, sequences: torch.Tensor, on: torch.device, dtype: torch.dtype) -> float:
    """Mean loss of the trainee's loss module on the held-out sequences at the target length (no
    gradients; through DDP/FSDP's own forward); the same value on every rank."""
    model.eval()  # no dropout; 4-bit layers are protected from bitsandbytes' eval-mode repack
    try:
        losses = []
        for row in sequences:
            with autocast(on, dtype):
                losses.append(model(row[None].to(on)).item())
    finally:
        model.train()
    return sum(losses) / len(losses)


def progress_info(record: dict) -> str:
    info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
            f"mem {record['mem_gib']:.2f} GiB")
    if "val_loss" in record:
        info += f"  val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
    return info


@dataclass
class RunState:
    """Where a run stands between steps. `done`: the last whole update (weights, optimizer, schedule
    and RNG moved together); `saved`: the step of the last checkpoint; `updating`: inside an update,
    when only the last checkpoint is consistent; `rng`: every rank's RNG state after `done`."""

    done: int
    seen: int  # sequences consumed before this process started
    best: dict | None  # the best validation so far: {"step", "val_loss"}
    saved: int
    rng: list = field(default_factory=list)
    updating: bool = False


def _loop(p: Prepared, console: Console, checkpoint: tuple[Path, dict] | None) -> Path:
    """Build, restore, train to train.steps, write the adapter; returns the run folder."""
    on = model.device()
    dtype = model.compute_dtype(p.recipe.model.compute_dtype, on)
    seed_everything(p.recipe.train.seed)
    before = memory.resident_gib()
    trainee = build(p, console, on, dtype)
    state = restored(p, console, trainee, checkpoint)
    tracker = open_tracker(p, state.done)
    try:
        run_steps(p, console, trainee, state, tracker, on, dtype, before)
    finally:
        if tracker is not None:
            tracker.close()
    finish(p, trainee.net, console)
    return p.folder


def restored(p: Prepared, console: Console, trainee: Trainee, checkpoint: tuple[Path, dict] | None) -> RunState:
    """Each rank's own dropout stream, then, resuming, the checkpoint's weights, optimizer, schedule
    and RNG (which replace it)."""
    world = distributed.current()
    if world.size > 1:  # same initial weights on every rank (seeded before the build); different dropout masks
        seed_everything(p.recipe.train.seed + world.rank)
        console.print(f"data parallel: {world.size} processes, {p.per_step} sequences per step in all")
    if checkpoint is None:
        return RunState(done=0, seen=0, best=None, saved=0)
    done, seen, best = checkpoint_mod.restore(*checkpoint, trainee.net, trainee.optimizer, trainee.scheduler)
    console.print(f"resumed from {checkpoint[0].name} ({seen} sequences seen)")
    return RunState(done=done, seen=seen, best=best, saved=done)


def open_tracker(p: Prepared, start: int):
    """Rank 0's metrics from `start` on: metrics.jsonl cut back to it, and the trackers (None elsewhere)."""
    if not distributed.current().main:
        return None
    run.truncate_metrics(p.folder, start)
    from .tracking import Tracker

    return Tracker(p.folder, p.recipe.train.report_to, start, p.recipe.model_dump(mode="json"))


def run_steps(p: Prepared, console: Console, trainee: Trainee, state: RunState, tracker, on: torch.device,
              dtype: torch.dtype, before_gib: float) -> None:
    """Steps `state.done + 1` to train.steps, each logged, validated and saved as the recipe says;
    Ctrl-C or SIGTERM saves the last whole step (save_interrupted) and raises Interrupted."""
    t, world = p.recipe.train, distributed.current()
    trainee.net.train()
    stream = pose.batches(p.data.batches(state.seen, t.batch_size), state.seen, p.recipe.rope, t.seed)
    batches = distributed.share(stream, world)
    state.rng = distributed.gather(checkpoint_mod.rng_state(), world)
    first = state.done + 1
    with progress_bar(console) as bar, interrupts():
        task = bar.add_task("train", total=t.steps, completed=state.done, info="", own_lines=True)
        try:
            for step in range(first, t.steps + 1):
                record = one_step(p, trainee, batches, state, step, on, dtype)
                save = step % t.save_every == 0 or step == t.steps
                if validation_due(p, step):
                    save = validate_into(record, p, trainee, state, on, dtype) or save  # a new best is kept
                log(p, console, tracker, bar, task, record)
                if step == first:
                    console.print(compare_memory(p, on, before_gib))
                if save:
                    save_state(p, trainee, state, step)
                stop_if_interrupted()
        except KeyboardInterrupt:
            save_interrupted(p, trainee, state)
            raise Interrupted(f"interrupted. {after_stop(p.folder)}") from None
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"{oom_message(p, on)} {after_stop(p.folder)}") from None


def one_step(p: Prepared, trainee: Trainee, batches, state: RunState, step: int, on: torch.device,
             dtype: torch.dtype) -> dict:
    """One optimizer step: the accumulated forward/backward, clipping, the update; its metrics record."""
    t, world = p.recipe.train, distributed.current()
    began = time.perf_counter()
    distributed.zero_grad(trainee.model, trainee.optimizer)
    value = distributed.mean(step_loss(trainee.model, batches, t, on, dtype), world)
    if not math.isfinite(value):
        raise PiLoraError(f"loss became {value} at step {step}; lower train.lr or check the data.")
    norm = torch.nn.utils.clip_grad_norm_(trainee.params, t.max_grad_norm or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    lr = trainee.scheduler.get_last_lr()[0]
    state.updating = True  # weights, optimizer, scheduler and RNG move together
    trainee.optimizer.step()
    trainee.scheduler.step()
    state.rng, state.done, state.updating = distributed.gather(checkpoint_mod.rng_state(), world), step, False
    seconds = time.perf_counter() - began
    tokens_per_step = p.per_step * pose.train_len(p.recipe.rope)
    return {
        "step": step, "loss": value, "lr": lr, "grad_norm": float(norm),
        "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
        "mem_gib": round(memory.peak_gib(on), 3), "seconds": seconds,
    }


def validation_due(p: Prepared, step: int) -> bool:
    t = p.recipe.train
    return p.validation is not None and (step == t.steps or bool(t.eval_every and step % t.eval_every == 0))


def validate_into(record: dict, p: Prepared, trainee: Trainee, state: RunState, on: torch.device,
                  dtype: torch.dtype) -> bool:
    """The held-out loss and perplexity into `record`; whether it is a new best (then `state.best`)."""
    record["val_loss"] = validate(trainee.model, p.validation, on, dtype)
    record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
    if state.best is not None and record["val_loss"] >= state.best["val_loss"]:
        return False
    state.best = {"step": record["step"], "val_loss": record["val_loss"]}
    return True


def log(p: Prepared, console: Console, tracker, bar: Progress, task, record: dict) -> None:
    """Rank 0 writes the record (metrics.jsonl, trackers, progress line) every train.log_every steps,
    at the end and with each validation; every rank moves its bar."""
    t, step = p.recipe.train, record["step"]
    if distributed.current().main and (step % t.log_every == 0 or step == t.steps or "val_loss" in record):
        run.append_metrics(p.folder, record)
        tracker.log(record)
        bar.update(task, info=progress_info(record))
        if not console.is_terminal:
            console.print(f"step {step}/{t.steps}  {progress_info(record)}")
    bar.update(task, completed=step)


def save_state(p: Prepared, trainee: Trainee, state: RunState, step: int) -> None:
    """A checkpoint of `step` (which must be `state.done`)."""
    t = p.recipe.train
    checkpoint_mod.save(p.folder, step, step * p.per_step, trainee.net, trainee.optimizer, trainee.scheduler, state.rng,
                    t.keep_checkpoints, state.best, p.recipe.model_dump(mode="json"))
    state.saved = step


def save_interrupted(p: Prepared, trainee: Trainee, state: RunState) -> None:
    """On Ctrl-C or SIGTERM, a checkpoint of the last whole step unless one holds it already. Cut inside
    an update, only the last checkpoint is consistent. Sharded, saving gathers across ranks, which the
    signal may have caught mid-collective: the last periodic checkpoint stays."""
    if not state.updating and state.done > state.saved and not p.recipe.model.shard:
        with saving_after_interrupt():
            save_state(p, trainee, state, state.done)


def finish(p: Prepared, net, console: Console) -> None:
    """Write the adapter with its model card, record its step, and name outputs it makes stale."""
    folder, world, steps = p.folder, distributed.current(), p.recipe.train.steps
    weights = distributed.full(model.trainable(net)) if p.recipe.model.shard else None
    checkpoint_mod.check_finite(weights if weights is not None else model.trainable(net), steps)
    run.check_present(folder)
    if world.main:
        with run.atomic_dir(folder / run.ADAPTER) as tmp:
            net.save_pretrained(tmp, state_dict=weights)
            meta = {**run.read_meta(folder), "adapter_step": steps}
            from .card import adapter_card

            (tmp / "README.md").write_text(adapter_card(meta, p.recipe, run.read_metrics(folder)))
        run.write_json(folder / run.META, meta)
        for output in run.stale_outputs(folder, steps):
            console.print(f"[yellow]stale[/]: {output['path']} ({output['kind']}) was made from the adapter at "
                          f"step {output['adapter_step']}; the adapter is now at step {steps}. Make it again "
                          "with --overwrite.")
    distributed.barrier(world)
    console.print(f"[green]done[/]: adapter in {folder / run.ADAPTER}, metrics in {folder / run.METRICS}")
