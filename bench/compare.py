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
import os
import shlex
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import llama  # noqa: E402
from pi_lora import plan  # noqa: E402
from point import measure  # noqa: E402
from report import write_section  # noqa: E402
from timebox import run, stop_cleanly_on_sigterm  # noqa: E402

GIB = 2**30
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
    spec = {"base": str(folder), "device": device, "length": length, "steps": 1 + steps, "method": "usual"}
    if method is not None:
        spec |= {"method": "pi-lora", "recipe": {"lora": {"rank": 8, "alpha": 16.0, "target_modules": llama.TARGETS},
                                                 "train": method}}
    return spec


def work_folder(requested: str | None, need: int) -> Path:
    if requested:
        return Path(requested)
    for base in ("/dev/shm", tempfile.gettempdir()):  # /dev/shm: a 7B base loads from memory
        if os.path.isdir(base) and shutil.disk_usage(base).free > need * 1.15 + 2 * GIB:
            return Path(base) / "pi-lora-bench-base"
    return Path(tempfile.gettempdir()) / "pi-lora-bench-base"


def row(label: str, length: int, r: dict, cuda: bool) -> str:
    if r["status"] != "ok":
        what = "OOM" if r["status"] == "oom" else "failed"
        return f"| {label} | {length:,} | {what} | {plan_cell(r)} | - | - | - | - |"
    step = statistics.median(r["seconds"][1:] or r["seconds"])
    reserved = f"{r['reserved'] / GIB:.2f}" if cuda else "-"
    return (f"| {label} | {length:,} | {r['peak'] / GIB:.2f} | {plan_cell(r)} | {reserved} | {step:.2f} | "
            f"{length / step:,.0f} | {r['losses'][0]:.6f} |")


def plan_cell(r: dict) -> str:
    return f"{r['planned'] / GIB:.2f}" if r.get("planned") else "-"


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


def versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


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
            print("\n".join(plan_figures()))
            return
        return suite_long(args, cuda)
    config = dict(llama.TINY if args.tiny else llama.LLAMA_7B)
    config["num_hidden_layers"] = args.layers or config["num_hidden_layers"]
    lengths = [int(x) for x in (args.lengths or ("256,512" if args.tiny else "16384,32768")).split(",")]
    chunk = args.loss_chunk or (128 if args.tiny else 4096)
    tile = args.mlp_tile or (128 if args.tiny else 4096)
    chosen = methods(cuda, chunk, tile)
    names = args.methods.split(",")
    if set(names) - set(chosen):
        sys.exit(f"--methods: unknown {sorted(set(names) - set(chosen))}; choose from {', '.join(chosen)}")
    folder = work_folder(args.work, llama.size_bytes(config))
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
    rows, records = list(head), []
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
        "", *rows, "", *ratios(records), ""])
    print("\n" + text, flush=True)
    if args.md:
        args.md.write_text(text)
    if not (args.tiny or args.no_write):
        write_section(f"{HEADING} ({kind}", text)
        print("written to docs/benchmarks.md", flush=True)
    if not any(r["status"] == "ok" for r in records):
        sys.exit("no point was measured")


# --- the long-sequence suite (--suite long): one script, time-boxed, for one GPU -----------------------

# Llama-3-8B's shapes: 128k vocabulary, grouped KV heads (8), MLP 14336, trained length 8192
LLAMA3_8B = {**llama.LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}
SHAPES = {"7b": llama.LLAMA_7B, "8b": LLAMA3_8B}
SHAPE_NAMES = {"7b": "LLaMA-7B", "8b": "Llama-3-8B"}
TINY_SHAPES = {"7b": llama.TINY, "8b": {**llama.TINY, "num_key_value_heads": 2, "intermediate_size": 224,
                                        "vocab_size": 1024}}
# The recipe keys of the memory settings, in one place: they move and grow with pi-lora. A setting
# whose key this build's recipe lacks is left out of the point (and the table says so).
KEYS = {"loss_chunk": "train.loss_chunk", "mlp_tile": "train.mlp_tile",
        "offload_activations": "train.offload_activations", "attention_tile": "train.attention_tile",
        "gradient_checkpointing": "train.gradient_checkpointing", "gpu_mem": "train.gpu_mem"}
LORA = {"rank": 8, "alpha": 16.0, "target_modules": list(llama.TARGETS)}
LONG_LENGTHS = (16384, 32768, 65536, 131072)
LONG_METHODS = ("usual", "fastest-24", "fastest-80", "lowest", "unsloth")
BUDGETS = {"24": 24 * GIB, "80": 80 * GIB}
# Time box (seconds on an H200): a point's process start, imports and NF4 load, and a step of
# pi-lora's default setting on LLaMA-7B, a*L + b*L^2, fitted to the measured 2.08 s (16k) and 5.25 s (32k)
OVERHEAD = {"7b": 35.0, "8b": 45.0}
STEP_A, STEP_B = 9.37e-5, 2.03e-9
SLOWER = {"usual": 1.16, "lowest": 1.45, "unsloth": 1.0, "fastest-24": 1.0, "fastest-80": 1.0}
SHAPE_COST = {"7b": 1.0, "8b": 1.15}
BASE_WRITE = 25.0
KERNELS_CHECK = 60.0  # two 2-layer bases, four model builds, the op checks


def recipe_values(values: dict) -> dict:
    """Settings by name -> the nested recipe values."""
    tree = {}
    for name, value in values.items():
        section, key = KEYS[name].split(".")
        tree.setdefault(section, {})[key] = value
    return tree


def method_values(method: str, cuda: bool, chunk: int, tile: int) -> dict:
    if method.startswith("fastest-"):  # every memory setting auto, the plan picks for this budget
        return {"gpu_mem": f"{method.split('-')[1]}GiB", "loss_chunk": chunk, "mlp_tile": "auto",
                "offload_activations": "auto", "attention_tile": "auto", "gradient_checkpointing": "auto"}
    return {"gradient_checkpointing": True, "loss_chunk": chunk, "mlp_tile": tile, "attention_tile": tile,
            "offload_activations": cuda}  # lowest


def planned_recipe(config: dict, tree: dict, length: int):
    from transformers import LlamaConfig

    from pi_lora.recipe import Recipe

    recipe = Recipe.model_validate({**tree, "model": {**tree.get("model", {}), "base": "bench"},
                                    "rope": {"target_len": length}, "lora": LORA,
                                    "train": {"grad_accum": 1, **tree.get("train", {})}})
    return recipe, plan.Shape.of(LlamaConfig(**config))


def resolve(config: dict, tree: dict, length: int, cuda: bool):
    """What the plan decides for these recipe values: (explicit values for the point, chosen, decision)."""
    recipe, shape = planned_recipe(config, tree, length)
    d = plan.decide(shape, recipe, 2 if cuda else 4, cuda)
    explicit = {s: dict(v) for s, v in tree.items()}
    for name, value in d.chosen.items():  # the plan's picks replace `auto`, so the point computes with them
        dotted = KEYS.get(name, f"train.{name}")
        section, key = dotted.split(".")
        explicit.setdefault(section, {})[key] = value
    return explicit, d.chosen, d


def plan_figures(cuda: bool = True) -> list[str]:
    """The plan's longest length in 24 and 80 GiB, and its 512k peak, for each shape: arithmetic only."""
    lines = ["| shape | setting | longest in 24 GiB | longest in 80 GiB | peak at 524,288 (GiB) |", "|---|---|---|---|---|"]
    for key, config in SHAPES.items():
        for label, method in (("fastest that fits", "fastest-80"), ("lowest memory", "lowest")):
            tree = recipe_values(method_values(method, cuda, 4096, 4096))
            recipe, shape = planned_recipe(config, tree, 524288)
            s = plan.Settings.of(recipe, 2)
            auto = plan.auto_keys(recipe.train)
            longest = [plan.max_length(shape, s, b, cuda, auto) for b in BUDGETS.values()]
            e, _ = plan.fit(shape, s, BUDGETS["80"], cuda, auto)
            lines.append(f"| {SHAPE_NAMES[key]} | {label} | {longest[0]:,} | {longest[1]:,} | {e.peak / GIB:.1f} |")
    return lines


def estimate_seconds(shape: str, method: str, length: int, steps: int, cuda: bool) -> float:
    if not cuda:  # a tiny model: the process and its imports (2 shared cores)
        return 20.0 + steps * 0.5
    step = (STEP_A * length + STEP_B * length**2) * SLOWER[method] * SHAPE_COST[shape]
    return OVERHEAD[shape] + steps * step


def priority(lengths: list[int]) -> list[tuple[str, str, int]]:
    """Points in the order the time box takes them: the targets first (16k speed against the usual
    loop, 128k in 24 GiB, unsloth beside it, the 8B shape), then the rest, shortest first."""
    l16, l128 = lengths[0], lengths[min(3, len(lengths) - 1)]
    head = [("7b", "usual", l16), ("7b", "fastest-24", l16), ("7b", "lowest", l128), ("7b", "unsloth", l16),
            ("8b", "usual", l16), ("8b", "fastest-24", l16), ("7b", "fastest-80", l16), ("7b", "lowest", l16),
            ("8b", "lowest", l128), ("8b", "unsloth", l16)]
    rest = [(s, m, n) for n in lengths for s in SHAPES for m in LONG_METHODS]
    return list(dict.fromkeys(head + rest))


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer of the base's vocabulary size: unsloth loads one with every model (the
    ids are random; no text is tokenized)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")),
                                  bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t0")
    tok.save_pretrained(folder)


def unsloth_point(folder: Path, length: int, steps: int, site: str | None, cap: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [p for p in (site, os.environ.get("PYTHONPATH", "")) if p])}
    here = Path(__file__).resolve().parent / "unsloth_point.py"
    spec = json.dumps({"base": str(folder), "length": length, "steps": steps})
    out = run([sys.executable, here, spec], cap, env=env, grace=5)
    if out.capped:
        return {"status": "capped", "error": f"stopped at its cap of {cap:.0f} s"}
    found = [line for line in out.output.splitlines() if line.startswith('{"status"')]
    if found:
        return json.loads(found[-1])
    why = "killed (out of memory?)" if out.rc in (-9, 137) else out.output.strip()[-1500:]
    return {"status": "failed", "error": why}


def long_row(r: dict, cuda: bool) -> str:
    name = f"| {SHAPE_NAMES[r['shape']]} | {r['method']} | {r['length']:,} | {r.get('settings', '-')} "
    if r["status"] != "ok":
        why = r.get("error", "")
        return name + f"| {r['status']}{': ' + why[:160] if why else ''} | {plan_cell(r)} | - | - | - |"
    step = statistics.median(r["seconds"][1:] or r["seconds"])
    reserved = f"{r['reserved'] / GIB:.2f}" if cuda else "-"
    return name + f"| {r['peak'] / GIB:.2f} | {plan_cell(r)} | {reserved} | {step:.2f} | {r['length'] / step:,.0f} |"


def settings_text(chosen: dict, explicit: dict) -> str:
    flat = {f"{s}.{k}": v for s, kv in explicit.items() for k, v in kv.items() if k != "gpu_mem"}
    text = ", ".join(f"{k.split('.')[1]} {v}" for k, v in flat.items())
    if chosen:
        text += " (plan: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + ")"
    return text


def long_summary(records: list[dict], cuda: bool) -> list[str]:
    done = {(r["shape"], r["method"], r["length"]): r for r in records if r["status"] == "ok"}
    out = []
    speed = lambda r: r["length"] / statistics.median(r["seconds"][1:] or r["seconds"])  # noqa: E731
    for shape in SHAPES:
        lengths = sorted({n for (s, _, n) in done if s == shape})
        for n in lengths:
            usual = done.get((shape, "usual", n))
            for method in ("fastest-24", "fastest-80", "lowest", "unsloth"):
                r = done.get((shape, method, n))
                if usual and r:
                    target = " (target >= 1.3x: " + ("met" if speed(r) / speed(usual) >= 1.3 else "NOT met") + ")" \
                        if method == "fastest-24" and n == min(lengths) else ""
                    out.append(f"- {SHAPE_NAMES[shape]} at {n:,}: {method} runs at {speed(r) / speed(usual):.2f}x the "
                               f"usual loop's tokens/s{target}, at {r['peak'] / usual['peak']:.2f}x its peak memory")
        for budget, limit in BUDGETS.items():
            fits = [r for (s, m, n), r in done.items() if s == shape and m in (f"fastest-{budget}", "lowest")
                    and (r["reserved"] if cuda else r["peak"]) <= limit]
            if fits:
                best = max(fits, key=lambda r: r["length"])
                out.append(f"- {SHAPE_NAMES[shape]}: longest measured in {budget} GiB: {best['length']:,} "
                           f"({best['method']}, {best['peak'] / GIB:.2f} GiB allocated"
                           + (f", {best['reserved'] / GIB:.2f} reserved)" if cuda else ")"))
    return out


def suite_long(args, cuda: bool) -> None:
    import torch  # noqa: F401

    stop_cleanly_on_sigterm()
    began = time.perf_counter()
    tiny = args.tiny or not cuda
    shapes = TINY_SHAPES if tiny else SHAPES
    lengths = [int(x) for x in (args.lengths or ("256,512,1024,2048" if tiny else ",".join(map(str, LONG_LENGTHS)))).split(",")]
    chunk = args.loss_chunk or (128 if tiny else 4096)
    tile = args.mlp_tile or (128 if tiny else 4096)
    site = os.environ.get("UNSLOTH_SITE")
    work = work_folder(args.work, sum(llama.size_bytes(c) for c in shapes.values()))
    folders, records, skipped, device = {}, [], [], "-"
    checks = {"status": "not run"}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    spent = lambda: time.perf_counter() - began  # noqa: E731
    try:
        if spent() + (KERNELS_CHECK if cuda else 5) <= args.budget:
            done = run([sys.executable, str(Path(__file__).resolve().parent / "kernels_check.py"),
                        "--out", str(args.out.with_name("kernels.json")) if args.out else os.devnull],
                       args.budget - spent(), grace=5)
            print(done.output, flush=True)
            last = (done.output.strip().splitlines() or ["{}"])[-1]
            checks = json.loads(last) if last.startswith("{") else {"status": "capped" if done.capped else "failed",
                                                                    "why": done.output[-500:]}
            if args.out and args.out.with_name("kernels.json").is_file():
                checks["rows"] = json.loads(args.out.with_name("kernels.json").read_text())["rows"]
        for shape, method, length in priority(lengths):
            steps = 1 + args.steps if length <= lengths[min(1, len(lengths) - 1)] else 1
            cost = estimate_seconds(shape, method, length, steps, cuda) + (0 if shape in folders else (BASE_WRITE if cuda else 3))
            if spent() + cost > args.budget:
                skipped.append(f"{SHAPE_NAMES[shape]} {method} {length:,} (about {cost:.0f} s)")
                continue
            if shape not in folders:
                folders[shape] = work / f"pi-lora-long-{shape}"
                shutil.rmtree(folders[shape], ignore_errors=True)
                made = run([sys.executable, llama.__file__, folders[shape], json.dumps(shapes[shape]), args.device],
                           args.budget - spent(), grace=5)
                if made.rc != 0:
                    skipped.append(f"{SHAPE_NAMES[shape]}: writing its random base "
                                   f"{'reached the time box' if made.capped else 'failed: ' + made.output[-300:]}")
                    break
                device = made.output.strip().splitlines()[-1]
            r = {"shape": shape, "method": method, "length": length}
            if method == "usual":
                r |= measure(point(folders[shape], args.device, None, length, steps - 1), args.threads,
                             args.budget - spent())
            elif method == "unsloth":
                if not (folders[shape] / "tokenizer.json").is_file():
                    write_tokenizer(folders[shape], shapes[shape]["vocab_size"])
                r |= unsloth_point(folders[shape], length, steps, site, args.budget - spent())
            else:
                tree = recipe_values(method_values(method, cuda, chunk, tile))
                explicit, chosen, d = resolve(shapes[shape], tree, length, cuda)
                r["settings"] = settings_text(chosen, explicit)
                if not d.fits:
                    r |= {"status": "no fit", "error": f"the plan needs {d.estimate.needs / GIB:.1f} GiB",
                          "planned": d.estimate.peak}
                else:
                    spec = point(folders[shape], args.device, None, length, steps - 1)
                    spec |= {"method": "pi-lora", "recipe": {"lora": LORA, **explicit}}
                    r |= measure(spec, args.threads, args.budget - spent())
            r["estimated_s"] = round(cost)
            records.append(r)
            print(long_row(r, cuda), f"[{spent():.0f} s]", flush=True)
            if args.out:
                args.out.write_text(json.dumps({"device": device, "records": records, "kernels": checks,
                                                "skipped": skipped}, indent=1))
    except KeyboardInterrupt:  # a SIGTERM from outside too (stop_cleanly_on_sigterm): the table of what ran
        skipped.append("the rest: interrupted")
    finally:
        if not args.keep_base:
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
    text = long_section(records, skipped, checks, device, cuda, tiny, spent())
    print("\n" + text, flush=True)
    if args.md:
        args.md.write_text(text)
    if cuda and not (tiny or args.no_write):
        write_section(LONG_HEADING, text)
        print("written to docs/benchmarks.md", flush=True)


LONG_HEADING = "## Long sequences: the usual loop, pi-lora and unsloth"


def long_section(records, skipped, checks, device, cuda, tiny, seconds) -> str:
    kind = "GPU" if cuda else "CPU dry run, tiny shapes"
    head = ["| shape | method | length | settings | peak GiB | plan GiB | peak reserved GiB | step (s) | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    kernel_lines = [f"- Liger check: {checks.get('status')}" + (f" ({checks['why']})" if checks.get("why") else "")
                    + (f", liger-kernel {checks['liger']}" if checks.get("liger") else "")]
    kernel_lines += [f"  - {r['what']}: {r['error']:.2e} (tolerance {r['tolerance']:g}) {'ok' if r['ok'] else 'MISMATCH'}"
                     for r in checks.get("rows", [])]
    return "\n".join([
        f"{LONG_HEADING} ({kind})", "",
        f"{time.strftime('%Y-%m-%d')}, {device}; {versions()}. Random weights as NF4 (double quant), "
        f"{'bf16' if cuda else 'fp32'} compute, "
        "LoRA r=8 (alpha 16) on q/k/v/o, batch 1, PI linear from the trained length; a step is forward, backward, "
        "clipping and AdamW; one fresh process per row (bench/point.py; unsloth: bench/unsloth_point.py). Methods: "
        "usual = transformers + peft loop (bench/usual.py); fastest-24 / fastest-80 = pi-lora with train.gpu_mem "
        "24GiB / 80GiB and every memory setting auto (the plan's picks, shown, are what the point runs); lowest = "
        "gradient checkpointing, loss_chunk, mlp_tile, attention_tile and offload all on; unsloth = FastLanguageModel "
        f"QLoRA, same shape, length, rank and batch. Time box {seconds:.0f} s used. "
        f"Command: `python bench/compare.py {shlex.join(sys.argv[1:])}`.", "",
        *head, *[long_row(r, cuda) for r in records], "",
        *long_summary(records, cuda), "",
        *kernel_lines, "",
        "Skipped by the time box (estimated seconds): " + ("; ".join(skipped) if skipped else "none") + ".", "",
        "The plan's figures (`pi-lora plan` arithmetic, a GPU, 24 GiB = the budget the plan may use):", "",
        *plan_figures(), ""])


if __name__ == "__main__":
    main()
