"""Peak memory of a pi-lora training step against `pi-lora plan`'s prediction (CPU).

A LLaMA-7B-shaped model (hidden 4096, MLP 11008, vocab 32000, 32 heads; 2 layers, random weights,
built here) is trained for one step (forward, backward, AdamW) in a fresh process per point, through
pi-lora's own code path (load_base, add_lora, tile_mlps, step_loss). The measured peak is the
process's resident memory, sampled every millisecond during the step, minus its resident memory
before the model was loaded (Python and the libraries). glibc's malloc is told to return freed
blocks at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors.

    python bench/memory.py                # all points; appends a table to docs/benchmarks.md
    python bench/memory.py --points 2     # the first two only (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
# (compute dtype, target_len, loss_chunk, mlp_tile, gradient checkpointing)
POINTS = [
    ("fp32", 2048, 0, 0, True),
    ("fp32", 4096, 0, 0, True),
    ("fp32", 2048, 1024, 0, True),
    ("fp32", 4096, 1024, 0, True),
    ("fp32", 4096, 1024, 1024, True),
    ("bf16", 2048, 1024, 0, True),
    ("bf16", 4096, 1024, 0, True),
    ("bf16", 4096, 1024, 1024, True),
    ("fp32", 2048, 1024, 0, False),
    ("fp32", 8192, 1024, 1024, True),
    ("bf16", 8192, 1024, 1024, True),
]

WORKER = r"""
import json, os, sys, threading, time
import psutil, torch
sys.path.insert(0, sys.argv[3])
proc = psutil.Process()
baseline = proc.memory_info().rss
from pi_lora import model, train, memory
from pi_lora.recipe import Recipe
folder, point = sys.argv[1], json.loads(sys.argv[2])
dtype, length, chunk, tile, ckpt = point
recipe = Recipe.model_validate({
    "model": {"base": folder, "quant": "nf4", "compute_dtype": dtype, "gradient_checkpointing": ckpt},
    "rope": {"target_len": length},
    "train": {"loss_chunk": chunk, "mlp_tile": tile, "grad_accum": 1, "batch_size": 1},
})
config = model.load_config(folder)
from pi_lora import rope
rope.apply(config, rope.interpolation(config, length, "linear"))
on = torch.device("cpu")
baseline = proc.memory_info().rss  # libraries imported; nothing of the model yet
net = model.add_lora(model.load_base(recipe.model, config, on), recipe.lora, ckpt)
memory.narrow(net, model.compute_dtype(dtype, on))
if tile:
    memory.tile_mlps(net, tile)
params = [p for p in net.parameters() if p.requires_grad]
for p in params:
    p.data = p.data.float()
opt = torch.optim.AdamW(params, lr=1e-4)
net.train()
loaded = proc.memory_info().rss
peak, running = [loaded], True
def sample():
    while running:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(0))
batches = iter([ids])
t = time.perf_counter()
train.step_loss(net, batches, recipe.train, on, model.compute_dtype(dtype, on))
opt.step()
seconds = time.perf_counter() - t
running = False
thread.join()
print(json.dumps({"measured": peak[0] - baseline, "loaded": loaded - baseline, "seconds": seconds}))
"""


def build_base(folder: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cpu"):
        net = LlamaForCausalLM(config).to(torch.bfloat16)
    net.save_pretrained(folder)
    return folder


def predict(point: tuple, layers: int) -> dict:
    """The plan's estimate for one point, computed here from the same config and recipe."""
    from transformers import LlamaConfig

    from pi_lora import plan
    from pi_lora.recipe import Recipe

    dtype, length, chunk, tile, ckpt = point
    recipe = Recipe.model_validate({
        "model": {"base": "x", "quant": "nf4", "compute_dtype": dtype, "gradient_checkpointing": ckpt},
        "rope": {"target_len": length}, "train": {"loss_chunk": chunk, "mlp_tile": tile},
    })
    shape = plan.Shape.of(LlamaConfig(num_hidden_layers=layers, **SHAPE))
    e = plan.estimate(shape, plan.Settings.of(recipe, 2 if dtype == "bf16" else 4), cuda=False)
    return {"predicted": e.peak, "parts": e.parts}


def measure(folder: Path, point: tuple, threads: int = 0) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", WORKER, str(folder), json.dumps(point), str(ROOT)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"point {point} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(point: tuple, r: dict) -> str:
    dtype, length, chunk, tile, ckpt = point
    gib = 2**30
    error = (r["predicted"] - r["measured"]) / r["measured"]
    return (f"| {dtype} | {length:,} | {chunk or 'off'} | {tile or 'off'} | {'on' if ckpt else 'off'} | "
            f"{r['measured'] / gib:.2f} | {r['predicted'] / gib:.2f} | {error:+.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--points", type=int, default=len(POINTS))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="only the points of this compute dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per point [default: all]")
    parser.add_argument("--skip", type=int, default=0, help="skip the first SKIP points (after --dtype)")
    parser.add_argument("--only", help="comma-separated indices into POINTS (overrides --dtype/--skip/--points)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--save", type=Path, help="also write the measurements to this JSON file")
    parser.add_argument("--reuse", type=Path, nargs="+", help="compare saved measurements with the current plan, measuring nothing")
    args = parser.parse_args()
    lines = ["| compute | length | loss_chunk | mlp_tile | checkpointing | measured GiB | plan GiB | plan error |",
             "|---|---|---|---|---|---|---|---|"]
    results = []
    if args.reuse:
        for path in args.reuse:
            saved = json.loads(path.read_text())
            args.layers = saved["layers"]
            results += [(tuple(p), {**r, **predict(tuple(p), args.layers)}) for p, r in saved["results"]]
        lines += [row(p, r) for p, r in results]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_base(Path(tmp) / "llama7b-shaped", args.layers)
            chosen = [p for p in POINTS if args.dtype in (None, p[0])][args.skip:][: args.points]
            if args.only:
                chosen = [POINTS[int(i)] for i in args.only.split(",")]
            for point in chosen:
                r = {**measure(folder, point, args.threads), **predict(point, args.layers)}
                results.append((point, r))
                lines.append(row(point, r))
                print(lines[-1], f"({r['seconds']:.0f} s)", flush=True)
                if args.save:
                    args.save.write_text(json.dumps({"layers": args.layers, "results": results}))
    slopes = per_token(results)
    text = "\n".join(lines) + "\n\n" + slopes
    print(text)
    if not args.no_write:
        import torch

        header = (f"\n## Peak memory of a training step vs `pi-lora plan` (CPU, {time.strftime('%Y-%m-%d')})\n\n"
                  f"LLaMA-7B-shaped, {args.layers} layers (hidden 4096, MLP 11008, vocab 32000), random weights, "
                  "NF4, LoRA r=8 on q/k/v/o, batch 1, one step (forward, backward, AdamW), a fresh process per "
                  "row; measured = peak resident memory during the step minus the process before loading. "
                  f"{platform.processor() or platform.machine()}, torch {torch.__version__}. "
                  "Command: `python bench/memory.py`.\n\n")
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(header + text + "\n")


def per_token(results: list) -> str:
    """Memory per extra token, measured against planned, between rows that differ only in length."""
    out = []
    for i, (a, ra) in enumerate(results):
        for b, rb in results[i + 1:]:
            if a[0] == b[0] and a[2:] == b[2:] and b[1] > a[1]:
                n = b[1] - a[1]
                measured = (rb["measured"] - ra["measured"]) / n
                planned = (rb["predicted"] - ra["predicted"]) / n
                out.append(f"- {a[0]}, loss_chunk {a[2] or 'off'}, mlp_tile {a[3] or 'off'}: "
                           f"{measured / 1024:.0f} KiB per extra token measured, {planned / 1024:.0f} KiB planned "
                           f"({a[1]:,} -> {b[1]:,})")
    return "Memory per extra token:\n\n" + "\n".join(out) if out else ""


if __name__ == "__main__":
    main()
