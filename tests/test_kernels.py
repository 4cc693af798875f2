"""train.kernels: the recipe key, CPU behaviour, and how pi_lora.kernels applies Liger to our model instance.

Liger's kernels are Triton (CUDA); here a stand-in package with Liger's module layout and entry
points computes the plain ops and counts its calls, so these tests check the application: which
modules get a kernel (peft's trained norm copies, never the wrapper), that it is what runs in the
forward (also tile by tile under train.mlp_tile), that values and gradients are unchanged, and that
nothing global changes. The kernels' own numbers are checked on a GPU (bench/kernels_check.py).
"""

import sys
import textwrap

import pytest
import torch

from pi_lora import kernels, model, plan
from pi_lora.errors import PiLoraError, RecipeError
from pi_lora.recipe import Recipe, validate

FAKE = {
    "liger_kernel/__init__.py": "",
    "liger_kernel/transformers/__init__.py": "CALLS = {'rms_norm': 0, 'swiglu': 0, 'rope': 0}\nLENGTHS = []\n",
    "liger_kernel/transformers/rms_norm.py": """
        import torch
        from liger_kernel.transformers import CALLS

        class LigerRMSNorm(torch.nn.Module):
            def forward(self, x):  # LlamaRMSNorm's arithmetic ("llama" casting), counted
                CALLS["rms_norm"] += 1
                h = x.float()
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
                return (self.offset + self.weight) * h.to(x.dtype)
        """,
    "liger_kernel/transformers/swiglu.py": """
        import torch
        from liger_kernel.transformers import CALLS, LENGTHS

        class LigerSwiGLUMLP(torch.nn.Module):
            def forward(self, x):
                CALLS["swiglu"] += 1
                LENGTHS.append(x.shape[1])
                return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        """,
    "liger_kernel/transformers/rope.py": """
        from transformers.models.llama import modeling_llama
        from liger_kernel.transformers import CALLS

        PLAIN = modeling_llama.apply_rotary_pos_emb

        def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            CALLS["rope"] += 1
            return PLAIN(q, k, cos, sin, unsqueeze_dim)
        """,
    "liger_kernel/transformers/monkey_patch.py": """
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        def _bind(module, name, fn):
            module.__dict__[name] = fn.__get__(module, module.__class__)

        def _patch_rms_norm_module(module, offset=0.0, eps=1e-6, casting_mode="llama", in_place=True, row_mode=None):
            if type(module).__name__ == "ModulesToSaveWrapper":
                raise AssertionError("the wrapper itself was patched")
            module.offset, module.casting_mode, module.variance_epsilon = offset, casting_mode, eps
            module.in_place, module.row_mode = in_place, row_mode
            _bind(module, "forward", LigerRMSNorm.forward)

        def _patch_swiglu_module(module, liger_module):
            _bind(module, "forward", liger_module.forward)
        """,
}


def write_fake(root, version="0.8.5", helpers=True):
    for name, text in FAKE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(text)
        if not helpers and name.endswith("monkey_patch.py"):
            text = text.replace("def _patch_swiglu_module", "def _renamed")
        path.write_text(text)
    meta = root / f"liger_kernel-{version}.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: liger_kernel\nVersion: {version}\n")


def forget_liger():
    for name in [n for n in sys.modules if n == "liger_kernel" or n.startswith("liger_kernel.")]:
        del sys.modules[name]


@pytest.fixture
def liger(tmp_path, monkeypatch):
    """The stand-in liger_kernel on sys.path; its call counters."""
    forget_liger()
    write_fake(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import liger_kernel.transformers as lt

    yield lt.CALLS
    forget_liger()


def recipe_for(folder, kernels_choice="none", mlp_tile=0, attention_tile=0):
    return Recipe.model_validate({
        "model": {"base": str(folder), "quant": "none", "compute_dtype": "fp32"},
        "lora": {"rank": 4, "target_modules": "all-linear", "trainable": ["norm"]},
        "train": {"mlp_tile": mlp_tile, "attention_tile": attention_tile, "kernels": kernels_choice}})


def build(folder, kernels_choice="none", mlp_tile=0, attention_tile=0):
    recipe = recipe_for(folder, kernels_choice, mlp_tile, attention_tile)
    on = torch.device("cpu")
    settings = plan.Settings.of(recipe, 4)
    torch.manual_seed(0)
    net = model.build(recipe, model.load_config(str(folder)), on, torch.float32, settings).train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "modules_to_save" in name and "norm" in name:
                p.uniform_(0.5, 1.5)  # trained norms away from 1, so a wrong weight would show
    return net


def loss_and_grads(net, ids):
    value = net(input_ids=ids, labels=ids).loss
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def overridden(net) -> list[str]:
    """Modules whose forward is set on the instance (not their class's)."""
    return [name for name, m in net.named_modules() if "forward" in m.__dict__]


def test_recipe_key():
    assert Recipe().train.kernels == "none"
    assert Recipe.model_validate({"train": {"kernels": "liger"}}).train.kernels == "liger"
    with pytest.raises(RecipeError) as e:
        validate({"model": {"base": "x"}, "rope": {"target_len": 8}, "train": {"kernels": "triton"}})
    assert any(p.startswith("train.kernels:") for p in e.value.problems)


def test_cpu_runs_the_plain_ops_and_says_so(tiny_base, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # importing it would fail: it is never needed
    cpu = torch.device("cpu")
    kernels.check("liger", cpu)
    net = build(tiny_base, "liger")
    assert overridden(net) == []
    line = kernels.describe("liger", cpu)
    assert "CUDA only" in line and "plain ops" in line
    assert kernels.describe("none", cpu) is None
    assert kernels.apply(net, "liger", cpu) == {}


def test_missing_or_old_liger_is_refused_on_cuda(tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    forget_liger()
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(PiLoraError, match=r"pi-lora\[liger\]"):
        kernels.check("liger", cuda)
    kernels.check("none", cuda)
    monkeypatch.delitem(sys.modules, "liger_kernel")
    write_fake(tmp_path / "old", version="0.6.4")
    monkeypatch.syspath_prepend(str(tmp_path / "old"))
    with pytest.raises(PiLoraError, match="0.6.4 is installed"):
        kernels.check("liger", cuda)
    forget_liger()


def test_a_release_without_the_instance_helpers_is_refused(tmp_path, monkeypatch):
    forget_liger()
    write_fake(tmp_path, helpers=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PiLoraError, match="_patch_swiglu_module"):
        kernels.load()
    forget_liger()


def test_liger_on_norms_mlps_and_rope_with_trained_norms(tiny_base, liger):
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    want, want_grads = loss_and_grads(build(tiny_base), ids)
    assert liger == {"rms_norm": 0, "swiglu": 0, "rope": 0}

    net = build(tiny_base)
    layers = net.config.num_hidden_layers
    # 2 norms a layer and the final one, each as peft's frozen original and its trained copy
    assert kernels.attach(net, kernels.load()) == {"rms_norm": 2 * (2 * layers + 1), "swiglu": layers, "rope": layers}
    patched = overridden(net)
    assert not [n for n in patched if n.endswith("norm") or n.endswith("layernorm")]  # never the wrappers
    assert sum(".modules_to_save.default" in n for n in patched) == 2 * layers + 1
    got, grads = loss_and_grads(net, ids)
    # the trained copies are what runs (adapters enabled): each layer's in the forward and again in its
    # checkpoint's recompute in backward, the final norm once
    assert liger == {"rms_norm": 2 * 2 * layers + 1, "swiglu": 2 * layers, "rope": 2 * layers}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    norms = [n for n in grads if "norm" in n]
    assert len(norms) == 2 * layers + 1 and all(grads[n].abs().sum() > 0 for n in norms)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_liger_runs_inside_the_mlp_tiles(tiny_base, liger, monkeypatch):
    monkeypatch.setattr(kernels, "usable", lambda choice, on: choice == "liger")  # as on CUDA
    ids = torch.randint(0, 500, (1, 50), generator=torch.Generator().manual_seed(2))
    want, _ = loss_and_grads(build(tiny_base, mlp_tile=16), ids)
    assert liger["swiglu"] == 0
    net = build(tiny_base, "liger", mlp_tile=16)  # model.build: kernels, then the tiling
    got, _ = loss_and_grads(net, ids)
    from liger_kernel.transformers import LENGTHS

    # the fused MLP runs on the tiles (16, 16, 16 and 2 positions), never on the whole 50
    assert liger["swiglu"] > 0 and sorted(set(LENGTHS)) == [2, 16]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_liger_rope_runs_inside_the_attention_tiles(tiny_base, liger, monkeypatch):
    monkeypatch.setattr(kernels, "usable", lambda choice, on: choice == "liger")  # as on CUDA
    ids = torch.randint(0, 500, (1, 50), generator=torch.Generator().manual_seed(3))
    want, want_grads = loss_and_grads(build(tiny_base, attention_tile=16), ids)
    assert liger["rope"] == 0
    net = build(tiny_base, "liger", attention_tile=16)  # kernels first, then the attention tiling
    got, grads = loss_and_grads(net, ids)
    layers = net.config.num_hidden_layers
    # 4 tiles a layer (16, 16, 16, 2), in the forward and again in the checkpoint recomputes
    assert liger["rope"] >= 4 * layers
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_nothing_global_changes(tiny_base, liger):
    from transformers.models.llama import modeling_llama

    rope, attention, norm = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaAttention.forward,
                             modeling_llama.LlamaRMSNorm.forward)
    kernels.attach(build(tiny_base), kernels.load())
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert modeling_llama.LlamaAttention.forward is attention and modeling_llama.LlamaRMSNorm.forward is norm
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    build(tiny_base)(input_ids=ids)  # a model built afterwards runs the plain ops
    assert liger == {"rms_norm": 0, "swiglu": 0, "rope": 0}


def test_other_architectures_are_refused(tiny_base, liger):
    net = build(tiny_base)
    net.get_base_model().config.model_type = "gemma"  # RMSNorm (1 + w): not LLaMA's
    with pytest.raises(PiLoraError, match="gemma models are not supported"):
        kernels.attach(net, kernels.load())
    net = build(tiny_base)
    net.get_base_model().config.hidden_act = "gelu"
    with pytest.raises(PiLoraError, match="hidden_act silu"):
        kernels.attach(net, kernels.load())


def test_an_attention_with_a_forward_of_its_own_keeps_it(tiny_base, liger):
    net = build(tiny_base)
    attention = net.get_base_model().model.layers[0].self_attn
    own = attention.forward  # as a wrapper set on the instance would be
    attention.forward = own
    assert kernels.attach(net, kernels.load())["rope"] == net.config.num_hidden_layers - 1
    assert attention.__dict__["forward"] is own
