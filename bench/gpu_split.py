"""The layer split (`model.gpus`) equals one device in loss and gradients; memory per card.

A 1-GPU machine can still run the device-map code path: the second "card" is the CPU. The model
is built here (LLaMA-shaped, hidden 1024, 8 layers, random weights), unquantized fp32 so that both
placements compute the same thing (transformers keeps CPU-placed layers of a 4-bit model in fp32,
which would change the loss). Both runs build the model `pi-lora train` builds (model.build:
model.load_base with the device map of model.layer_map, LoRA with non-reentrant checkpointing and
trainable norms) and run the chunked loss (loss.backward, whose head sits on the second device), with the same ids and
LoRA weights (lora_B made non-zero, so every LoRA gradient is non-trivial).

    python3 bench/gpu_split.py                    # CUDA: cuda:0 alone, then cuda:0 + cpu
    python3 bench/gpu_split.py --devices cpu,cpu  # the same code path on a CPU (a test of this script)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pi_lora import loss, model, plan, recipe, rope  # noqa: E402
from pi_lora.demo import build_tiny_llama  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=512)


def compute_devices(names: list[str]) -> list[torch.device]:
    """Device-map values that accelerate computes on.

    accelerate reads the string "cpu" in a device map beside a GPU as offload (weights on the meta
    device, streamed in by hooks, which training through fails), but a torch.device("cpu") as a
    place to compute. With cpu,cpu the map has one device, so no hooks: that run checks this
    script, not the dispatch.
    """
    return [torch.device(n) for n in names]


def one_step(folder: Path, length: int, devices: list[torch.device], split: list[int] | None, ids: torch.Tensor):
    """Loss and trainable gradients of one chunked step; the layers on `devices` as `split` says."""
    r = recipe.validate({"model": {"base": str(folder), "quant": "none", "compute_dtype": "fp32"},
                         "rope": {"target_len": length}, "lora": {"trainable": ["norm"]}})
    config = model.load_config(str(folder))
    rope.apply(config, rope.interpolation(config, length, "linear"))
    on = devices[0]
    original = model.placement
    if split:  # layer_map's GPU indices -> the devices given (the CPU may stand in for GPU 1)
        model.placement = lambda on, split, config: {k: devices[g] for k, g in model.layer_map(config, split).items()}
    try:
        torch.manual_seed(0)
        net = model.build(r, config, on, torch.float32, plan.Settings.of(r, 4), split=split)
    finally:
        model.placement = original
    generator = torch.Generator().manual_seed(1)
    for name, p in sorted(net.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    net.train()
    value = loss.backward(net, ids.to(on), 1.0, 1024)
    grads = {n: p.grad.detach().float().cpu() for n, p in net.named_parameters() if p.requires_grad}
    where = {}
    for n, p in net.named_parameters():
        where.setdefault(str(p.device), 0)
        where[str(p.device)] += p.numel()
    return value, grads, where


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated(0) / 2**30 if torch.cuda.is_available() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda:0,cpu", help="first and second device of the split")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", type=Path, help="write the record here (JSON)")
    args = ap.parse_args()
    devices = compute_devices(args.devices.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides, so the oracle is tight
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_llama(Path(tmp) / "base", **SHAPE)
        ids = torch.randint(0, 500, (1, args.length), generator=torch.Generator().manual_seed(2))
        runs = {}
        for name, split in (("one device", None), ("split", [4, 4])):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            value, grads, where = one_step(folder, args.length, devices, split, ids)
            runs[name] = dict(loss=value, grads=grads, params=where, peak_gib=peak_gib())
    one, two = runs["one device"], runs["split"]
    worst = max(((g - two["grads"][n]).norm() / g.norm().clamp_min(1e-30)).item() for n, g in one["grads"].items())
    ok = abs(one["loss"] - two["loss"]) <= 1e-4 * abs(one["loss"]) and worst <= 1e-3 and one["grads"].keys() == two["grads"].keys()
    record = {
        "devices": [str(d) for d in devices], "length": args.length, "shape": SHAPE, "split": [4, 4],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loss": {"one device": one["loss"], "split": two["loss"]},
        "worst_relative_grad_error": worst, "trainable_tensors": len(one["grads"]),
        "parameters_per_device": {"one device": one["params"], "split": two["params"]},
        "peak_allocated_gib_on_gpu0": {"one device": one["peak_gib"], "split": two["peak_gib"]},
        "equal": ok,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    print(f"SPLIT {'OK' if ok else 'MISMATCH'}: loss {one['loss']:.6f} vs {two['loss']:.6f}, "
          f"worst gradient error {worst:.2e} over {len(one['grads'])} tensors; "
          f"GPU 0 peak {one['peak_gib']} vs {two['peak_gib']} GiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
