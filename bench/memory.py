"""Peak memory of a pi-lora training step against `pi-lora plan`'s prediction (CPU).

A LLaMA-7B-shaped model (hidden 4096, MLP 11008, vocab 32000, 32 heads; 2 layers, random weights,
written by bench/llama.py) is trained for one step in a fresh process per point (bench/point.py):
the model `pi-lora train` builds (pi_lora.train.build_model) and its step (train.step_loss, gradient
clipping, AdamW). Measured: the peak resident memory during the step minus the process's resident
memory before the model was loaded (see bench/point.py).

    python bench/memory.py                # all points; writes its section of docs/benchmarks.md
    python bench/memory.py --points 2     # the first two only (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from report import write_section  # noqa: E402
from point import measure as run_point  # noqa: E402

HEADING = "## Peak memory of a training step vs `pi-lora plan`"
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


def build_base(folder: Path, layers: int) -> Path:
    from llama import LLAMA_7B, build_base

    return build_base(folder, {**LLAMA_7B, **SHAPE, "num_hidden_layers": layers})


def recipe_values(point: tuple) -> dict:
    dtype, length, chunk, tile, ckpt = point
    return {"model": {"quant": "nf4", "compute_dtype": dtype, "gradient_checkpointing": ckpt},
            "train": {"loss_chunk": chunk, "mlp_tile": tile, "grad_accum": 1, "batch_size": 1}}


def predict(point: tuple, layers: int) -> dict:
    """The plan's estimate for one point, computed here from the same config and recipe."""
    from transformers import LlamaConfig

    from pi_lora import plan
    from pi_lora.recipe import Recipe

    recipe = Recipe.model_validate({**recipe_values(point), "rope": {"target_len": point[1]}})
    shape = plan.Shape.of(LlamaConfig(num_hidden_layers=layers, **SHAPE))
    e = plan.estimate(shape, plan.Settings.of(recipe, 2 if point[0] == "bf16" else 4), cuda=False)
    return {"predicted": e.peak, "parts": e.parts}


def measure(folder: Path, point: tuple, threads: int = 0) -> dict:
    r = run_point({"base": str(folder), "device": "cpu", "length": point[1], "method": "pi-lora",
                   "recipe": recipe_values(point)}, threads)
    if r["status"] != "ok":
        raise SystemExit(f"point {point} failed:\n{r.get('error', r['status'])}")
    return {"measured": r["peak"], "loaded": r["loaded"], "seconds": r["seconds"][0]}


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

        header = (f"{HEADING} (CPU, {time.strftime('%Y-%m-%d')})\n\n"
                  f"LLaMA-7B-shaped, {args.layers} layers (hidden 4096, MLP 11008, vocab 32000), random weights, "
                  "NF4, LoRA r=8 on q/k/v/o, batch 1, one step (forward, backward, clipping, AdamW) of the model "
                  "`pi-lora train` builds, a fresh process per row; measured = peak resident memory during the "
                  f"step minus the process before loading. {platform.processor() or platform.machine()}, "
                  f"torch {torch.__version__}. Command: `python bench/memory.py`.\n\n")
        write_section(HEADING, header + text + "\n\n" + NOTE)


# what the table can and cannot show, written under it
NOTE = """Read with care: the plan's activation constants (`pi_lora/plan.py`) were fitted to these points, so
the agreement shows that one set of constants, with the form derived from what each op saves, holds
across lengths, chunking, tiling, both compute dtypes and no checkpointing; it is not an independent
test. The independent check is `bench/compare.py` on a GPU (section below), where the peaks per
component differ (CUDA kernels, bitsandbytes' CUDA dequantization, the caching allocator). Memory
does not depend on the number of threads (`--threads 1` gives the same rows)."""


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
