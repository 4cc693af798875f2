"""`pi-lora train`: PI on the base config, LoRA on the 4-bit base, a loop that can be killed and resumed.

Order matters for "nothing half-written": everything that can fail on bad input (recipe, base
config, rope, tokenizer, data) is checked before the run folder is touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from . import __version__, data, distributed, kernels, loss, memory, model, pose, quant, rope, run
from . import plan as planner
from .errors import Interrupted, OutOfMemory, PiLoraError, first_line
from .recipe import Recipe, dump


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
    t, pi = p.recipe.train, p.pi
    console.print(
        f"[bold]PI[/]: {pi.base_len} -> {pi.target_len} tokens, rope '{pi.rope_type}' factor "
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


def metadata(p: Prepared) -> dict:
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainable(net) -> dict[str, torch.Tensor]:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


# A checkpoint is tensors (safetensors) and plain data (JSON), never a pickle: loading one from a
# shared run folder must not run code. `pack` moves every tensor of a nested state (optimizer state
# keyed by index or, sharded, by name; RNG states) into a flat safetensors dict and leaves a
# reference; the JSON keeps what Python types the rest had (int keys, tuples, numpy arrays), so
# `unpack` gives back exactly what was saved and a resumed run is bit-identical.
CHECKPOINT_FORMAT = 1


def pack(obj, tensors: dict[str, torch.Tensor], key: str = ""):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, pack(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [pack(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__} (at {key})")


def unpack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__items__" in obj:
        return {k: unpack(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(unpack(v, tensors) for v in obj["__tuple__"])
    return {k: unpack(v, tensors) for k, v in obj.items()}


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two entries on one storage (a tied weight, a view): copy the repeats."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def save_checkpoint(folder: Path, step: int, sequences_seen: int, net, optimizer, sched, rng: list[dict],
                    keep: int, best: dict | None = None, recipe: dict | None = None) -> None:
    """`rng` holds every rank's RNG state (one entry without data parallelism). A sharded model's
    weights and optimizer state are gathered whole (every rank takes part), so its adapter is the
    same as an unsharded run's; its optimizer state is keyed by parameter name. `best` is the best
    validation so far ({"step", "val_loss"}); its checkpoint survives pruning. `recipe` (the resolved
    one) is what a resume is checked against."""
    from safetensors.torch import save_file

    quant.check(net)
    run.check_present(folder)
    weights = distributed.full(trainable(net))
    check_finite(weights, step)
    sharded = distributed.is_sharded(net)
    optim = distributed.full_optimizer_state(net, optimizer) if sharded else optimizer.state_dict()
    if not distributed.current().main:
        return
    with run.atomic_dir(folder / run.CHECKPOINTS / f"step-{step}") as tmp:
        net.save_pretrained(tmp / run.ADAPTER, state_dict=weights if sharded else None)
        tensors: dict[str, torch.Tensor] = {}
        body = pack({"weights": weights, "optimizer": optim, "scheduler": sched.state_dict(), "rng": rng}, tensors)
        save_file(unshared(tensors), tmp / run.TENSORS)
        state = {"format": CHECKPOINT_FORMAT, "step": step, "sequences_seen": sequences_seen, "sharded": sharded,
                 "best": best, "recipe": recipe, "state": body, "files": run.fingerprint(tmp)}
        state["digest"] = digest(state)
        (tmp / run.STATE).write_text(json.dumps(state) + "\n")  # last: a folder with it is complete
    if best is not None and best["step"] == step:
        run.write_json(folder / run.BEST, {**best, "checkpoint": f"{run.CHECKPOINTS}/step-{step}"})
    run.prune(folder, keep, protect=best["step"] if best else None)


def check_finite(weights: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to save NaN or infinite weights: a finite loss does not prove the update that followed it
    was (a huge weight decay or learning rate overflows the weights after the loss was taken)."""
    bad = next((name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise PiLoraError(f"step {step} made {bad} NaN or infinite; nothing of it is saved. Lower train.lr or "
                          "train.weight_decay.")


def digest(state: dict) -> str:
    """SHA-256 of a checkpoint state's JSON (without its digest): an edited state.json is found."""
    import hashlib

    rest = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


class Damaged(PiLoraError):
    """A checkpoint that is not what was written (truncated, edited, from an older pi-lora)."""


def read_checkpoint(checkpoint: Path) -> dict:
    """A checkpoint's state (step, sequences_seen, sharded, best, recipe, weights, optimizer,
    scheduler, rng), after checking every file against the sizes and hashes recorded when it was
    written. Reads only JSON and safetensors; raises Damaged saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = checkpoint / run.STATE
    if not path.is_file():
        if (checkpoint / "state.pt").is_file():
            raise Damaged("its state.pt comes from an older pi-lora and is a pickle, which can run code on "
                          "loading; it is not loaded")
        raise Damaged(f"it has no {run.STATE}")
    try:
        state = json.loads(path.read_text())
        files, body = state["files"], state["state"]
        header = {k: state[k] for k in ("step", "sequences_seen", "sharded", "best", "recipe")}
    except (ValueError, KeyError, TypeError) as e:
        raise Damaged(f"{run.STATE} is not a pi-lora checkpoint state ({first_line(e)})") from None
    except OSError as e:
        raise Damaged(f"{run.STATE} cannot be read ({e.strerror})") from None
    if state.get("format") != CHECKPOINT_FORMAT or run.TENSORS not in files:
        raise Damaged(f"{run.STATE} has format {state.get('format')!r}, not {CHECKPOINT_FORMAT}")
    if state.get("digest") != digest(state):
        raise Damaged(f"{run.STATE} does not hold what was written (its digest differs)")
    why = run.damage(checkpoint, files)
    if why:
        raise Damaged(why)
    try:
        tensors = load_file(checkpoint / run.TENSORS)
        return {**header, **unpack(body, tensors)}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise Damaged(f"{run.TENSORS} cannot be read ({first_line(e)})") from None


def latest_checkpoint(folder: Path, console: Console) -> tuple[Path, dict] | None:
    """The newest checkpoint that is whole, and its state; a damaged newer one is passed over with a
    message saying which and why. None when the run has none; an error when none is readable."""
    problems = []
    for checkpoint in reversed(run.checkpoints(folder)):
        try:
            state = read_checkpoint(checkpoint)
        except Damaged as e:
            problems.append(f"{checkpoint.name}: {e}")
            continue
        for problem in problems:
            console.print(f"[yellow]checkpoint skipped[/]: {problem}; resuming from {checkpoint.name} instead.",
                          highlight=False)
        return checkpoint, state
    if problems:
        raise PiLoraError(f"no checkpoint of '{folder}' can be used ({'; '.join(problems)}). Start again "
                          "with --overwrite.")
    return None


def restore(checkpoint: Path, state: dict, net, optimizer, sched) -> tuple[int, int, dict | None]:
    params = trainable(net)
    missing = set(params) ^ set(state["weights"])
    if missing:
        raise PiLoraError(f"checkpoint {checkpoint} does not match this model: {sorted(missing)[:3]} ...")
    shapes = [n for n, v in state["weights"].items() if tuple(v.shape) != tuple(params[n].shape)]
    if shapes:
        n = shapes[0]
        raise PiLoraError(f"checkpoint {checkpoint} does not match this model: {n} is "
                          f"{tuple(state['weights'][n].shape)} there, {tuple(params[n].shape)} here.")
    world = distributed.current()
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != world.size:
        raise PiLoraError(f"checkpoint {checkpoint} was written by {len(rngs)} data-parallel process(es); "
                          f"resume it with the same number, not {world.size}.")
    sharded = distributed.is_sharded(net)
    if state.get("sharded", False) != sharded:
        raise PiLoraError(f"checkpoint {checkpoint} was written with model.shard {not sharded}; resume it the same way.")
    if sharded:
        distributed.load_full(net, optimizer, state["weights"], state["optimizer"])
    else:
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(rngs[world.rank])
    for key in ("weights", "optimizer"):  # in the model and optimizer now; callers keep `state`
        state.pop(key)
    return state["step"], state["sequences_seen"], state.get("best")


def memory_gib(on: torch.device) -> float:
    """Peak allocated on the busiest GPU of this process (several when the layers are split)."""
    if on.type == "cuda":
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resident_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def compare_memory(p: Prepared, on: torch.device, before_gb: float) -> str:
    """Planned against measured peak, after the first step (on a CPU: growth of resident memory)."""
    measured = memory_gib(on) - (0 if on.type == "cuda" else before_gb)
    planned = p.memory.estimate.peak / planner.GiB
    kind = "max allocated" if on.type == "cuda" else "resident memory growth"
    return (f"memory after the first step: peak of the tensors {measured:.2f} GiB measured ({kind}), "
            f"{planned:.2f} GiB planned")


def oom_message(p: Prepared, on: torch.device) -> str:
    total = torch.cuda.get_device_properties(on).total_memory / 2**30 if on.type == "cuda" else 0
    peak = memory_gib(on)
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
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(on.type, dtype=dtype)


def step_loss(model, batches, t, on: torch.device, dtype: torch.dtype, offload: bool = False) -> float:
    """One optimizer step's worth of forward/backward; returns the mean loss. `model` is the
    trainee's loss module; a plain causal LM (as bench/point.py passes the model build_model made)
    is wrapped in one, with `offload`. Under DDP the gradients are averaged across processes once,
    in the last micro-batch's backward."""
    if not isinstance(model, (loss.ChunkedLoss, torch.nn.parallel.DistributedDataParallel)):
        model = loss.ChunkedLoss(model, t.loss_chunk, offload)  # FSDP2 keeps the class (a subclass)
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


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A scheduler's SIGTERM gets the same clean checkpoint as Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class InfoColumn(ProgressColumn):
    """A task's `info` field (the training loop's loss line); tasks without one show nothing."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


PLAIN_EVERY = 30.0  # seconds between the plain progress lines of a task when stdout is not a terminal


class LoggedProgress(Progress):
    """A progress bar that, where it is not drawn (stdout is a file, a pipe, a scheduler's log), prints a
    plain line per task every PLAIN_EVERY seconds and when it finishes: what, how far, the rate. rich
    has no such mode. A task added with `own_lines=True` (training, which logs its steps) prints none."""

    def add_task(self, description, *args, own_lines: bool = False, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._lines = {**getattr(self, "_lines", {}), task_id: None if own_lines else time.monotonic()}
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def _say(self, task_id) -> None:
        said = self._lines.get(task_id)
        if not self.disable or said is None:
            return
        task = self._tasks[task_id]
        done = task.total is not None and task.completed >= task.total
        if not done and time.monotonic() - said < PLAIN_EVERY:
            return
        self._lines[task_id] = None if done else time.monotonic()  # the finished line is the last
        self.console.print(plain_line(task, done), highlight=False, soft_wrap=True)


def plain_line(task, done: bool) -> str:
    """`perplexity: 12/40 (30%), 1.3/s, 9s, about 21s left  info`: one task's progress as text."""
    elapsed = task.elapsed or 0.0
    rate = task.completed / elapsed if elapsed > 0 else 0.0
    far = f"{task.completed:,.0f}/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else f"{task.completed:,.0f}"
    line = f"{task.description}: {far}, {rate:,.2f}/s, {elapsed:,.0f}s"
    if done:
        line += " (done)"
    elif rate > 0 and task.total:
        line += f", about {(task.total - task.completed) / rate:,.0f}s left"
    info = str(task.fields.get("info", "")).strip()
    return f"{line}  {info}" if info else line


def progress_bar(console: Console) -> Progress:
    """The one progress display of every command: drawn in a terminal, plain lines elsewhere."""
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        InfoColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


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
    """Train from `checkpoint` (see latest_checkpoint) or from step 0; returns the run folder. A fresh
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
            with sigterm_as_interrupt():  # also while the weights load: a SIGTERM then leaves nothing
                # on resume too: a longer train.steps must survive the next --resume
                run.write_text(folder / run.RECIPE, f"# pi-lora {__version__}: resolved recipe\n" + dump(p.recipe))
                if not resume or not (folder / run.META).is_file():
                    run.write_json(folder / run.META, metadata(p))
                distributed.barrier(world)
                done = _loop(p, console, checkpoint)
        except BaseException as e:
            if fresh and not run.checkpoints(folder):
                shutil.rmtree(folder, ignore_errors=True)
                if previous is not None:
                    run.put_back(previous, folder)
                    kept = f"No checkpoint was written yet; the previous run in {folder} is kept as it was."
                    if isinstance(e, (KeyboardInterrupt, Interrupted)):
                        raise Interrupted(f"interrupted. {kept}") from None
                    run.say(f"[yellow]note[/]: {kept}")
                    raise
            run.drop(previous)
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted. {after_stop(folder)}") from None
            raise
        run.drop(previous)
        return done


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


def build_model(recipe: Recipe, config, on: torch.device, dtype: torch.dtype, settings: planner.Settings,
                split: list[int] | None = None):
    """The model `pi-lora train` trains, and the benchmarks measure: the base with the rope setting
    in `config`, quantized as the recipe says, LoRA (and trained embed/norm) added, the memory
    settings applied (layers checkpointed, narrow 16-bit activations, tiled MLPs and attention
    blocks), trainable weights in fp32."""
    m = recipe.model
    try:
        base = model.load_base(m, config, on, split=split)
        net = model.add_lora(base, recipe.lora, settings.gradient_checkpointing)
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"out of memory loading the base {m.base} ({m.quant}); try model.quant nf4.") from None
    memory.narrow(net, dtype)
    kernels.apply(net, recipe.train.kernels, on)  # after peft and narrow, before the MLP tiling wraps mlp.forward
    if settings.mlp_tile:
        memory.tile_mlps(net, settings.mlp_tile)
    if settings.attention_tile:
        memory.tile_attention(net, settings.attention_tile)
    for x in trainable(net).values():  # AdamW updates of ~lr vanish in 16-bit weights; autocast handles compute
        x.data = x.data.float()
    return net


def build(p: Prepared, console: Console, on: torch.device, dtype: torch.dtype) -> Trainee:
    """The model (build_model), sharded when asked, with its optimizer and schedule."""
    m, t, world = p.recipe.model, p.recipe.train, distributed.current()
    console.print(f"loading {m.base} ({m.quant}, compute {str(dtype).removeprefix('torch.')}) on {on.type}")
    if kernels.describe(t.kernels, on):
        console.print(kernels.describe(t.kernels, on))
    net = build_model(p.recipe, p.config, on, dtype, p.settings, p.memory.split if m.gpus > 1 else None)
    step_model = loss.ChunkedLoss(net, t.loss_chunk, p.settings.offload_activations)
    if m.shard:
        distributed.shard_model(step_model)
        console.print(f"sharded (FSDP2) across {world.size} processes")
    elif world.size > 1:
        step_model = distributed.data_parallel(step_model, on)
    params = list(trainable(net).values())  # after sharding: FSDP replaces them with sharded ones
    console.print(f"trainable parameters: {sum(x.numel() for x in params):,}")
    optimizer = torch.optim.AdamW(param_groups(net, p.recipe), lr=t.lr, betas=tuple(t.betas),
                                  weight_decay=t.weight_decay)
    return Trainee(net, step_model, params, optimizer, scheduler(optimizer, t))


def param_groups(net, recipe: Recipe) -> list[dict]:
    """AdamW's groups: everything at train.lr, the trained embeddings at lora.embed_lr when set (the
    schedule scales every group alike)."""
    weights = trainable(net)
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
    before = resident_gb()
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
    done, seen, best = restore(*checkpoint, trainee.net, trainee.optimizer, trainee.scheduler)
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
    state.rng = distributed.gather(rng_state(), world)
    first = state.done + 1
    with progress_bar(console) as bar, sigterm_as_interrupt():
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
    state.rng, state.done, state.updating = distributed.gather(rng_state(), world), step, False
    seconds = time.perf_counter() - began
    tokens_per_step = p.per_step * pose.train_len(p.recipe.rope)
    return {
        "step": step, "loss": value, "lr": lr, "grad_norm": float(norm),
        "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
        "mem_gib": round(memory_gib(on), 3), "seconds": seconds,
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
    save_checkpoint(p.folder, step, step * p.per_step, trainee.net, trainee.optimizer, trainee.scheduler, state.rng,
                    t.keep_checkpoints, state.best, p.recipe.model_dump(mode="json"))
    state.saved = step


def save_interrupted(p: Prepared, trainee: Trainee, state: RunState) -> None:
    """On Ctrl-C or SIGTERM, a checkpoint of the last whole step unless one holds it already. Cut inside
    an update, only the last checkpoint is consistent. Sharded, saving gathers across ranks, which the
    signal may have caught mid-collective: the last periodic checkpoint stays."""
    if not state.updating and state.done > state.saved and not p.recipe.model.shard:
        save_state(p, trainee, state, state.done)


def finish(p: Prepared, net, console: Console) -> None:
    """Write the adapter with its model card, record its step, and name outputs it makes stale."""
    folder, world, steps = p.folder, distributed.current(), p.recipe.train.steps
    weights = distributed.full(trainable(net)) if p.recipe.model.shard else None
    check_finite(weights if weights is not None else trainable(net), steps)
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
