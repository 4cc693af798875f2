"""One benchmark point of unsloth's QLoRA (FastLanguageModel), in a process of its own.

unsloth patches transformers, peft and trl when it is imported, so it never shares a process with
pi-lora or the usual loop (bench/compare.py runs this file as a subprocess, with unsloth's own
packages first on PYTHONPATH: bench/gpu.sh installs them from the .gpu bundle). The step is the
one bench/point.py times: zero_grad, forward with labels (unsloth's own loss), backward, gradient
clipping at 1.0 and AdamW; one warm-up step, then the timed ones; peak = max_memory_allocated over
the steps, from after the model is loaded. The model: the same random-weights folder as the other
points (with a tokenizer written beside it, which unsloth loads), NF4 (unsloth's load_in_4bit),
bf16, LoRA r=8 alpha 16 on q/k/v/o, unsloth's gradient checkpointing, PI linear to the length.

    python bench/unsloth_point.py '{"base": "/dev/shm/base", "length": 16384, "steps": 3}'

The last line of stdout is the record (JSON): status ok / oom / unavailable (unsloth cannot be
imported or cannot load the model here: `error` says why) / failed.
"""

from __future__ import annotations

import json
import os
import sys
import time


def unavailable(why: str) -> dict:
    return {"status": "unavailable", "error": why.strip().splitlines()[-1][:500] if why.strip() else "unknown"}


def run(point: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
    import torch

    if not torch.cuda.is_available():
        return unavailable("unsloth's QLoRA needs a CUDA GPU")
    try:
        import unsloth  # noqa: F401  (first: it patches transformers before they are imported)
        from unsloth import FastLanguageModel
    except Exception as e:  # whatever its import raises (a missing dependency, a version check)
        return unavailable(f"import unsloth: {type(e).__name__}: {e}")
    import importlib.metadata as md
    import json as _json
    from pathlib import Path

    length = point["length"]
    config = _json.loads((Path(point["base"]) / "config.json").read_text())
    factor = length / config["max_position_embeddings"]
    try:
        net, _ = FastLanguageModel.from_pretrained(
            model_name=point["base"], max_seq_length=length, dtype=torch.bfloat16, load_in_4bit=True,
            rope_scaling={"type": "linear", "factor": factor} if factor > 1 else None, local_files_only=True)
        net = FastLanguageModel.get_peft_model(
            net, r=8, lora_alpha=16, lora_dropout=0, bias="none", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            use_gradient_checkpointing="unsloth", random_state=0, max_seq_length=length)
    except torch.OutOfMemoryError:
        return {"status": "oom", "error": "out of memory while loading"}
    except Exception as e:
        return unavailable(f"loading: {type(e).__name__}: {e}")
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    on = next(p.device for p in params)
    ids = torch.randint(0, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0)).to(on)
    torch.cuda.synchronize()
    record = {"status": "ok", "loaded": torch.cuda.memory_allocated(), "seconds": [], "losses": [],
              "versions": {n: md.version(n) for n in ("unsloth", "unsloth_zoo", "transformers", "trl", "peft")}}
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(point.get("steps", 2)):
            began = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            value = net(input_ids=ids, labels=ids).loss
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            record["losses"].append(value.item())
            torch.cuda.synchronize()
            record["seconds"].append(time.perf_counter() - began)
    except torch.OutOfMemoryError:
        record["status"] = "oom"
    record |= {"peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    return record


if __name__ == "__main__":
    try:
        out = run(json.loads(sys.argv[1]))
    except Exception as e:  # a record, always: the caller reports it beside the others
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(out))
