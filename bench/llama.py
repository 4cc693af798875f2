"""LLaMA-shaped bases with random weights, written as a downloaded model is: the benchmarks' models.

A base is written as standard safetensors shards (4 decoder layers each) with its config.json, so it
takes the same path through `from_pretrained` and pi-lora's loader as a real LLaMA-7B, with no
download. The weights are generated shard by shard (on a GPU when given one: a 7B base in seconds),
so the writer never holds the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

LLAMA_7B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, dtype="bfloat16",
)
# small enough for a CPU test of a benchmark's whole flow
TINY = {**LLAMA_7B, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 128}
# Llama-3-8B's shapes: 128k vocabulary, grouped KV heads (8), MLP 14336, trained length 8192
LLAMA3_8B = {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_shapes(i: int, c: dict) -> dict[str, tuple]:
    h, m, p = c["hidden_size"], c["intermediate_size"], f"model.layers.{i}."
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    kv_out = h // heads * kv
    shapes = {f"{p}self_attn.q_proj.weight": (h, h), f"{p}self_attn.k_proj.weight": (kv_out, h),
              f"{p}self_attn.v_proj.weight": (kv_out, h), f"{p}self_attn.o_proj.weight": (h, h)}
    shapes |= {f"{p}mlp.gate_proj.weight": (m, h), f"{p}mlp.up_proj.weight": (m, h),
               f"{p}mlp.down_proj.weight": (h, m), f"{p}input_layernorm.weight": (h,),
               f"{p}post_attention_layernorm.weight": (h,)}
    return shapes


def size_bytes(c: dict) -> int:
    """bf16 bytes of a base in `c`'s shapes."""
    import math

    layers = sum(math.prod(s) for i in range(c["num_hidden_layers"]) for s in layer_shapes(i, c).values())
    return 2 * (layers + 2 * c["vocab_size"] * c["hidden_size"] + c["hidden_size"])


def build_base(folder: Path, c: dict, on: torch.device | str = "cpu", layers_per_shard: int = 4) -> Path:
    """Random bf16 weights (normal, std 0.02; norms 1) in `c`'s shapes, in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=on).manual_seed(0)
    layers = c["num_hidden_layers"]
    groups = [list(range(i, min(i + layers_per_shard, layers))) for i in range(0, layers, layers_per_shard)]
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
                tensors[name] = torch.randn(shape, generator=gen, device=on).mul_(0.02).to(torch.bfloat16).cpu()
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map |= {name: shard for name in tensors}
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    return folder


def work_folder(requested: str | None, need: int) -> Path:
    """Where to write a base of `need` bytes: the folder asked for, else /dev/shm (a 7B base then loads
    from memory) or the temp folder, whichever has room."""
    if requested:
        return Path(requested)
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base) and shutil.disk_usage(base).free > need * 1.15 + 2 * 2**30:
            return Path(base) / "pi-lora-bench-base"
    return Path(tempfile.gettempdir()) / "pi-lora-bench-base"


def describe(on: str) -> str:
    if on == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    import platform

    return f"{platform.processor() or platform.machine()} CPU"


if __name__ == "__main__":  # [FOLDER CONFIG_JSON] DEVICE: write a base in a process of its own, name the device
    import sys

    *base, on = sys.argv[1:]
    if base:
        build_base(Path(base[0]), json.loads(base[1]), on)
    print(describe(on))
