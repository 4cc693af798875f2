"""Memory and speed of a training step on a LLaMA-7B-shaped NF4 base: the usual loop against pi-lora's.

Methods, each (method, length) measured in a fresh process (bench/point.py):
  usual        the usual transformers + peft + bitsandbytes loop (bench/usual.py): full-length
               logits, then the loss
  pi-lora      the model and step `pi-lora train` runs (model.build, train.step_loss) with
               the recipe's defaults: train.loss_chunk 4096, the 16-bit residual stream (narrow)
  pi-lora-min  pi-lora's lowest-memory setting: also train.mlp_tile 4096 and, on a GPU,
               train.offload_activations
Model: LLaMA-7B's shapes (bench/llama.py; hidden 4096, 32 layers, MLP 11008, vocab 32000, trained
length 2048) with random bf16 weights written once to a folder, loaded as NF4 with double
quantization; bf16 compute on a GPU, fp32 on a CPU; LoRA r=8 (alpha 16) on q/k/v/o; non-reentrant
gradient checkpointing; SDPA; batch 1; PI linear to each length. A step is forward, backward,
gradient clipping and AdamW. Each point runs one warm-up step and --steps timed ones; the peak is
over all of them (GPU: max_memory_allocated and max_memory_reserved; CPU: resident memory growth).

    python bench/compare.py --device cuda                           # 16k and 32k; writes docs/benchmarks.md
    python bench/compare.py --device cuda --lengths 16384,32768,65536
    python bench/compare.py --device cpu --layers 2 --lengths 2048  # the same on a CPU
    python bench/compare.py --device cpu --tiny                     # the whole flow on a tiny model (a test)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import llama  # noqa: E402
import long_suite  # noqa: E402
from point import measure, spec  # noqa: E402
from report import GIB, plan_cell, versions, write_section  # noqa: E402

HEADING = "## Usual loop vs pi-lora: memory and speed"


def methods(cuda: bool, chunk: int, tile: int) -> dict[str, tuple[str, dict | None]]:
    """name -> (label, recipe values; None: the usual loop)."""
    low = {"loss_chunk": chunk, "mlp_tile": tile, "offload_activations": cuda}
    return {
        "usual": ("usual: transformers + peft loop (full logits)", None),
        "pi-lora": (f"pi-lora (loss_chunk {chunk})", {"loss_chunk": chunk, "mlp_tile": 0, "offload_activations": False}),
        "pi-lora-min": (f"pi-lora lowest memory (loss_chunk {chunk}, mlp_tile {tile}{', offload' if cuda else ''})", low),
    }


def point(folder: Path, device: str, method: dict | None, length: int, steps: int) -> dict:
    """A point of this comparison: one warm-up step and `steps` timed ones; `method` None is the usual loop."""
    lora = {"rank": 8, "alpha": 16.0, "target_modules": llama.TARGETS}
    return spec(folder, device, length, 1 + steps, None if method is None else {"lora": lora, "train": method})


def row(label: str, length: int, r: dict, cuda: bool) -> str:
    if r["status"] != "ok":
        what = "OOM" if r["status"] == "oom" else "failed"
        return f"| {label} | {length:,} | {what} | {plan_cell(r)} | - | - | - | - |"
    step = statistics.median(r["seconds"][1:] or r["seconds"])
    reserved = f"{r['reserved'] / GIB:.2f}" if cuda else "-"
    return (f"| {label} | {length:,} | {r['peak'] / GIB:.2f} | {plan_cell(r)} | {reserved} | {step:.2f} | "
            f"{length / step:,.0f} | {r['losses'][0]:.6f} |")


def ratios(records: list[dict]) -> list[str]:
    """Each pi-lora method against the usual loop at the same length: memory and tokens/s."""
    out = []
    done = {(r["method"], r["length"]): r for r in records if r["status"] == "ok"}
    for (name, length), r in done.items():
        usual = done.get(("usual", length))
        if name == "usual" or usual is None:
            continue
        speed = statistics.median(usual["seconds"][1:] or usual["seconds"]) / statistics.median(r["seconds"][1:] or r["seconds"])
        out.append(f"- {name} at {length:,}: {r['peak'] / usual['peak']:.2f}x the usual loop's peak memory, "
                   f"{speed:.2f}x its tokens/s; first-step loss differs by {abs(r['losses'][0] - usual['losses'][0]):.1e}")
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="[cuda when there is one]")
    p.add_argument("--lengths", default=None, help="comma-separated [16384,32768; --tiny: 256,512]")
    p.add_argument("--methods", default="usual,pi-lora,pi-lora-min", help="comma-separated [all three]")
    p.add_argument("--layers", type=int, default=None, help="decoder layers [32; --tiny: 2]")
    p.add_argument("--tiny", action="store_true", help="a tiny LLaMA (hidden 64, vocab 512): tests the flow, writes no docs")
    p.add_argument("--steps", type=int, default=2, help="timed steps per point, after one warm-up step [2]")
    p.add_argument("--loss-chunk", type=int, default=None, help="[4096; --tiny: 128]")
    p.add_argument("--mlp-tile", type=int, default=None, help="[4096; --tiny: 128]")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per point [0: all]")
    p.add_argument("--work", default=None, help="folder for the random base [/dev/shm or the temp folder]")
    p.add_argument("--keep-base", action="store_true", help="keep the base folder (and reuse one found there)")
    p.add_argument("--out", type=Path, help="also write every record to this JSON file")
    p.add_argument("--md", type=Path, help="also write the markdown section to this file")
    p.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    p.add_argument("--suite", choices=["compare", "long"], default="compare",
                   help="compare: the methods above; long: LLaMA-7B and Llama-3-8B shapes at 16k-128k, the usual "
                        "loop, pi-lora fastest at 24/80 GiB and lowest memory, unsloth, the Liger check, time-boxed "
                        "(on a CPU: tiny shapes) [compare]")
    p.add_argument("--budget", type=float, default=450, help="--suite long: seconds the points may take [450]")
    p.add_argument("--plan-only", action="store_true", help="--suite long: print the plan's figures, measure nothing")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.suite == "long":
        if args.plan_only:
            print("\n".join(long_suite.plan_figures()))
            return
        return long_suite.suite_long(args, cuda)
    config = dict(llama.TINY if args.tiny else llama.LLAMA_7B)
    config["num_hidden_layers"] = args.layers or config["num_hidden_layers"]
    lengths = [int(x) for x in (args.lengths or ("256,512" if args.tiny else "16384,32768")).split(",")]
    chunk = args.loss_chunk or (128 if args.tiny else 4096)
    tile = args.mlp_tile or (128 if args.tiny else 4096)
    chosen = methods(cuda, chunk, tile)
    names = args.methods.split(",")
    if set(names) - set(chosen):
        sys.exit(f"--methods: unknown {sorted(set(names) - set(chosen))}; choose from {', '.join(chosen)}")
    folder = llama.work_folder(args.work, llama.size_bytes(config))
    began = time.perf_counter()
    # in a process of its own, like every point: this one then holds no GPU memory while they run
    writer = [sys.executable, llama.__file__, str(folder), json.dumps(config), args.device]
    if args.keep_base and (folder / "config.json").is_file():
        writer = [sys.executable, llama.__file__, args.device]  # reuse it; only name the device
    else:
        shutil.rmtree(folder, ignore_errors=True)
    done = subprocess.run(writer, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"writing the random base failed:\n{done.stderr[-2000:]}")
    device = done.stdout.strip().splitlines()[-1]
    print(f"base in {folder} ({time.perf_counter() - began:.0f} s); {device}", flush=True)
    head = ["| method | length | peak GiB | plan GiB | peak reserved GiB | step (s) | tokens/s | first-step loss |",
            "|---|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    rows, records, skipped = list(head), [], []
    try:
        for length in lengths:
            for name in names:
                label, values = chosen[name]
                r = {"method": name, "length": length,
                     **measure(point(folder, args.device, values, length, args.steps), args.threads)}
                records.append(r)
                rows.append(row(label, length, r, cuda))
                print(rows[-1], flush=True)
                if r["status"] == "failed":
                    print(f"  {name} at {length} failed: {r['error'][-600:]}", file=sys.stderr, flush=True)
                if args.out:
                    args.out.write_text(json.dumps({"device": device, "config": config, "records": records}, indent=1))
    except KeyboardInterrupt:  # a SIGTERM from outside too (stop_cleanly_on_sigterm): the table of what ran
        skipped.append("the rest: interrupted")
    finally:
        if not args.keep_base:
            shutil.rmtree(folder, ignore_errors=True)

    kind = "GPU" if cuda else "CPU"
    peak = ("peak = torch.cuda.max_memory_allocated over the steps, reserved = max_memory_reserved" if cuda else
            "peak = resident memory growth over the steps, from before the model was loaded")
    text = "\n".join([
        f"{HEADING} ({kind}{', tiny' if args.tiny else ''})", "",
        f"{time.strftime('%Y-%m-%d')}, {device}; {versions()}. LLaMA-shaped, hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers, MLP {config['intermediate_size']}, vocab {config['vocab_size']}; "
        f"random weights loaded as NF4 (double quant), {'bf16' if cuda else 'fp32'} compute, LoRA r=8 on q/k/v/o, "
        f"gradient checkpointing, batch 1, PI linear from {config['max_position_embeddings']}. One fresh process "
        f"per row: one warm-up step and {args.steps} timed (step = median of the timed ones); {peak}; plan = "
        f"`pi-lora plan`'s peak for the same recipe. Command: `python bench/compare.py {shlex.join(sys.argv[1:])}`.",
        "", *rows, "", *ratios(records), *(f"- {s}" for s in skipped), ""])
    print("\n" + text, flush=True)
    if args.md:
        args.md.write_text(text)
    if not (args.tiny or args.no_write):
        write_section(f"{HEADING} ({kind}", text)
        print("written to docs/benchmarks.md", flush=True)
    if not any(r["status"] == "ok" for r in records):
        sys.exit("no point was measured")


if __name__ == "__main__":
    main()
