"""One benchmark point: a method's training steps at one length, measured in a fresh process.

A point is a JSON object: `base` (a model folder), `device` (cpu or cuda), `length`, `method`
(`usual`: the loop of bench/usual.py; `pi-lora`: the model `pi-lora train` builds,
pi_lora.model.build, stepped by pi_lora.train.step_loss through its loss module, pi_lora.loss.ChunkedLoss),
`recipe` (pi-lora only: recipe values over the defaults, as a recipe file nests them) and `steps` (default 1). Each step is
zero_grad, forward + backward, gradient clipping and an AdamW step, as `pi-lora train` does.

Measured, from after the model is loaded (the load's own peak is not a step's):
  cuda: peak torch.cuda.max_memory_allocated and max_memory_reserved over the steps;
  cpu:  peak resident memory (sampled every millisecond) minus the process's resident memory
        before the model was loaded (Python and the libraries). glibc's malloc is told to return
        freed blocks at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors.
A fresh process per point, so no point inherits another's allocator state, caches or compiled
kernels. Out of memory on a GPU is a result ("oom"), not an error.

    python bench/point.py '{"base": "/tmp/base", "device": "cpu", "length": 2048, "method": "pi-lora"}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spec(base: Path, device: str, length: int, steps: int, recipe: dict | None = None) -> dict:
    """A point: `steps` steps at `length` on the base in `base`; the usual loop, or pi-lora with
    `recipe` (values over the defaults, nested as in a recipe file)."""
    point = {"base": str(base), "device": device, "length": length, "steps": steps, "method": "usual"}
    return point | ({"method": "pi-lora", "recipe": recipe} if recipe is not None else {})


def measure(point: dict, threads: int = 0, cap: float | None = None) -> dict:
    """Run `point` in a fresh process, stopped at `cap` seconds (bench/timebox.py); its record
    (with `status` ok, oom, failed or capped)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if cap is None:
        out = subprocess.run([sys.executable, __file__, json.dumps(point)], capture_output=True, text=True, env=env)
        rc, text, capped = out.returncode, out.stdout + "\n" + out.stderr, False
    else:
        from timebox import run

        ended = run([sys.executable, __file__, json.dumps(point)], cap, env=env, grace=5)
        rc, text, capped = ended.rc, ended.output, ended.capped
    if capped:
        return {"status": "capped", "error": f"stopped at its cap of {cap:.0f} s"}
    found = [line for line in text.splitlines() if line.startswith('{"status"')]
    if rc != 0 or not found:
        why = "killed (out of memory?)" if rc in (-9, 137) else text.strip()[-3000:]
        return {"status": "failed", "error": why}
    return json.loads(found[-1])


class Peak:
    """Peak memory over the steps: the GPU allocator's statistics, or a thread sampling resident memory."""

    def __init__(self, on):
        import psutil
        import torch

        self.torch, self.on, self.proc = torch, on, psutil.Process()
        self.baseline = self.proc.memory_info().rss

    def start(self) -> dict:
        torch = self.torch
        if self.on.type == "cuda":
            torch.cuda.synchronize(self.on)
            loaded = torch.cuda.memory_allocated(self.on)
            torch.cuda.reset_peak_memory_stats(self.on)
            return {"loaded": loaded}
        self.peak, self.running = self.proc.memory_info().rss, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return {"loaded": self.peak - self.baseline}

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> dict:
        torch = self.torch
        if self.on.type == "cuda":
            return {"peak": torch.cuda.max_memory_allocated(self.on), "reserved": torch.cuda.max_memory_reserved(self.on)}
        self.running = False
        self.thread.join()
        return {"peak": self.peak - self.baseline}


def pi_lora_model(point: dict, on):
    """The model and step of `pi-lora train` for this point's recipe: (step, Peak, planned peak, vocab)."""
    import torch

    from pi_lora import loss, model, plan, preflight, train
    from pi_lora.recipe import Recipe

    values = point.get("recipe", {})
    recipe = Recipe.model_validate({**values, "model": {**values.get("model", {}), "base": point["base"]},
                                    "rope": {"scaling": "linear", **values.get("rope", {}), "target_len": point["length"]},
                                    "train": {"grad_accum": 1, **values.get("train", {})}})  # a step: one batch
    config, _ = preflight.config_for(recipe)
    dtype = model.compute_dtype(recipe.model.compute_dtype, on)
    settings = plan.Settings.of(recipe, dtype.itemsize)
    planned = plan.estimate(plan.Shape.of(config), settings, cuda=on.type == "cuda").peak
    train.seed_everything(recipe.train.seed)
    peak = Peak(on)  # libraries imported, config read; nothing of the model yet
    net = model.build(recipe, config, on, dtype, settings).train()
    params = list(model.trainable(net).values())
    step_model = loss.ChunkedLoss(net, recipe.train.loss_chunk, settings.offload_activations)
    t = recipe.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    def step(ids) -> float:
        opt.zero_grad(set_to_none=True)
        value = train.step_loss(step_model, iter([ids]), t, on, dtype)
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        opt.step()
        return value

    return step, peak, planned, config.vocab_size


def usual_model(point: dict, on):
    """The usual loop (bench/usual.py): (step, Peak, None, vocab)."""
    import torch

    import usual

    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    torch.manual_seed(0)
    peak = Peak(on)
    net = usual.load(point["base"], point["length"], on, dtype).train()
    opt = usual.optimizer(net)
    return (lambda ids: usual.step(net, opt, ids, dtype)), peak, None, net.config.vocab_size


def run(point: dict) -> dict:
    import torch

    on = torch.device(point["device"])
    if on.type == "cuda":
        on = torch.device("cuda", torch.cuda.current_device())
    build = usual_model if point["method"] == "usual" else pi_lora_model
    from pi_lora.errors import OutOfMemory

    try:
        step, peak, planned, vocab = build(point, on)
    except (torch.OutOfMemoryError, OutOfMemory):
        return {"status": "oom", "error": "out of memory while loading"}
    record = {"status": "ok", **peak.start(), "planned": planned, "seconds": [], "losses": []}
    ids = torch.randint(0, vocab, (1, point["length"]), generator=torch.Generator().manual_seed(0)).to(on)
    try:
        for _ in range(point.get("steps", 1)):
            began = time.perf_counter()
            record["losses"].append(step(ids))
            if on.type == "cuda":
                torch.cuda.synchronize(on)
            record["seconds"].append(time.perf_counter() - began)
    except torch.OutOfMemoryError:
        record["status"] = "oom"
    record |= peak.stop()
    return record


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
