"""train.kernels liger against the plain ops, on a GPU: values and gradients, norm weights included.

Two levels, bf16 compute:
  ops    Liger's RMSNorm (fp32 weight, as pi-lora trains it, on bf16 inputs), SwiGLU and RoPE against
         LlamaRMSNorm (+ the cast to bf16 memory.narrow adds), silu(gate) * up and
         apply_rotary_pos_emb: outputs, input gradients and the norm weight's gradient
  model  the model `pi-lora train` builds (model.build) with train.kernels none and liger, on
         the same random NF4 base (LLaMA-7B's and Llama-3-8B's layer shapes, 2 layers), LoRA r=8 on
         q/k/v/o and trained norms (lora.trainable [norm]), plain RoPE at --length: the loss, the
         LoRA gradients and the norm weights' gradients
An error is the relative L2 distance ||a - b|| / ||b||; a check passes under TOLERANCE (bf16 has 8
bits of mantissa: 2^-8 = 0.4% per rounding, and the fused kernels round at other places).

    python bench/kernels_check.py [--length 4096] [--out FILE.json]

Without CUDA (or without liger-kernel) it says so and exits 0: nothing to check there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

TOLERANCE = {"ops": 1e-2, "model": 3e-2}
GIB = 2**30


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ops(on) -> list[dict]:
    """Each Liger op against the plain one: output, input gradient (and the norm's weight gradient)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.ops import LigerSiLUMulFunction
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator(device=on).manual_seed(0)
    rows = []
    x = torch.randn(2, 4096, 4096, device=on, generator=g, dtype=torch.bfloat16)
    dy = torch.randn(x.shape, device=on, generator=g, dtype=torch.bfloat16)
    weight = torch.rand(4096, device=on, generator=g) + 0.5  # fp32, away from 1
    plain, fused = LlamaRMSNorm(4096, eps=1e-6).to(on), LigerRMSNorm(4096, eps=1e-6).to(on)
    for norm in (plain, fused):
        norm.weight.data.copy_(weight)
    outs = []
    for norm in (plain, fused):
        xi = x.clone().requires_grad_(True)
        y = norm(xi).to(torch.bfloat16)  # memory.narrow's cast; Liger's output is bf16 already
        y.backward(dy.clone())  # a copy each: Liger's backward writes dX into the incoming gradient
        outs.append((y.detach(), xi.grad, norm.weight.grad))
    rows += [{"level": "ops", "what": f"RMSNorm {w}", "error": error(f, p)}
             for w, p, f in zip(("output", "input grad", "weight grad (fp32)"), outs[0], outs[1])]

    a = torch.randn(2, 4096, 11008, device=on, generator=g, dtype=torch.bfloat16)
    b = torch.randn(a.shape, device=on, generator=g, dtype=torch.bfloat16)
    d = torch.randn(a.shape, device=on, generator=g, dtype=torch.bfloat16)
    res = []
    def fused(u, v):  # 0.8 added the multipliers (1.0: LLaMA's); 0.7 takes the two inputs only
        try:
            return LigerSiLUMulFunction.apply(u, v, 1.0, 1.0)
        except TypeError:
            return LigerSiLUMulFunction.apply(u, v)

    for f in (lambda u, v: torch.nn.functional.silu(u) * v, fused):
        u, v = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = f(u, v)
        out.backward(d)
        res.append((out.detach(), u.grad, v.grad))
    rows += [{"level": "ops", "what": f"SwiGLU {w}", "error": error(f, p)}
             for w, p, f in zip(("output", "gate grad", "up grad"), res[0], res[1])]

    q = torch.randn(1, 32, 4096, 128, device=on, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, device=on, generator=g, dtype=torch.bfloat16)
    angle = torch.arange(4096, device=on)[:, None] / 10000 ** (torch.arange(0, 128, 2, device=on) / 128) / 4
    cos, sin = [t.repeat(1, 2)[None].to(torch.bfloat16) for t in (angle.cos(), angle.sin())]
    res = []
    for f in (apply_rotary_pos_emb, liger_rotary_pos_emb):
        # Liger rotates q and k in place, as the q/k projections' outputs: give it copies, as they are
        qi, ki = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        qo, ko = f(qi * 1, ki * 1, cos, sin)
        (qo.float().square().sum() + ko.float().square().sum()).backward()
        res.append((qo.detach(), ko.detach(), qi.grad, ki.grad))
    rows += [{"level": "ops", "what": f"RoPE {w}", "error": error(f, p)}
             for w, p, f in zip(("q", "k", "q grad", "k grad"), res[0], res[1])]
    return rows


def model_rows(name: str, config: dict, length: int, on) -> list[dict]:
    """The model pi_lora.model.build makes, kernels none against liger: loss, LoRA and norm gradients."""
    import llama

    folder = Path(tempfile.mkdtemp(prefix="pi-lora-kernels-"))
    try:
        llama.build_base(folder, {**config, "num_hidden_layers": 2}, on)
        return compare(name, folder, length, on)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 1-3 GB a shape


def recipe_for(folder: Path, length: int, choice: str):
    """The check's recipe: plain RoPE at `length` (no extension: a base trained to 8k is checked at 4k
    too), LoRA on q/k/v/o and the norms trained, `train.kernels` = `choice`."""
    import llama
    from pi_lora.recipe import Recipe

    return Recipe.model_validate({
        "model": {"base": str(folder)}, "rope": {"target_len": length, "scaling": "none"},
        "lora": {"rank": 8, "alpha": 16.0, "target_modules": list(llama.TARGETS), "trainable": ["norm"]},
        "train": {"kernels": choice, "loss_chunk": 1024, "mlp_tile": 0, "offload_activations": False,
                  "grad_accum": 1}})


def compare(name: str, folder: Path, length: int, on) -> list[dict]:
    from pi_lora import model, plan, preflight, train
    from pi_lora.loss import ChunkedLoss

    results = {}
    for choice in ("none", "liger"):
        recipe = recipe_for(folder, length, choice)
        cfg, _ = preflight.config_for(recipe)
        settings = plan.Settings.of(recipe, 2)
        train.seed_everything(0)
        net = model.build(recipe, cfg, on, torch.bfloat16, settings).train()
        if choice == "liger":  # the comparison means something only if the fused forwards are in place
            patched = sum("forward" in m.__dict__ for m in net.modules())
            if patched < 3 * 2:  # 2 layers: their norms, MLPs and attention at least
                raise RuntimeError(f"train.kernels liger left the model as it was ({patched} forwards replaced)")
        with torch.no_grad():  # LoRA B away from 0, trained norms away from 1: every gradient path live
            gen = torch.Generator(device="cpu").manual_seed(1)
            for n, p in net.named_parameters():
                if "lora_B" in n or ("modules_to_save" in n and "norm" in n):
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.02)
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(on)
        loss = train.step_loss(ChunkedLoss(net, recipe.train.loss_chunk), iter([ids]), recipe.train, on, torch.bfloat16)
        results[choice] = (loss, {n: p.grad.detach().float().clone() for n, p in net.named_parameters()
                                  if p.requires_grad})
        del net
        torch.cuda.empty_cache()
    (plain_loss, plain), (fused_loss, fused) = results["none"], results["liger"]
    rows = [{"level": "model", "what": f"{name} loss ({plain_loss:.5f})", "error": abs(fused_loss - plain_loss) / abs(plain_loss)}]
    for kind, pick in (("LoRA grads", lambda n: "lora_" in n), ("norm weight grads", lambda n: "norm" in n)):
        names = [n for n in plain if pick(n)]
        a = torch.cat([fused[n].flatten() for n in names])
        b = torch.cat([plain[n].flatten() for n in names])
        rows.append({"level": "model", "what": f"{name} {kind} ({len(names)} tensors)", "error": error(a, b)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096, help="tokens of the model-level check [4096]")
    p.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "why": "no CUDA here: Liger's kernels are Triton (GPU) kernels"}))
        return 0
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        print(json.dumps({"status": "unavailable", "why": f"liger-kernel is not installed ({e})"}))
        return 0
    import importlib.metadata as md

    import llama

    on = torch.device("cuda", 0)
    rows = ops(on)
    for name, config in (("LLaMA-7B layers", llama.LLAMA_7B), ("Llama-3-8B layers", llama.LLAMA3_8B)):
        try:
            rows += model_rows(name, config, args.length, on)
        except Exception as e:  # a failed row; the other shape's rows and the ops' still count
            rows.append({"level": "model", "what": f"{name}: {type(e).__name__}: {e}", "error": float("inf")})
    for r in rows:
        r["tolerance"] = TOLERANCE[r["level"]]
        r["ok"] = r["error"] <= r["tolerance"]
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['level']:5} {r['what']}: {r['error']:.2e} (tolerance {r['tolerance']:g})")
    out = {"status": "ok" if all(r["ok"] for r in rows) else "mismatch", "liger": md.version("liger-kernel"),
           "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
