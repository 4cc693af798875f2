"""pi-lora: extend a RoPE model's context by Position Interpolation, train LoRA on a 4-bit base."""

__version__ = "0.1.0"
