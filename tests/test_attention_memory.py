"""Attention never builds an L x L tensor: every tensor produced in a training step is checked."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from pi_lora import loss, model, rope
from pi_lora.recipe import LoraSection, ModelSection

L = 2048  # L*L = 4.2M elements; the tiny model's largest other tensor (logits chunk) is far smaller


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def training_step(tiny_base, attn: str):
    config = AutoConfig.from_pretrained(tiny_base)
    rope.apply(config, rope.interpolation(config, L))
    section = ModelSection(base=str(tiny_base), quant="none", attn_implementation=attn)
    net = model.add_lora(model.load_base(section, config, model.device()), LoraSection(rank=4), True).train()
    ids = torch.randint(0, 500, (1, L), device=model.device())
    watch = LargestTensor()
    with watch:
        loss.backward(net, ids, chunk=256)
    return watch


def test_sdpa_training_step_has_no_quadratic_tensor(tiny_base):
    watch = training_step(tiny_base, "sdpa")
    assert watch.largest < L * L, f"{watch.op} built a tensor of {watch.largest} elements"


def test_the_check_catches_eager_attention(tiny_base):
    watch = training_step(tiny_base, "eager")  # eager attention materialises the scores
    assert watch.largest >= L * L
