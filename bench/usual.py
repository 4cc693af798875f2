"""The usual QLoRA loop, written as a transformers + peft + bitsandbytes user writes it.

The baseline of the benchmarks (bench/compare.py, bench/overhead.py): a 4-bit NF4 base (double
quantization), Position Interpolation as a linear rope factor on the config, peft's k-bit
preparation with non-reentrant gradient checkpointing, LoRA r=8 (alpha 16) on q/k/v/o, and a step
that computes the full-length logits and their loss (`model(input_ids, labels).loss`), then clips
the gradients and takes an AdamW step, as the HF Trainer does.
"""

from __future__ import annotations

import contextlib

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load(folder, length: int, on: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from pi_lora import quant

    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "linear", "factor": length / config.max_position_embeddings,
                              "rope_theta": config.rope_parameters["rope_theta"]}
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    net = AutoModelForCausalLM.from_pretrained(folder, config=config, quantization_config=q, dtype=dtype,
                                               device_map={"": on} if on.type == "cuda" else None)
    quant.protect(net)  # bitsandbytes' CPU repack would corrupt the weights (a no-op on CUDA): same kernels as pi-lora
    net = prepare_model_for_kbit_training(net, True, {"use_reentrant": False})
    return get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))


def optimizer(net) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))


def step(net, opt: torch.optim.Optimizer, ids: torch.Tensor, dtype: torch.dtype) -> float:
    """One optimizer step on `ids`; returns the loss."""
    opt.zero_grad(set_to_none=True)
    cast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(ids.device.type, dtype=dtype)
    with cast:
        value = net(input_ids=ids, labels=ids).loss
    value.backward()
    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
    opt.step()
    return value.item()
