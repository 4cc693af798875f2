"""Checkpoints: written, read back verified, passed over when damaged, restored into a run.

A checkpoint is tensors (safetensors) and plain data (JSON), never a pickle: loading one from a
shared run folder must not run code. `pack` moves every tensor of a nested state (optimizer state
keyed by index or, sharded, by name; RNG states) into a flat safetensors dict and leaves a
reference; the JSON keeps what Python types the rest had (int keys, tuples, numpy arrays), so
`unpack` gives back exactly what was saved and a resumed run is bit-identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import distributed, quant, run
from .errors import PiLoraError, first_line
from .model import trainable

FORMAT = 1


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


def save(folder: Path, step: int, sequences_seen: int, net, optimizer, sched, rng: list[dict],
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
        state = {"format": FORMAT, "step": step, "sequences_seen": sequences_seen, "sharded": sharded,
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


def read(checkpoint: Path) -> dict:
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
    if state.get("format") != FORMAT or run.TENSORS not in files:
        raise Damaged(f"{run.STATE} has format {state.get('format')!r}, not {FORMAT}")
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


def latest(folder: Path, console: Console) -> tuple[Path, dict] | None:
    """The newest checkpoint that is whole, and its state; a damaged newer one is passed over with a
    message saying which and why. None when the run has none; an error when none is readable."""
    problems = []
    for checkpoint in reversed(run.checkpoints(folder)):
        try:
            state = read(checkpoint)
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
