"""Fused kernels from a maintained library, on our model instance: `train.kernels`.

liger: Liger-Kernel's Triton RMSNorm, SwiGLU MLP (silu(gate) * up in one kernel, saving less for
backward) and RoPE, on CUDA. They are applied to the instances of the model being trained, never
to transformers' classes or module functions: Liger's own `apply_liger_kernel_to_llama(model=...)`
also replaces `modeling_llama.LlamaRMSNorm`, `LlamaMLP` and `apply_rotary_pos_emb` for the whole
process, so every LLaMA built afterwards (an evaluation, a CPU model in the same process) would
run Triton kernels it never asked for.

Order (model.build): after peft (its ModulesToSaveWrapper copies of trained norms then exist,
and both copies are patched, never the wrapper) and after memory.narrow (its hooks sit in
`__call__`, so they still run), before memory.tile_mlps (which wraps whatever `mlp.forward` is: the
fused one then runs tile by tile; the other way round the fused forward would replace the tiling).

Liger's history around exactly this case (trainable RMSNorm weights under peft), read before
writing this:
- linkedin/Liger-Kernel#631 / #632: instance patching replaced the forward of peft's
  ModulesToSaveWrapper itself (`lora.trainable: [norm]`), and training failed; fixed by patching
  `original_module` and `modules_to_save.default`. Here every norm instance is patched directly
  (both copies are RMSNorm instances; the wrapper is not), which is that fix by construction.
- #383 / #390 -> #392, #764 -> #765: instance patching missed attributes the kernel's forward reads
  (`in_place`, then `row_mode`) and the first step failed. So Liger's own instance helpers set them
  (`_patch_rms_norm_module`, `_patch_swiglu_module`: what transformers' Trainer reaches through
  `_apply_liger_kernel_to_instance`), from the same release as the forward that reads them.
- #950 (in 0.7.0): the block RMSNorm backward summed the weight gradient in bf16 (hidden sizes up
  to 256); hence liger-kernel >= 0.7.0. #89 / #92: casts made to match LlamaRMSNorm ("llama"
  casting: only the inverse RMS in fp32). #74 / #85: Gemma's weight offset (1 + w); LLaMA has
  none (offset 0), and only LLaMA-style models are accepted here.
- Norm weights here are fp32 (trained: pi-lora keeps trainable weights fp32; frozen: peft's k-bit
  preparation) with bf16 inputs: Liger multiplies the bf16-rounded normalized input by the fp32
  weight and stores bf16, which is LlamaRMSNorm's fp32 product followed by memory.narrow's cast to
  bf16; its weight gradient is accumulated in fp32 and returned in the weight's dtype. The GPU
  check (bench/kernels_check.py) measures values and gradients, norm weights included.

On a CPU the kernels are off (Triton kernels need a GPU): the run computes with the plain ops,
which give the same numbers, and says so in one line. A recipe that asks for them stays usable on a
CPU machine (a smoke test, a tiny model), as `auto` memory settings re-plan on another device.
"""

from __future__ import annotations

import inspect
import types

import torch

from .errors import PiLoraError

CHOICES = ("none", "liger")
MIN_LIGER = "0.7.0"
# model types whose norms, MLPs and rope are LLaMA's (Liger maps the same three kernels to each)
LLAMA_LIKE = ("llama", "mistral", "qwen2")


def usable(choice: str, on: torch.device) -> bool:
    return choice == "liger" and on.type == "cuda"


def describe(choice: str, on: torch.device) -> str | None:
    """The one line a run prints about its kernels; None when none were asked for."""
    if choice == "none":
        return None
    if not usable(choice, on):
        return f"kernels: train.kernels {choice} runs on CUDA only; on {on.type} the plain ops run (the same numbers)"
    return f"kernels: {choice} (fused RMSNorm, SwiGLU and RoPE on this model)"


def load():
    """Liger's pieces used here, or a one-line error saying how to install them."""
    try:
        import importlib.metadata as md

        from liger_kernel.transformers import monkey_patch
        from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: F401 (the patch binds its forward)
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        version = md.version("liger-kernel")
    except ImportError as e:
        raise PiLoraError(f"train.kernels liger needs liger-kernel >= {MIN_LIGER} (pip install 'pi-lora[liger]'): "
                          f"{e}") from None
    from packaging.version import Version

    if Version(version) < Version(MIN_LIGER):
        raise PiLoraError(f"train.kernels liger needs liger-kernel >= {MIN_LIGER}; {version} is installed.")
    missing = [n for n in ("_patch_rms_norm_module", "_patch_swiglu_module") if not hasattr(monkey_patch, n)]
    if missing:
        raise PiLoraError(f"liger-kernel {version} has no {', '.join(missing)}; use a release this pi-lora knows "
                          f"(>= {MIN_LIGER}).")
    return types.SimpleNamespace(rms_norm=monkey_patch._patch_rms_norm_module,
                                 swiglu=lambda m: monkey_patch._patch_swiglu_module(m, LigerSwiGLUMLP),
                                 rope=liger_rotary_pos_emb, version=version)


def check(choice: str, on: torch.device) -> None:
    """Raise the error `apply` would, before anything is loaded."""
    if usable(choice, on):
        load()


def apply(net, choice: str, on: torch.device) -> dict[str, int]:
    """Apply `choice`'s kernels to `net` (peft-wrapped or not); how many modules of each kind got them."""
    if not usable(choice, on):
        return {}
    return attach(net, load())


def attach(net, liger) -> dict[str, int]:
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    config = inner.config
    if config.model_type not in LLAMA_LIKE:
        raise PiLoraError(f"train.kernels liger: {config.model_type} models are not supported "
                          f"(supported: {', '.join(LLAMA_LIKE)}); use train.kernels none.")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise PiLoraError(f"train.kernels liger: the fused SwiGLU needs hidden_act silu, not {config.hidden_act}.")
    # the final norm's class; with lora.trainable [norm] inner.model.norm is peft's wrapper around it
    norm_type = type(getattr(inner.model.norm, "original_module", inner.model.norm))
    # every norm instance: with lora.trainable [norm], peft's frozen original and its trained copy
    norms = [m for m in inner.modules() if type(m) is norm_type]
    for module in norms:
        liger.rms_norm(module, eps=module.variance_epsilon)
    layers = inner.model.layers
    for layer in layers:
        liger.swiglu(layer.mlp)
    roped = sum(with_rope(layer.self_attn, liger.rope) for layer in layers)
    return {"rms_norm": len(norms), "swiglu": len(layers), "rope": roped}


def with_rope(attention, rope) -> bool:
    """Give this attention instance a forward that calls `rope` where its class's calls the module's
    `apply_rotary_pos_emb`. The name is looked up in the function's globals at call time and no
    library offers a per-instance hook for it, so the instance gets a copy of the class's function
    whose globals say `rope` for that one name; the class and the module are untouched."""
    function = inspect.unwrap(type(attention).forward)  # below decorators that only rename kwargs
    if "forward" in attention.__dict__ or "apply_rotary_pos_emb" not in function.__code__.co_names:
        return False  # a forward of its own (another wrapper owns this instance), or no such call
    scope = {**function.__globals__, "apply_rotary_pos_emb": rope}
    copy = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    attention.forward = types.MethodType(copy, attention)
    attention.apply_rotary_pos_emb = rope  # what memory.tile_attention's tiles call in place of the forward
    return True
