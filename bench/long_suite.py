"""The long-sequence suite of bench/compare.py (--suite long), time-boxed, for one GPU.

LLaMA-7B and Llama-3-8B shapes at 16k-128k: the usual loop, pi-lora fastest at 24/80 GiB (every
memory setting auto, the plan's picks) and lowest memory, unsloth, and the Liger check
(bench/kernels_check.py). Points in priority order (the targets first) while the budget lasts, each
a process of its own stopped by its cap; the table is written whatever happened. On a CPU: tiny shapes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import llama  # noqa: E402
from pi_lora import plan  # noqa: E402
from point import measure, spec  # noqa: E402
from report import GIB, plan_cell, versions, write_section  # noqa: E402
from timebox import run, stop_cleanly_on_sigterm  # noqa: E402

SHAPES = {"7b": llama.LLAMA_7B, "8b": llama.LLAMA3_8B}
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
    work = llama.work_folder(args.work, sum(llama.size_bytes(c) for c in shapes.values()))
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
                r |= measure(spec(folders[shape], args.device, length, steps), args.threads, args.budget - spent())
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
                    point = spec(folders[shape], args.device, length, steps, {"lora": LORA, **explicit})
                    r |= measure(point, args.threads, args.budget - spent())
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
