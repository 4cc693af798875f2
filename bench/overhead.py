"""Step time of `pi-lora train` against a minimal hand-written transformers + peft + bitsandbytes loop.

Same model (LLaMA-shaped, random weights, built here), same length, NF4, LoRA r=8 on q/k/v/o,
non-reentrant gradient checkpointing, batch 1, AdamW; the minimal loop is bench/usual.py's. The two
alternate (A B A B ...) in one run and the median step time of each is compared (first steps dropped:
warm-up). Writes its section of docs/benchmarks.md.

    python bench/overhead.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from report import write_section  # noqa: E402

# the usual loop (bench/usual.py), timed step by step in its own process
MINIMAL = r"""
import json, sys, time, torch
import usual
base, length, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
net = usual.load(base, length, torch.device("cpu"), torch.float32).train()
opt = usual.optimizer(net)
gen = torch.Generator().manual_seed(0)
times = []
for _ in range(steps):
    ids = torch.randint(0, 500, (1, length), generator=gen)
    t = time.perf_counter()
    usual.step(net, opt, ids, torch.float32)
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    proc = subprocess.run([sys.executable, "-c", MINIMAL, str(base), str(length), str(steps)],
                          check=True, capture_output=True, text=True, env=env)
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
    summary = (f"## Step time: pi-lora vs a minimal loop, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU\n\n"
               f"LLaMA-shaped (hidden 1024, 4 layers, vocab 512), NF4, LoRA r=8 q/k/v/o, length {args.length}, "
               f"batch 1, checkpointing; {args.rounds} alternating rounds of {args.steps} steps, first 2 dropped.\n\n"
               f"| loop | median step (s) | steps |\n|---|---|---|\n"
               f"| pi-lora train | {statistics.median(a):.2f} | {len(a)} |\n"
               f"| minimal transformers + peft loop | {statistics.median(b):.2f} | {len(b)} |\n\n"
               f"Ratio pi-lora / minimal: {ratio:.3f} (target: at most 1.05). Command: `python bench/overhead.py`.\n")
    print(summary)
    write_section("## Step time: pi-lora vs a minimal loop", summary)


if __name__ == "__main__":
    main()
