"""Keeping bitsandbytes 4-bit weights exactly as quantized.

On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place the first
time it sees an eval-mode forward whose input needs no gradient (any no-grad evaluation,
`generate`, or the first layers of a frozen model). From then on its matmul has no autograd
kernel (LoRA gradients are wrong, input gradients vanish) and `dequantize_4bit` returns wrong
weights, so a merge is corrupted; only a UserWarning at backward time says so.

The repack is gated by the layer's `support_avx512bf16_for_cpu` attribute, so clearing that
attribute on every 4-bit layer prevents it exactly; the only cost is that CPU inference uses the
fp32 kernel. This sets an attribute the library reads; it patches no code.
"""

from __future__ import annotations

from .errors import PiLoraError


def linear4bit_layers(model):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    # the real bitsandbytes layer, not peft's lora.Linear4bit wrapper around it
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and state(m) is not None]


def state(layer):
    """A 4-bit layer's quantization state; the layer keeps it too, as FSDP swaps the weight for a shard."""
    return getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)


def protect(model) -> int:
    """Prevent the in-place CPU repack on every 4-bit layer; returns how many layers were set."""
    layers = linear4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def repacked(model) -> int:
    """How many 4-bit layers were repacked (and so give wrong gradients and wrong merges)."""
    return sum(bool(getattr(state(m), "packing_format_for_cpu", False)) for m in linear4bit_layers(model))


def check(model) -> None:
    count = repacked(model)
    if count:
        raise PiLoraError(
            f"{count} 4-bit layers were repacked by bitsandbytes' CPU inference path; their gradients and "
            "dequantized weights are wrong. This is a bug in pi-lora: please report it."
        )
