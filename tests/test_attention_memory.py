"""Attention never builds an L x L tensor: every tensor produced in a training step is checked."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pi_lora import loss, model, plan, pose, preflight, train
from pi_lora.recipe import Recipe

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


def training_step(tiny_base, attn: str, short_windows: bool = False):
    """One step of the model `pi-lora train` builds (unquantized), watched; `short_windows`: with
    PoSE position ids (two chunks spread over 4 L), which come with a 2-D mask of ones."""
    recipe = Recipe.model_validate({"model": {"base": str(tiny_base), "quant": "none", "attn_implementation": attn},
                                    "rope": {"target_len": L}, "lora": {"rank": 4},
                                    "train": {"loss_chunk": 256, "grad_accum": 1, "mlp_tile": 0}})
    config, _ = preflight.config_for(recipe)
    on = model.device()
    dtype = model.compute_dtype(recipe.model.compute_dtype, on)
    net = model.build(recipe, config, on, dtype, plan.Settings.of(recipe, dtype.itemsize)).train()
    ids = torch.randint(0, 500, (1, L), device=on)
    batch = (ids, torch.from_numpy(pose.positions(0, L, 4 * L, 2, 0))[None]) if short_windows else ids
    watch = LargestTensor()
    with watch:
        train.step_loss(loss.ChunkedLoss(net, recipe.train.loss_chunk), iter([batch]), recipe.train, on, dtype)
    return watch


def test_sdpa_training_step_has_no_quadratic_tensor(tiny_base):
    watch = training_step(tiny_base, "sdpa")
    assert watch.largest < L * L, f"{watch.op} built a tensor of {watch.largest} elements"


def test_the_check_catches_eager_attention(tiny_base):
    watch = training_step(tiny_base, "eager")  # eager attention materialises the scores
    assert watch.largest >= L * L


def test_short_windows_keep_sdpa_on_its_causal_path(tiny_base):
    watch = training_step(tiny_base, "sdpa", short_windows=True)
    assert watch.largest < L * L, f"{watch.op} built a tensor of {watch.largest} elements"
