"""`pi-lora merge`: a run folder into a full model that loads anywhere with the extended context.

Streams tensor by tensor over the base's safetensors shards (W' = W + scale * B @ A in fp32, cast
back), writing output shards as it goes, so peak memory is about one output shard plus the adapter,
not the model. Everything is written into a temporary folder that is renamed only after the
verification passed, so an interrupted or failed merge leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import model, quant, rope, run
from .errors import PiLoraError, first_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = "base_model.model."
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class Verification:
    """What a merge or export checked of what it wrote: "checked" (with what it found and, for
    logits, the largest relative difference) or "skipped" (with why)."""

    status: Literal["checked", "skipped"]
    detail: str = ""  # checked: what matched; skipped: the reason
    error: float | None = None  # logits checked: max relative difference

    @classmethod
    def skipped(cls, reason: str) -> Verification:
        return cls("skipped", reason)


NOT_ASKED = "--no-verify was given"
TOO_LARGE = "two fp32 copies of this model do not fit in memory here"


@dataclass
class Adapter:
    """LoRA factors by base weight name, whole replacement tensors (trained embed/norm), and the scale."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replaced: dict[str, torch.Tensor]
    scale: float

    def delta(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        if name not in self.factors:
            return None
        a, b = self.factors[name]
        if (b.shape[0], a.shape[1]) != tuple(shape):
            raise PiLoraError(
                f"the base does not match the adapter: {name} is {tuple(shape)} in the base, "
                f"{(b.shape[0], a.shape[1])} in the adapter."
            )
        return self.scale * (b.float() @ a.float())


def read_adapter(folder: Path) -> Adapter:
    config = run.verify_adapter(folder)  # a damaged adapter is one readable line, before any work
    weights_path = folder / "adapter_model.safetensors"
    # pi-lora trains plain LoRA (scale alpha / r); an adapter made otherwise is refused, not mis-scaled
    if any(config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")):
        raise PiLoraError("adapters with DoRA, rsLoRA or per-layer rank/alpha patterns are not supported by merge.")
    scale = config["lora_alpha"] / config["r"]
    factors: dict[str, list] = {}
    replaced = {}
    with safe_open(weights_path, "pt") as f:
        for key in f.keys():
            name = key.removeprefix(PREFIX)
            for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if name.endswith(part):
                    factors.setdefault(name.removesuffix(part) + ".weight", [None, None])[slot] = f.get_tensor(key)
                    break
            else:
                replaced[name] = f.get_tensor(key)
    return Adapter({k: tuple(v) for k, v in factors.items()}, replaced, scale)


def base_files(base: str, revision: str | None = None) -> Path:
    """A local folder holding the base's safetensors (hub ids come from the local hub cache or the hub)."""
    where = model.locate(base)
    folder = Path(where)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(where, revision=revision, allow_patterns=["*.json", "*.safetensors",
                                                                                     "tokenizer*", "*.jinja", "*.py"]))
        except Exception as e:  # hub errors have many types; all mean "not reachable here"
            raise PiLoraError(f"cannot get the base '{base}': {first_line(e)}") from e
    if not weight_files(folder):
        raise PiLoraError(f"base '{base}' has no .safetensors weights in {folder}; merge needs safetensors.")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors shards as its index names them (repos may ship other .safetensors too)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = run.read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise PiLoraError(f"weight index '{index}' is damaged: it has no weight_map.")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PiLoraError(f"the base in '{folder}' lacks {missing[0].name}, which its index names.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


@contextlib.contextmanager
def reading_weights(file: Path):
    """A truncated or garbage weight file is one line naming it, not a safetensors traceback."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise PiLoraError(f"cannot read the weights '{file}': {first_line(e)}") from None


def dequantized(weight: torch.Tensor, meta: dict) -> torch.Tensor:
    """dequant(quant(W)): the weights training actually saw through bitsandbytes.

    Quantized from the dtype training loaded the weights in (bf16 on a GPU), dequantized in fp32 as
    bitsandbytes' own matmul does, not rounded to 16 bits again.
    """
    import bitsandbytes.functional as bnbf

    dtype = getattr(torch, meta.get("compute_dtype", "float32"))
    packed, state = bnbf.quantize_4bit(
        weight.to(dtype), quant_type=meta["quant"], compress_statistics=meta.get("double_quant", True)
    )
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(packed, state)


def quantized_in_training(name: str, weight: torch.Tensor) -> bool:
    """Whether bitsandbytes stored this weight in 4 bits: every linear layer's but the LM head's."""
    return weight.ndim == 2 and "embed" not in name and not name.startswith("lm_head")


def merged(name: str, weight: torch.Tensor, adapter: Adapter, dtype, meta: dict, into: str) -> torch.Tensor:
    out_dtype = dtype or weight.dtype
    if name in adapter.replaced:
        return adapter.replaced[name].to(out_dtype)
    if not weight.is_floating_point():
        return weight
    delta = adapter.delta(name, weight.shape)
    if into == "dequantized" and quantized_in_training(name, weight):
        base = dequantized(weight, meta)
    elif delta is None:
        return weight.to(out_dtype)
    else:
        base = weight.float()
    return (base if delta is None else base + delta).to(out_dtype)


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor, with the file mapped only while it is read: a shard kept open would keep every
    page read so far resident, and peak memory would grow with the input shard, not the output one."""
    with reading_weights(file), safe_open(file, "pt") as f:
        return f.get_tensor(key).clone()


def write_shards(source: Path, out: Path, adapter: Adapter, dtype, meta: dict, into: str,
                 shard_bytes: int, progress=None) -> dict[str, str]:
    """Merged tensors written as `model-XXXXX.safetensors` shards; returns the weight map."""
    names = []
    for file in weight_files(source):
        with reading_weights(file), safe_open(file, "pt") as f:
            names += [(file, k) for k in f.keys()]
    task = progress.add_task("merging", total=len(names)) if progress else None
    pending, size, shards, weight_map = {}, 0, [], {}
    used = set()

    def flush():
        nonlocal pending, size
        if pending:
            shards.append(f"part-{len(shards):05d}.safetensors")
            save_file(pending, out / shards[-1], metadata={"format": "pt"})
            weight_map.update({k: shards[-1] for k in pending})
            pending, size = {}, 0

    for file, key in names:
        pending[key] = merged(key, read_tensor(file, key), adapter, dtype, meta, into).contiguous()
        used.add(key)
        size += pending[key].numel() * pending[key].element_size()
        if size >= shard_bytes:
            flush()
        if progress:
            progress.advance(task)
    flush()
    unused = (set(adapter.factors) | set(adapter.replaced)) - used
    if unused == {"lm_head.weight"} and torch.equal(adapter.replaced["lm_head.weight"],
                                                     adapter.replaced.get("model.embed_tokens.weight", torch.empty(0))):
        unused = set()  # a tied base: peft saved the trained embedding twice, the base stores it once
    if unused:
        raise PiLoraError(f"the base does not match the adapter: no base weight for {sorted(unused)[:3]}")
    return rename_shards(out, shards, weight_map)


def rename_shards(out: Path, shards: list[str], weight_map: dict[str, str]) -> dict[str, str]:
    """Standard shard names (model.safetensors, or model-0000i-of-0000n.safetensors with an index)."""
    if len(shards) == 1:
        names = {shards[0]: "model.safetensors"}
    else:
        names = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in names.items():
        (out / old).rename(out / new)
    return {k: names[v] for k, v in weight_map.items()}


def write_config(source: Path, out: Path, meta: dict, dtype) -> None:
    """config.json with the rope setting in both the transformers-5 form and the legacy form older
    readers use (none for ntk, which is plain RoPE with a larger theta)."""
    config = run.read_json(source / "config.json", "base config")
    pi = rope.from_meta(meta)
    config.pop("rope_theta", None)
    config["rope_parameters"] = pi.rope_parameters()
    config["rope_scaling"] = pi.rope_scaling()
    config["rope_theta"] = pi.rope_parameters()["rope_theta"]
    config["max_position_embeddings"] = pi.max_position_embeddings()
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_card(meta: dict, recipe_text: str) -> str:
    return (
        f"# {Path(meta['base']).name} extended to {meta['target_len']} tokens\n\n"
        f"Merged by pi-lora {meta['pi_lora_version']}: base `{meta['base']}` "
        f"(trained to {meta['original_len']} tokens) with {rope.METHODS.get(meta['rope_type'], 'plain RoPE')}, rope_type "
        f"`{meta['rope_type']}`, factor {meta['factor']:g}, rope_theta {meta['rope_theta']:g}, and a LoRA "
        f"adapter trained on a {meta['quant']} base.\n\n"
        "`config.json` carries the rope setting; load with plain `AutoModelForCausalLM.from_pretrained`.\n\n"
        f"## Recipe\n\n```yaml\n{recipe_text}```\n"
    )


def reference(source: Path, adapter_dir: Path, meta: dict, into: str):
    """Base + adapter through peft: full-precision base, or the 4-bit base training saw."""
    from peft import PeftModel
    from transformers import AutoConfig

    from .recipe import ModelSection

    trust = bool(meta.get("trust_remote_code"))  # run.require_trust checked the user said so
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    config.rope_parameters = {**meta["rope_parameters"]}
    kind = meta["quant"] if into == "dequantized" else "none"
    section = ModelSection(base=str(source), quant=kind, double_quant=meta.get("double_quant", True),
                           compute_dtype="fp32", trust_remote_code=trust)
    if into == "dequantized":  # quantize from the dtype training loaded the weights in, compute in fp32
        section.compute_dtype = "bf16" if meta.get("compute_dtype") == "bfloat16" else "fp32"
    base = model.load_base(section, config, torch.device("cpu"))
    for layer in quant.linear4bit_layers(base):
        layer.compute_dtype = torch.float32
    for t in [*base.parameters(), *base.buffers()]:  # what bitsandbytes did not quantize, in fp32
        if t.dtype in (torch.bfloat16, torch.float16):
            t.data = t.data.float()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def fits_twice(source: Path) -> bool:
    """Whether two fp32 copies of the model fit in the memory that is free now."""
    import psutil

    params = sum(f.stat().st_size for f in weight_files(source)) / 2  # assume 16-bit storage
    return 2 * 4 * params < 0.7 * psutil.virtual_memory().available


def logits_error(want_model, got_model, meta: dict) -> float:
    """Max relative logit difference on a random sequence running past the original length."""
    length = min(meta["target_len"], meta["original_len"] + 64)
    vocab = got_model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = want_model(input_ids=ids).logits.float()
        got = got_model(input_ids=ids).logits.float()
    return ((got - want).abs().max() / want.abs().max()).item()


# Storing W + dW in 16 bits rounds it; the tolerance is that rounding's effect, not slack for bugs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def verify(out: Path, source: Path, adapter_dir: Path, meta: dict, into: str) -> Verification:
    """Logits of the merged model against base + adapter, fp32 on CPU, past the original length."""
    from transformers import AutoModelForCausalLM

    merged_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=bool(meta.get("trust_remote_code")))
    tolerance = max(TOLERANCE.get(p.dtype, 1e-2) for p in merged_model.parameters())
    err = logits_error(reference(source, adapter_dir, meta, into), merged_model.float().eval(), meta)
    if not err <= tolerance:  # NaN compares false with everything: a NaN model fails here
        raise PiLoraError(f"verification failed: merged logits differ from base + adapter by {err:.2e} (relative)"
                          + ("; the model computes NaN or infinite values." if not math.isfinite(err) else "."))
    return Verification("checked", "merged logits match base + adapter", err)


def merge(run_dir: Path, output: Path, base: str | None = None, dtype: str | None = None,
          into: str = "full", check: bool = True, overwrite: bool = False, file_gib: float = 1.0,
          progress=None, trust_remote_code: bool = False) -> Verification:
    """Merge the run's adapter into the base; returns what was verified (`check`: the merged logits
    against base + adapter, skipped when two fp32 copies do not fit in memory).
    Reads the run while no `train --resume` changes it, and is the one writer of `output`."""
    meta = run.read_meta(run_dir)
    run.require_trust(meta, trust_remote_code, "merge")
    if into == "dequantized" and meta.get("quant") not in ("nf4", "fp4"):
        raise PiLoraError(f"--merge-base dequantized needs a run trained on a 4-bit base; this one used "
                          f"quant '{meta.get('quant')}'. Use --merge-base full.")
    run.check_output(output, run.MERGED, overwrite, run_inputs(run_dir, meta, base))
    with run.reading(run_dir), run.writing(output):
        return _merge(run_dir, output, meta, base, dtype, into, check, overwrite, file_gib, progress)


def run_inputs(run_dir: Path, meta: dict, base: str | None = None) -> list[Path]:
    """What a command reads from a run, and its base where that is a local folder: never its output."""
    bases = [b for b in (base, meta.get("base_path"), meta.get("base")) if b and Path(b).expanduser().exists()]
    return [run_dir / run.ADAPTER, run_dir / run.META, run_dir / run.RECIPE, *map(Path, bases)]


def _merge(run_dir: Path, output: Path, meta: dict, base, dtype, into, check, overwrite, file_gib, progress):
    adapter_dir = run_dir / run.ADAPTER
    run.recover(adapter_dir)  # no train writes the run meanwhile (merge holds its read lock)
    adapter = read_adapter(adapter_dir)
    source = base_files(base or meta.get("base_path") or meta["base"], meta.get("revision"))
    run.check_output(output, run.MERGED, overwrite, [source])
    need = sum(f.stat().st_size for f in weight_files(source))
    if dtype is not None:
        need = need * 4 // 2  # at most fp32 from a 16-bit base
    free = shutil.disk_usage(next(p for p in [output.parent, *output.parent.parents] if p.exists())).free
    if free < need * 1.05:
        raise PiLoraError(f"not enough disk for the merged model: needs about {need / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free at {output.parent}.")
    with run.atomic_dir(output) as tmp:
        weight_map = write_shards(source, tmp, adapter, DTYPES.get(dtype), meta, into,
                                  int(file_gib * 2**30), progress)
        if len(set(weight_map.values())) > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        write_config(source, tmp, meta, DTYPES.get(dtype))
        copied = [*COPIED, *(p.name for p in source.glob("*.py"))] if meta.get("trust_remote_code") else COPIED
        for name in copied:  # a base with its own code (auto_map) needs its .py files to load
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        recipe_path = run_dir / run.RECIPE
        recipe_text = recipe_path.read_text() if recipe_path.is_file() else ""
        (tmp / "README.md").write_text(model_card(meta, recipe_text))
        (tmp / run.META).write_text(json.dumps({**meta, "merged_into": into}, indent=2) + "\n")
        if not check:
            return Verification.skipped(NOT_ASKED)
        if not fits_twice(source):
            return Verification.skipped(TOO_LARGE)
        return verify(tmp, source, adapter_dir, meta, into)
