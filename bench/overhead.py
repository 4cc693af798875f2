"""Step time of `pi-lora train` against a minimal hand-written transformers + peft + bitsandbytes loop.

Same model (LLaMA-shaped, random weights, built here), same length, NF4, LoRA r=8 on q/k/v/o,
non-reentrant gradient checkpointing, batch 1, AdamW. The two alternate (A B A B ...) in one run and
the median step time of each is compared (first steps dropped: warm-up). Appends to docs/benchmarks.md.

    python bench/overhead.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = r"""
import sys, time, json, torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
base, length, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = AutoConfig.from_pretrained(base)
config.rope_parameters = {"rope_type": "linear", "factor": length / config.max_position_embeddings,
                          "rope_theta": config.rope_parameters["rope_theta"]}
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(base, config=config, quantization_config=q, dtype=torch.float32)
for m in model.modules():  # the same bitsandbytes CPU guard as pi-lora, so both run the same kernels
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False
model = prepare_model_for_kbit_training(model, True, {"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
model.train()
gen = torch.Generator().manual_seed(0)
times = []
for _ in range(steps):
    ids = torch.randint(0, 500, (1, length), generator=gen)
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def build_base(folder: Path) -> Path:
    from pi_lora.demo import build_tiny_llama

    return build_tiny_llama(folder, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024)


def ours(base: Path, length: int, steps: int, work: Path) -> list[float]:
    out = work / f"run-{time.time_ns()}"
    cmd = [sys.executable, "-m", "pi_lora", "train", "--base", str(base), "--target-len", str(length),
           "--data", "demo", "--output", str(out), "--steps", str(steps), "--batch-size", "1", "--grad-accum", "1",
           "--rank", "8", "--set", "train.save_every=1000000", "--set", "train.warmup_steps=0"]
    subprocess.run(cmd, check=True, capture_output=True)
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def minimal(base: Path, length: int, steps: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", MINIMAL, str(base), str(length), str(steps)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_base(work / "base")
        a, b = [], []
        for _ in range(args.rounds):
            a += ours(base, args.length, args.steps, work)[2:]
            b += minimal(base, args.length, args.steps)[2:]
    ratio = statistics.median(a) / statistics.median(b)
    summary = (f"\n## Step time: pi-lora vs a minimal loop, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU\n\n"
               f"LLaMA-shaped (hidden 1024, 4 layers, vocab 512), NF4, LoRA r=8 q/k/v/o, length {args.length}, "
               f"batch 1, checkpointing; {args.rounds} alternating rounds of {args.steps} steps, first 2 dropped.\n\n"
               f"| loop | median step (s) | steps |\n|---|---|---|\n"
               f"| pi-lora train | {statistics.median(a):.2f} | {len(a)} |\n"
               f"| minimal transformers + peft loop | {statistics.median(b):.2f} | {len(b)} |\n\n"
               f"Ratio pi-lora / minimal: {ratio:.3f} (target: at most 1.05). Command: `python bench/overhead.py`.\n")
    print(summary)
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write(summary)


if __name__ == "__main__":
    main()
