"""Merge benchmark: pi-lora's streamed merge against peft's merge_and_unload on a LLaMA-7B-shaped model.

Builds random bf16 weights in LLaMA-7B's shapes as standard sharded safetensors (about 13.5 GB, no
download), a run folder with an r=8 q/k/v/o adapter, then measures peak RSS and wall time of
  ours:   pi-lora merge RUN --no-verify
  usual:  from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained
each in its own process (GNU time), and checks both outputs hold the same tensors.
Prints a table and appends it to docs/benchmarks.md.

    python bench/merge_7b.py --work /tmp/merge-bench     # needs ~45 GB of disk, 24 GB of RAM
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from llama import LLAMA_7B as CONFIG  # noqa: E402
from llama import TARGETS, build_base  # noqa: E402
from report import write_section  # noqa: E402


def build_run(folder: Path, base: Path, c: dict, rank: int = 8) -> None:
    """A run folder as `pi-lora train` leaves it, with a random r=8 adapter (PI 2048 -> 16384)."""
    from peft import LoraConfig

    adapter = folder / "adapter"
    adapter.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    h = c["hidden_size"]
    tensors = {}
    for i in range(c["num_hidden_layers"]):
        for n in TARGETS:
            key = f"base_model.model.model.layers.{i}.self_attn.{n}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(h, rank, generator=gen) * 0.01
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=list(TARGETS), task_type="CAUSAL_LM").to_dict()
    config["target_modules"] = list(TARGETS)
    config["peft_type"], config["task_type"] = "LORA", "CAUSAL_LM"
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config, default=str))
    meta = {"base": str(base), "base_path": str(base), "revision": None, "original_len": 2048,
            "target_len": 16384, "factor": 8.0, "rope_type": "linear", "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
            "quant": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "trainable": [],
            "pi_lora_version": "bench"}
    (folder / "pi_lora.json").write_text(json.dumps(meta))


USUAL = """
import sys, json, torch
from transformers import AutoConfig, AutoModelForCausalLM
from peft import PeftModel
base, run, out = sys.argv[1:4]
meta = json.load(open(run + "/pi_lora.json"))
config = AutoConfig.from_pretrained(base)
config.rope_parameters = meta["rope_parameters"]
model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, run + "/adapter").merge_and_unload()
model.save_pretrained(out)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """Peak RSS (GiB) and wall seconds of one command in its own process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) / 2**20, wall


def same_tensors(a: Path, b: Path, names: list[str]) -> float:
    from safetensors import safe_open

    def find(folder, name):
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                if name in h.keys():
                    return h.get_tensor(name).float()
        raise KeyError(name)

    return max((find(a, n) - find(b, n)).abs().max().item() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pi-lora-merge-bench"))
    parser.add_argument("--layers", type=int, default=32, help="fewer for a quick dry run")
    args = parser.parse_args()
    c = {**CONFIG, "num_hidden_layers": args.layers}
    shutil.rmtree(args.work, ignore_errors=True)
    base, run_dir = args.work / "base", args.work / "run"
    t0 = time.perf_counter()
    build_base(base, c)
    build_run(run_dir, base, c)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(f"built {size:.1f} GB base in {time.perf_counter() - t0:.0f} s", flush=True)
    cli = [sys.executable, "-m", "pi_lora", "merge", str(run_dir), "--no-verify"]
    ours_rss, ours_s = measure(cli + ["--output", str(args.work / "ours")])
    usual_rss, usual_s = measure([sys.executable, "-c", USUAL, str(base), str(run_dir), str(args.work / "usual")])
    check = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{args.layers - 1}.self_attn.o_proj.weight",
             "model.embed_tokens.weight"]
    diff = same_tensors(args.work / "ours", args.work / "usual", check)
    rows = [
        "| method | peak RSS (GiB) | wall (s) |", "|---|---|---|",
        f"| pi-lora merge (streamed) | {ours_rss:.2f} | {ours_s:.0f} |",
        f"| peft merge_and_unload (whole model) | {usual_rss:.2f} | {usual_s:.0f} |",
    ]
    summary = (f"## Merge, LLaMA-7B-shaped ({args.layers} layers, {size:.1f} GB bf16, r=8 q/k/v/o), "
               f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {torch.get_num_threads()} threads\n\n"
               + "\n".join(rows) + "\n\n"
               f"RSS ratio ours/usual: {ours_rss / usual_rss:.2f}; time ratio ours/usual: {ours_s / usual_s:.2f}; "
               f"max abs difference of merged tensors (bf16): {diff:.3g}. "
               "Command: `python bench/merge_7b.py`.\n")
    print(summary)
    write_section("## Merge, LLaMA-7B-shaped", summary)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
