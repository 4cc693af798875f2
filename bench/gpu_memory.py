"""GPU memory and speed of one training step, LLaMA-7B-shaped NF4 base: the usual loop against pi-lora's.

Model: LLaMA-7B's shapes (hidden 4096, 32 layers, MLP 11008, vocab 32000, 32 heads, trained length
2048) with random bf16 weights (no download), NF4 with double quantization, bf16 compute, LoRA r=8
(alpha 16) on q/k/v/o, non-reentrant gradient checkpointing, SDPA attention, batch 1, AdamW. PI to
each measured length L: rope linear, factor L/2048 (the rotary embedding is rebuilt per length).

Methods, alternated step by step on the same model:
  usual       model(input_ids=ids, labels=ids).loss.backward() under bf16 autocast (what a
              transformers + peft + bitsandbytes loop, or the HF Trainer with bf16, does: full-length
              logits, then the loss)
  pi-lora     pi_lora.loss.backward with train.loss_chunk 4096 (pi-lora's default step)
  pi-lora-min pi-lora's lowest-memory setting: loss_chunk 4096 + train.mlp_tile 4096
              (pi_lora.memory.tile_mlps) + train.offload_activations (save_on_cpu)
each followed by gradient clipping and an AdamW step, as `pi-lora train` does.

Why one model for all methods: the base is loaded once through pi-lora's own code path
(pi_lora.model.load_base + add_lora with lora.trainable []), which is exactly the usual load:
from_pretrained(BitsAndBytesConfig nf4/double quant/bf16) + prepare_model_for_kbit_training(model,
True, {"use_reentrant": False}) + get_peft_model(LoraConfig(r=8, alpha=16, q/k/v/o)). A second 7B
load would cost half a minute of a 15-minute GPU lease and hold 4 GB more during the measurements.
`--usual-load-check` also loads a second model with that plain usual code and checks it gets the
same trainable tensors and the same loss (on by default with --tiny).

Why a folder on disk: load_base takes a model folder (as users give one), so random bf16 weights are
written once as standard safetensors shards (13.5 GB; generated on the GPU, written to /dev/shm
when it has room, else to /tmp) and loaded with quantization by from_pretrained: the same path a
real LLaMA-7B takes, with no download. Building the model on the meta device and quantizing in place
would skip pi-lora's loader, which is part of what is measured.

Measured per method and length: peak torch.cuda.max_memory_allocated and max_memory_reserved over a
step (empty_cache + reset_peak_memory_stats before each step), seconds per step (median of
--rounds steps after one warm-up step per method at the first length), tokens/s = L / median step.
Out of memory is recorded as OOM (caught, memory freed, the run goes on). Then the largest length that
fits, doubling from the first length with one step each: in 24 GiB (emulated with
torch.cuda.set_per_process_memory_fraction; a step whose whole-card peak reserved memory is at most
24 GiB is counted as fitting and one whose peak allocated memory is above it as not, without a rerun)
and on the whole card, each until OOM or until the next step's estimated time would pass --step-cap or
the time budget (--budget seconds for the whole script).

    python3 bench/gpu_memory.py --out gpu_memory.json     # CUDA: appends to docs/benchmarks.md
    python3 bench/gpu_memory.py --device cuda --tiny      # CUDA smoke test, tiny model, no docs
    python3 bench/gpu_memory.py --dry-run                 # CPU, tiny model: the whole flow (~1 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # pi_lora from this checkout, installed or not
sys.path.insert(0, str(ROOT / "bench"))

import torch
from merge_7b import CONFIG as LLAMA_7B
from merge_7b import layer_shapes

from pi_lora import loss as pl_loss
from pi_lora import memory as pl_memory
from pi_lora import model as pl_model
from pi_lora import rope as pl_rope
from pi_lora import train as pl_train
from pi_lora.recipe import Recipe

GIB = 2**30
TINY = {**LLAMA_7B, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 128}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "usual": "usual: transformers + peft loop (full logits)",
    "pi-lora": "pi-lora (loss_chunk {chunk}{narrow})",
    "pi-lora-min": "pi-lora lowest memory (loss_chunk {chunk}, mlp_tile {tile}, offload{narrow})",
}
FIT_ORDER = ("pi-lora-min", "pi-lora", "usual")  # the search's order: what a time cut should spare first
HEADING = "## GPU: 7B-shaped NF4 memory and speed"


class Stop(BaseException):
    """SIGTERM (the caller's timeout): write what was measured, then exit."""


def on_sigterm(signum, frame):
    raise Stop()


# ---------------------------------------------------------------------------------------------------
# the base model


def build_base(folder: Path, c: dict, on: torch.device) -> float:
    """Random bf16 weights in `c`'s shapes as safetensors shards (4 layers each); returns GB written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=on).manual_seed(0)
    layers = c["num_hidden_layers"]
    groups = [list(range(i, min(i + 4, layers))) for i in range(0, layers, 4)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        shapes = {name: s for i in group for name, s in layer_shapes(i, c).items()}
        if k == 0:
            shapes["model.embed_tokens.weight"] = (c["vocab_size"], c["hidden_size"])
        if k == len(groups) - 1:
            shapes |= {"model.norm.weight": (c["hidden_size"],), "lm_head.weight": (c["vocab_size"], c["hidden_size"])}
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                w = torch.randn(shape, generator=gen, device=on, dtype=torch.float32).mul_(0.02)
                tensors[name] = w.to(torch.bfloat16).cpu()
                del w
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map |= {name: shard for name in tensors}
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    return total / 1e9


def work_folder(requested: str | None, need_bytes: int) -> Path:
    if requested:
        return Path(requested)
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base) and shutil.disk_usage(base).free > need_bytes * 1.15 + 2 * GIB:
            return Path(base) / "pi-lora-gpu-base"
    return Path(tempfile.gettempdir()) / "pi-lora-gpu-base"


def recipe_for(folder: Path, length: int, on: torch.device, chunk: int) -> Recipe:
    return Recipe.model_validate({
        "model": {"base": str(folder), "quant": "nf4", "double_quant": True,
                  "compute_dtype": "bf16" if on.type == "cuda" else "fp32",
                  "gradient_checkpointing": True, "attn_implementation": "sdpa"},
        "rope": {"target_len": length},
        "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": TARGETS, "trainable": []},
        "train": {"batch_size": 1, "grad_accum": 1, "loss_chunk": chunk},
    })


def load_pilora(folder: Path, length: int, on: torch.device, chunk: int):
    """The model as `pi-lora train` builds it (pi_lora.train._loop)."""
    r = recipe_for(folder, length, on, chunk)
    config = pl_model.load_config(r.model.base)
    pl_rope.apply(config, pl_rope.interpolation(config, length, "linear"))
    net = pl_model.add_lora(pl_model.load_base(r.model, config, on), r.lora, r.model.gradient_checkpointing)
    params = list(pl_train.trainable(net).values())
    for p in params:  # as train._loop: trainable weights in fp32
        p.data = p.data.float()
    return net, params, pl_model.compute_dtype(r.model.compute_dtype, on)


def load_usual(folder: Path, length: int, on: torch.device, dtype: torch.dtype):
    """The usual QLoRA load, written out the way a user would (for --usual-load-check)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from pi_lora import quant

    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "linear", "factor": length / config.max_position_embeddings,
                              "rope_theta": config.rope_parameters["rope_theta"]}
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    net = AutoModelForCausalLM.from_pretrained(folder, config=config, quantization_config=q, dtype=dtype,
                                               device_map={"": on.index or 0} if on.type == "cuda" else None)
    quant.protect(net)  # bitsandbytes' CPU repack trap (a no-op on CUDA); same kernels as pi-lora
    net = prepare_model_for_kbit_training(net, True, {"use_reentrant": False})
    return get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))


def inner_model(net):
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def set_length(net, length: int, original: int) -> None:
    """PI to `length` on the loaded model: config and rotary embedding (memory and time do not depend on it)."""
    inner = inner_model(net)
    cfg = inner.config
    theta = float(cfg.rope_parameters["rope_theta"])
    cfg.rope_parameters = {"rope_type": "linear", "factor": max(1.0, length / original), "rope_theta": theta}
    cfg.max_position_embeddings = max(length, original)
    rot = inner.model.rotary_emb
    fresh = type(rot)(config=cfg)
    inner.model.rotary_emb = fresh.to(rot.inv_freq.device)


def untile(net) -> None:
    """Undo pi_lora.memory.tile_mlps (it sets an instance attribute `forward` on each MLP)."""
    for layer in inner_model(net).model.layers:
        layer.mlp.__dict__.pop("forward", None)


class Narrow:
    """pi_lora.memory.narrow, which `pi-lora train` applies after add_lora (16-bit frozen embeddings and
    head, 16-bit residual stream), made switchable: on for pi-lora's steps, off for the usual loop's.

    Off restores exactly: the fp32 weights it narrowed were bf16 weights upcast by peft's k-bit
    preparation, so casting back is lossless, and its forward hooks are removed. A pi-lora without
    memory.narrow, or fp32 compute (where it does nothing), leaves this a no-op.
    """

    def __init__(self, net, dtype: torch.dtype):
        self.fn = getattr(pl_memory, "narrow", None)
        self.net, self.dtype = net, dtype
        self.available = self.fn is not None and dtype != torch.float32
        self.on, self.hooks, self.params = False, [], []

    def set(self, on: bool) -> None:
        if not self.available or on == self.on:
            return
        modules = list(inner_model(self.net).modules())
        if on:
            before = {id(m): set(m._forward_hooks) for m in modules}
            fp32 = [p for p in self.net.parameters() if p.dtype == torch.float32]
            self.fn(self.net, self.dtype)
            self.hooks = [(m, k) for m in modules for k in m._forward_hooks if k not in before[id(m)]]
            self.params = [p for p in fp32 if p.dtype != torch.float32]
        else:
            for m, k in self.hooks:
                for hooks in (m._forward_hooks, getattr(m, "_forward_hooks_with_kwargs", {}),
                              getattr(m, "_forward_hooks_always_called", {})):
                    hooks.pop(k, None)
            for p in self.params:
                p.data = p.data.float()
            self.hooks, self.params = [], []
        self.on = on


# ---------------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args, net, params, on, dtype, original: int, vocab: int):
        self.args, self.net, self.params, self.on, self.dtype = args, net, params, on, dtype
        self.original, self.vocab = original, vocab
        self.opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
        self.narrow = Narrow(net, dtype)
        self.records: list[dict] = []
        self.gen = torch.Generator().manual_seed(0)
        self.cuda = on.type == "cuda"
        self.total = torch.cuda.get_device_properties(on).total_memory if self.cuda else 0
        self.fake_limit = None  # CPU dry run: lengths >= this raise an emulated OutOfMemoryError
        if not self.cuda:
            hook = lambda mod, inp: self._fake_oom(inp[0].shape[1])
            inner_model(net).model.layers[-1].mlp.register_forward_pre_hook(hook)

    def _fake_oom(self, length: int):
        if self.fake_limit is not None and length >= self.fake_limit:
            raise torch.OutOfMemoryError(f"emulated out of memory at {length} tokens (CPU dry run)")

    def autocast(self):
        return pl_train.autocast(self.on, self.dtype)

    def ids(self, length: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (1, length), generator=self.gen).to(self.on)

    def forward_backward(self, method: str, ids: torch.Tensor, chunk: int, narrow: bool = True) -> float:
        self.narrow.set(narrow and method != "usual")
        if method == "usual":
            with self.autocast():
                value = self.net(input_ids=ids, labels=ids).loss
            value.backward()
            return value.item()
        return pl_loss.backward(self.net, ids, 1.0, chunk, self.autocast, offload=method == "pi-lora-min")

    def step(self, method: str, length: int, phase: str, context: str = "whole card",
             cap: float | None = None, fake_limit: int | None = None) -> dict:
        """One optimizer step; returns (and keeps) its record. OOM is a result, not an error."""
        a = self.args
        set_length(self.net, length, self.original)
        self.narrow.set(method != "usual")  # before the peak is reset: its casts are not part of a step
        if method == "pi-lora-min":
            pl_memory.tile_mlps(self.net, a.mlp_tile)
        rec = {"method": method, "length": length, "phase": phase, "context": context, "status": "ok"}
        oom = False
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.on)
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / self.total), self.on)
        self.fake_limit = fake_limit
        ids = self.ids(length)
        began = time.perf_counter()
        try:
            self.opt.zero_grad(set_to_none=True)
            rec["loss"] = self.forward_backward(method, ids, a.loss_chunk)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            if self.cuda:
                torch.cuda.synchronize(self.on)
        except torch.OutOfMemoryError:
            oom = True
        except Exception as e:  # noqa: BLE001 (anything else: recorded; the run goes on)
            rec["status"], rec["error"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            seconds = time.perf_counter() - began
            self.fake_limit = None
            if self.cuda and cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, self.on)
            if method == "pi-lora-min":
                untile(self.net)
        rec["seconds"] = round(seconds, 3)
        if self.cuda:
            rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.on) / GIB, 3)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.on) / GIB, 3)
        if oom or rec["status"] == "error":
            rec["status"] = rec["status"] if rec["status"] == "error" else "oom"
            rec.pop("loss", None)
            self.opt.zero_grad(set_to_none=True)
            del ids
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        else:
            rec["tokens_per_s"] = round(length / seconds, 1)
        if rec["status"] == "error":
            print(f"  error: {rec['error']}", flush=True)
        self.records.append(rec)
        self.save()
        mem = f"  peak alloc {rec['peak_allocated_gib']:.2f} GiB, reserved {rec['peak_reserved_gib']:.2f} GiB" \
            if self.cuda else ""
        print(f"[{time.perf_counter() - self.args.t0:6.0f}s] {phase:7s} {context:10s} {method:11s} {length:>7,} "
              f"{rec['status']:3s} {seconds:7.2f} s{mem}", flush=True)
        return rec

    # time --------------------------------------------------------------------------------------------

    def left(self) -> float:
        return self.args.t0 + self.args.budget - time.perf_counter()

    def estimate(self, method: str, length: int) -> float:
        """Seconds for one step at `length`, from this method's (else any method's) measured steps."""
        done = [r for r in self.records if r["status"] == "ok" and r["phase"] != "warmup"]
        pts = [r for r in done if r["method"] == method] or done
        if not pts:
            return 0.0
        by_len: dict[int, list[float]] = {}
        for r in pts:
            by_len.setdefault(r["length"], []).append(r["seconds"])
        lengths = sorted(by_len)
        top = lengths[-1]
        t_top = statistics.median(by_len[top])
        power = 1.8  # between linear (weights) and quadratic (attention) in the length
        if len(lengths) > 1:
            low = lengths[-2]
            t_low = statistics.median(by_len[low])
            if t_low > 0 and t_top > 0:
                power = min(2.2, max(1.0, math.log(t_top / t_low) / math.log(top / low)))
        return t_top * (length / top) ** power

    def affordable(self, method: str, length: int) -> str | None:
        """None if a step fits the caps, else why not."""
        est = self.estimate(method, length)
        if est > self.args.step_cap:
            return f"not tried: est. {est:.0f} s/step > cap {self.args.step_cap:.0f} s"
        if est * 1.2 + 5 > self.left():
            return f"not tried: est. {est:.0f} s > {max(0, self.left()):.0f} s left"
        return None

    # results -----------------------------------------------------------------------------------------

    def save(self) -> None:
        if self.args.out:
            Path(self.args.out).write_text(json.dumps({"meta": self.args.meta, "records": self.records}, indent=1))


def check_equivalence(b: Bench, length: int) -> dict:
    """Loss and gradients of the usual step and pi-lora's (both settings) on the same ids, no update.

    LoRA B starts at zero, which leaves every LoRA A without a gradient; it is set to small random
    values first so that every trainable tensor is compared (the benchmark does not depend on them)."""
    with torch.no_grad():
        for n, p in b.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01, generator=None)
    set_length(b.net, length, b.original)
    ids = b.ids(length)
    chunk = max(1, length // 4)  # several chunks, so the chunking is exercised
    out = {"length": length, "loss_chunk": chunk}
    grads, losses = {}, {}
    for method in METHODS:
        b.opt.zero_grad(set_to_none=True)
        if method == "pi-lora-min":
            pl_memory.tile_mlps(b.net, max(1, length // 4))
        try:  # without narrow: the chunked loss, tiling and offload alone, which change no number
            losses[method] = b.forward_backward(method, ids, chunk, narrow=False)
        finally:
            untile(b.net)
        grads[method] = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p)
                         for p in b.params]
    b.opt.zero_grad(set_to_none=True)
    scale = max(g.abs().max().item() for g in grads["usual"]) or 1.0
    for method in ("pi-lora", "pi-lora-min"):
        diff = max((g - u).abs().max().item() for g, u in zip(grads[method], grads["usual"]))
        out[method] = {"loss": losses[method], "loss_diff": abs(losses[method] - losses["usual"]),
                       "grad_max_rel_diff": diff / scale}
    if b.narrow.available:  # narrow does change numbers (a bf16 residual stream): by how much
        b.opt.zero_grad(set_to_none=True)
        narrowed = b.forward_backward("pi-lora", ids, chunk, narrow=True)
        g = [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p) for p in b.params]
        out["pi-lora+narrow"] = {"loss": narrowed, "loss_diff": abs(narrowed - losses["usual"]),
                                 "grad_max_rel_diff": max((x - u).abs().max().item()
                                                          for x, u in zip(g, grads["usual"])) / scale}
        b.opt.zero_grad(set_to_none=True)
        b.narrow.set(False)
    out["usual"] = {"loss": losses["usual"], "grad_max_abs": scale,
                    "tensors_with_gradient": sum(bool(g.abs().max() > 0) for g in grads["usual"]),
                    "tensors": len(grads["usual"])}
    del grads
    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()
    return out


def usual_load_check(folder: Path, length: int, on, dtype, b: Bench) -> dict:
    """A second model loaded with the plain usual code: same trainable tensors, same loss at init."""
    b.narrow.set(False)
    other = load_usual(folder, length, on, dtype)
    mine = {n.replace(".default", ""): tuple(p.shape) for n, p in pl_train.trainable(b.net).items()}
    theirs = {n.replace(".default", ""): tuple(p.shape) for n, p in pl_train.trainable(other).items()}
    if mine == theirs:  # the same LoRA weights in both (LoRA B was randomized by the equivalence check)
        source = pl_train.trainable(b.net)
        with torch.no_grad():
            for n, p in pl_train.trainable(other).items():
                p.copy_(source[n])
    set_length(b.net, length, b.original)
    set_length(other, length, b.original)
    ids = b.ids(length)
    with torch.no_grad(), b.autocast():
        mine_loss = b.net(input_ids=ids, labels=ids).loss.item()
        their_loss = other(input_ids=ids, labels=ids).loss.item()
    result = {"same_trainable_tensors": mine == theirs, "trainable_tensors": len(mine),
              "loss_pilora_load": mine_loss, "loss_usual_load": their_loss}
    del other
    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()
    return result


def measure(b: Bench, lengths: list[int], rounds: int) -> None:
    """Methods alternated step by step; one warm-up step each before the first length."""
    failed: set[tuple[str, int]] = set()
    for k, length in enumerate(lengths):
        for r in range((1 if k == 0 else 0) + rounds):
            phase = "warmup" if k == 0 and r == 0 else "main"
            for method in METHODS:
                if (method, length) in failed:
                    continue
                why = b.affordable(method, length)
                if why:
                    print(f"  skip {method} at {length}: {why}", flush=True)
                    continue
                rec = b.step(method, length, phase)
                if rec["status"] != "ok":
                    failed.add((method, length))


def fits_search(b: Bench, start: int, contexts: list[tuple[str, float | None, int | None]], limit: int,
                out: dict) -> None:
    """Largest length that fits per method and memory context, doubling from `start`, one step each.

    Fills `out` as it goes, so a run stopped by the time limit still reports what it found. A length
    already stepped on the whole card is not rerun there; under a cap it is not rerun when the
    whole-card peaks decide it; a step that fitted under a cap also fits the whole card."""
    for name, cap, fake in contexts:
        state = out[name] = {m: {"fits": None, "stop": None, "inferred": []} for m in FIT_ORDER}
        length = start
        while length <= limit and any(s["stop"] is None for s in state.values()):
            for method, s in state.items():
                if s["stop"] is not None:
                    continue
                recs = [r for r in b.records if r["method"] == method and r["length"] == length
                        and r["status"] != "error"]
                whole = [r for r in recs if r["context"] == "whole card"]
                status, how = None, "measured"
                if name == "whole card" and whole:
                    status, how = ("oom" if any(r["status"] == "oom" for r in whole) else "ok"), "main table"
                elif name == "whole card" and any(r["status"] == "ok" for r in recs):
                    status, how = "ok", "fitted under a smaller cap"
                elif cap is not None and whole and all("peak_reserved_gib" in r for r in whole):
                    if any(r["status"] == "oom" for r in whole):
                        status, how = "oom", "OOM on the whole card"
                    elif max(r["peak_reserved_gib"] for r in whole) * GIB <= cap:
                        status, how = "ok", "whole-card peak reserved within the cap"
                    elif max(r["peak_allocated_gib"] for r in whole) * GIB > cap:
                        status, how = "oom", "whole-card peak allocated above the cap"
                if status is None:
                    why = b.affordable(method, length)
                    if why:
                        s["stop"] = f"{length:,}: {why}"
                        continue
                    rec = b.step(method, length, "fit", name, cap, fake)
                    status = rec["status"]
                    if status == "error":
                        s["stop"] = f"{length:,}: error ({rec['error'][:80]})"
                        continue
                if how not in ("measured", "main table"):
                    s["inferred"].append(f"{length:,} {status} ({how})")
                if status == "ok":
                    s["fits"] = length
                else:
                    s["stop"] = f"{length:,}: OOM"
            length *= 2
        for s in state.values():
            if s["stop"] is None:
                s["stop"] = f"{length:,}: not tried (search limit)"


# ---------------------------------------------------------------------------------------------------
# report


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def predicted_gib(args, method: str, length: int) -> float | None:
    """`pi-lora plan`'s prediction of max_memory_allocated for a pi-lora step (None: no plan module)."""
    if method == "usual":  # the plan models pi-lora's step (narrow, chunked loss), not the usual loop
        return None
    try:
        from types import SimpleNamespace

        from pi_lora import plan

        shape = plan.Shape.of(SimpleNamespace(**args.config))
        minimal = method == "pi-lora-min"
        s = plan.Settings(target_len=length, compute_bytes=2, loss_chunk=args.loss_chunk,
                          mlp_tile=args.mlp_tile if minimal else 0, offload_activations=minimal)
        return plan.estimate(shape, s, cuda=True).peak / GIB
    except Exception:  # noqa: BLE001 (a pi-lora without this plan API: no column)
        return None


def table(b: Bench, lengths: list[int], labels: dict) -> list[str]:
    head = "| method | length | peak allocated (GiB) | plan predicts (GiB) | peak reserved (GiB) | step (s) | tokens/s | steps |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        for method in METHODS:
            recs = [r for r in b.records if r["method"] == method and r["length"] == length
                    and r["phase"] in ("warmup", "main")]
            plan = predicted_gib(b.args, method, length) if b.cuda else None
            plan = f"{plan:.2f}" if plan is not None else "-"
            if not recs:
                rows.append(f"| {labels[method]} | {length:,} | - | {plan} | - | not run (time) | - | 0 |")
                continue
            alloc = max((r.get("peak_allocated_gib", 0) for r in recs), default=0)
            reserved = max((r.get("peak_reserved_gib", 0) for r in recs), default=0)
            mem = (f"{alloc:.2f}", f"{reserved:.2f}") if b.cuda else ("-", "-")
            if any(r["status"] == "oom" for r in recs):
                rows.append(f"| {labels[method]} | {length:,} | OOM (>{alloc:.1f}) | {plan} | - | OOM | - | - |"
                            if b.cuda else f"| {labels[method]} | {length:,} | OOM | - | - | OOM | - | - |")
                continue
            timed = [r["seconds"] for r in recs if r["phase"] == "main"] or [r["seconds"] for r in recs]
            med = statistics.median(timed)
            rows.append(f"| {labels[method]} | {length:,} | {mem[0]} | {plan} | {mem[1]} | {med:.2f} "
                        f"| {length / med:,.0f} | {len(timed)} |")
    return rows


def fit_table(fits: dict, labels: dict, contexts: list[str], total_gib: float) -> list[str]:
    heads = [f"whole card ({total_gib:.0f} GiB)" if c == "whole card" and total_gib else
             f"{c} (emulated)" if c.endswith("GiB") else c for c in contexts]
    rows = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(contexts)]
    for method, label in labels.items():
        cells = []
        for c in contexts:
            s = fits[c][method]
            got = f"{s['fits']:,}" if s["fits"] else "none"
            cells.append(f"{got} (next {s['stop']})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def report(b: Bench, args, lengths, fits, equivalence, load_check, weights_gib, timings) -> str:
    narrow = ", narrow" if b.narrow.available else ""
    labels = {m: t.format(chunk=args.loss_chunk, tile=args.mlp_tile, narrow=narrow) for m, t in METHODS.items()}
    c, v, device = args.config, b.args.meta["versions"], b.args.meta["device"]
    date = time.strftime("%Y-%m-%d")
    if b.cuda:
        setup = (
            f"{date}, {device}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
            f"bitsandbytes {v['bitsandbytes']}. Model: LLaMA-shaped, hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, MLP {c['intermediate_size']}, vocab {c['vocab_size']}, "
            f"{c['num_attention_heads']} heads, trained length {c['max_position_embeddings']}; random bf16 weights "
            f"loaded as NF4 (double quant) by pi-lora's loader, bf16 compute (autocast), LoRA r=8 alpha 16 on "
            f"q/k/v/o ({sum(p.numel() for p in b.params):,} trainable), non-reentrant gradient checkpointing, "
            f"SDPA, batch 1; a step is forward + backward + clip + AdamW; PI linear, factor "
            f"L/{c['max_position_embeddings']}. The methods alternate step by step on the same model, one "
            f"warm-up step each first; step time is the median of the timed steps. Weights and LoRA on the "
            f"device before any step: {weights_gib:.2f} GiB."
        )
    else:
        setup = f"{date}, {device} (dry run: no memory figures)."
    lines = ["", f"{HEADING}{' (tiny dry run)' if args.tiny else ''}", "", setup, "", *table(b, lengths, labels), ""]
    if fits:
        intro = ("Largest length that fits (doubling from the first length, one step each; 'next' is the first "
                 "length that did not fit or was not tried, and why):")
        lines += [intro, "", *fit_table(fits, labels, list(fits), b.total / GIB), ""]
    inferred = [f"{m} {ctx}: {', '.join(s['inferred'])}" for ctx in fits for m, s in fits[ctx].items() if s["inferred"]]
    if inferred:
        lines += ["Taken from the whole-card steps rather than rerun: " + "; ".join(inferred) + ".", ""]
    if any(ctx.endswith("GiB") for ctx in fits):
        lines += [("The smaller card is emulated with torch.cuda.set_per_process_memory_fraction (the allocator's "
                   "cap); a real card of that size also holds the CUDA context, a few hundred MiB."), ""]
    eq = equivalence
    same = (
        f"Same numbers: at {eq['length']:,} tokens on the same ids (loss_chunk {eq['loss_chunk']}), pi-lora's loss "
        f"differs from the usual one by {eq['pi-lora']['loss_diff']:.2e} (lowest-memory setting: "
        f"{eq['pi-lora-min']['loss_diff']:.2e}); LoRA gradients by at most {eq['pi-lora']['grad_max_rel_diff']:.2e} "
        f"({eq['pi-lora-min']['grad_max_rel_diff']:.2e}) of the largest gradient ({eq['usual']['tensors_with_gradient']} "
        f"of {eq['usual']['tensors']} LoRA tensors with a nonzero gradient)."
    )
    if "pi-lora+narrow" in eq:
        n = eq["pi-lora+narrow"]
        same += (
            " 'narrow' is pi_lora.memory.narrow as `pi-lora train` applies it (frozen embeddings and head, and the "
            "residual stream, in bf16 rather than the fp32 that peft's k-bit preparation leaves; the usual rows run "
            f"without it): it changes the loss by {n['loss_diff']:.2e} and the gradients by up to "
            f"{n['grad_max_rel_diff']:.2e} of the largest."
        )
    lines += [same, ""]
    if load_check:
        lines += [(f"Usual load written out separately (transformers + peft + bitsandbytes): same trainable tensors: "
                   f"{load_check['same_trainable_tensors']}; loss {load_check['loss_usual_load']:.6f} vs "
                   f"{load_check['loss_pilora_load']:.6f} through pi-lora's loader."), ""]
    if not args.tiny:
        embed = c["vocab_size"] * c["hidden_size"]
        lines += [(f"Not measured: the shipped recipe `llama-7b-16k` also trains embeddings and norms "
                   f"(lora.trainable [embed, norm]); by arithmetic that adds about {embed * 16 / GIB:.1f} GiB "
                   f"({embed / 1e6:.0f}M fp32 weights: the trainable copy, its gradient and two AdamW moments)."), ""]
    stopped = " (stopped by the time limit)" if timings.get("stopped") else ""
    lines += [(f"Times: base built in {timings['build']:.0f} s, loaded in {timings['load']:.0f} s; whole script "
               f"{time.perf_counter() - args.t0:.0f} s{stopped}. Command: `bash bench/gpu.sh full` (runs "
               f"`python3 bench/gpu_memory.py`)."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA (hidden 64, 2 layers, vocab 512) for testing")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    p.add_argument("--lengths", default=None, help="main-table lengths [16384,32768; tiny 256,512]")
    p.add_argument("--rounds", type=int, default=2, help="timed steps per method and length")
    p.add_argument("--loss-chunk", type=int, default=None, help="[4096; tiny 128]")
    p.add_argument("--mlp-tile", type=int, default=None, help="[4096; tiny 128]")
    p.add_argument("--fit-gib", type=float, default=24.0, help="the smaller card to emulate (GiB)")
    p.add_argument("--no-fit", action="store_true", help="skip the largest-length search")
    p.add_argument("--search-limit", type=int, default=None, help="longest length tried [1048576; tiny 4096]")
    p.add_argument("--budget", type=float, default=260.0, help="seconds for the whole script; stops starting steps")
    p.add_argument("--step-cap", type=float, default=60.0, help="no step whose estimated time is above this")
    p.add_argument("--work", default=None, help="folder for the random base [/dev/shm or /tmp]")
    p.add_argument("--keep-base", action="store_true", help="keep (and reuse) the base folder")
    p.add_argument("--usual-load-check", action=argparse.BooleanOptionalAction, default=None,
                   help="also load the usual way separately and compare [on with --tiny]")
    p.add_argument("--out", default=None, help="JSON file for all records (rewritten after each step)")
    p.add_argument("--md", default=None, help="also write the markdown section to this file")
    p.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    args = p.parse_args()
    args.t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    on = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = on.type == "cuda"
    if cuda:
        on = torch.device("cuda", torch.cuda.current_device())
    tiny = args.tiny
    args.config = c = dict(TINY if tiny else LLAMA_7B)
    lengths = [int(x) for x in (args.lengths or ("256,512" if tiny else "16384,32768")).split(",")]
    args.loss_chunk = args.loss_chunk or (128 if tiny else 4096)
    args.mlp_tile = args.mlp_tile or (128 if tiny else 4096)
    args.search_limit = args.search_limit or (2**20 if not tiny else 16384 if cuda else 4096)
    if args.usual_load_check is None:
        args.usual_load_check = tiny
    name = torch.cuda.get_device_name(on) if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    total = torch.cuda.get_device_properties(on).total_memory if cuda else 0
    args.meta = {"device": f"{name}, {total / GIB:.1f} GiB" if cuda else name, "date": time.strftime("%Y-%m-%d"),
                 "versions": versions(), "config": c, "lengths": lengths, "loss_chunk": args.loss_chunk,
                 "mlp_tile": args.mlp_tile, "budget_s": args.budget, "step_cap_s": args.step_cap}
    print(f"device: {args.meta['device']}; versions: {args.meta['versions']}", flush=True)

    need = sum(math.prod(s) for i in range(c["num_hidden_layers"]) for s in layer_shapes(i, c).values()) * 2 \
        + 2 * c["vocab_size"] * c["hidden_size"] * 2
    folder = work_folder(args.work, need)
    timings = {"build": 0.0, "load": 0.0}
    equivalence, load_check, fits, b = None, None, {}, None
    try:
        t = time.perf_counter()
        if not (args.keep_base and (folder / "config.json").is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            gb = build_base(folder, c, on)
            print(f"built a random {gb:.1f} GB bf16 base in {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        timings["build"] = time.perf_counter() - t
        t = time.perf_counter()
        net, params, dtype = load_pilora(folder, lengths[0], on, args.loss_chunk)
        net.train()
        timings["load"] = time.perf_counter() - t
        weights_gib = torch.cuda.memory_allocated(on) / GIB if cuda else 0.0
        print(f"loaded through pi_lora.model.load_base + add_lora in {timings['load']:.0f} s; "
              f"{sum(p.numel() for p in params):,} trainable; on device {weights_gib:.2f} GiB", flush=True)
        b = Bench(args, net, params, on, dtype, c["max_position_embeddings"], c["vocab_size"])
        equivalence = check_equivalence(b, 256 if tiny else 4096)
        print(f"equivalence: {json.dumps(equivalence)}", flush=True)
        if args.usual_load_check:
            load_check = usual_load_check(folder, lengths[0], on, dtype, b)
            print(f"usual load check: {json.dumps(load_check)}", flush=True)
        if not args.keep_base:  # its pages would stay in RAM (/dev/shm), where offloading needs room
            shutil.rmtree(folder, ignore_errors=True)
        args.meta |= {"weights_gib": weights_gib, "equivalence": equivalence, "usual_load_check": load_check,
                      "narrow": b.narrow.available}
        measure(b, lengths, args.rounds)
        if not args.no_fit:
            contexts = []
            if cuda and not tiny and args.fit_gib * GIB < total:
                contexts.append((f"{args.fit_gib:g} GiB", args.fit_gib * GIB, None))
            elif cuda and tiny:  # smoke test: a small cap, so the real OOM path runs on the GPU
                contexts.append(("small cap", weights_gib * GIB + 32 * 2**20, None))
            elif not cuda:  # dry run: emulated OOM at a length, for each context
                contexts.append(("fake cap", None, 2 * lengths[-1]))
            contexts.append(("whole card", None, 4 * lengths[-1] if not cuda else None))
            fits_search(b, lengths[0], contexts, args.search_limit, fits)
    except KeyboardInterrupt:
        timings["stopped"] = True
        print("interrupted: writing what was measured", flush=True)
    except Stop:
        timings["stopped"] = True
        print("stopped by SIGTERM: writing what was measured", flush=True)
    finally:
        if not args.keep_base:
            shutil.rmtree(folder, ignore_errors=True)
    if b is None or equivalence is None:
        sys.exit("nothing measured")
    for ctx in fits.values():  # a search cut by the time limit
        for s in ctx.values():
            s["stop"] = s["stop"] or "not finished (time limit)"
    b.args.meta["fits"] = fits
    b.save()
    text = report(b, args, lengths, fits, equivalence, load_check, args.meta.get("weights_gib", 0.0), timings)
    print(text, flush=True)
    if args.md:
        Path(args.md).write_text(text.lstrip("\n"))
    if cuda and not tiny and not args.no_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(text)
        print("appended to docs/benchmarks.md", flush=True)


if __name__ == "__main__":
    main()
