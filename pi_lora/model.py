"""Loading a base (alias, hub id, folder or GGUF file) with PI and 4-bit weights; adding LoRA; the one model build."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import kernels, memory, quant
from .errors import OutOfMemory, PiLoraError, first_line

# Short names for the public checkpoints people extend; `pi-lora models` lists them.
ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "tinyllama-1.1b": "TinyLlama/TinyLlama_v1.1",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
}
DEMO = "demo"  # a tiny LLaMA built on this machine; see pi_lora.demo
# Bases whose config claims more positions than they were trained at (the default rope.original_len).
TRAINED_LEN = {"mistral-7b": 8192}


def locate(base: str) -> str:
    """Where from_pretrained should look for `base` (GGUF files are converted to a folder once)."""
    if base == DEMO:
        from .demo import demo_base

        return str(demo_base())
    base = ALIASES.get(base, base)
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PiLoraError(f"GGUF file '{base}' does not exist.")
        return str(gguf_folder(path))
    if path.exists() and not path.is_dir():
        raise PiLoraError(f"base '{base}' is a file; give a model folder, a .gguf file, a hub id or an alias.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PiLoraError(f"model folder '{base}' has no config.json.")
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or Path(path.parts[0]).is_dir():
        # `runs/typo` is a hub id in form, but `runs/` is a folder here: a mistyped local path
        raise PiLoraError(f"model folder '{base}' does not exist (no such folder).")
    from . import hub

    hub.require(base, "model")
    return base


def gguf_folder(gguf: Path, cache: Path | None = None) -> Path:
    """A GGUF file as a plain transformers folder (dequantized, fp32), converted once and cached.

    A folder, unlike transformers' GGUF path, can be re-quantized to NF4 and merged into. Its
    tokenizer splits text as llama.cpp does for the GGUF's pre-tokenizer (transformers' reader drops
    e.g. SmolLM2's digit split), and it keeps the GGUF's tokenizer keys for `pi-lora export`.
    """
    import hashlib

    from . import vocab
    from .demo import home

    stat = gguf.stat()
    source = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|tokenizer-v2"  # v2: split and keys as above
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = (cache or home() / "gguf") / f"{gguf.stem}-{key}"
    from .run import atomic_dir, writing

    with writing(folder, wait=True):  # one process converts; another waits and uses its folder
        if (folder / "config.json").is_file():
            return folder
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer, known = vocab.gguf_tokenizer(gguf)
        except Exception as e:  # the gguf reader fails on a truncated or garbage file with any error type
            raise PiLoraError(f"cannot read GGUF '{gguf}': {first_line(e)}") from None
        vocab.warn_unknown_split(gguf, known)
        model.hf_quantizer.remove_quantization_config(model)  # the weights are dense already
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            vocab.save_tokenizer_keys(gguf, tmp)
    return folder


def load_config(base: str, revision: str | None = None, trust_remote_code: bool = False):
    where = locate(base)
    try:
        return AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        aliases = ", ".join(ALIASES)
        raise PiLoraError(
            f"cannot load the config of '{base}': {first_line(e)}\n"
            f"Give a local model folder, a hub id (online, or in the local cache), or an alias: {aliases}."
        ) from e


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # alias -> config.json, so planning needs no network


def plan_config(base: str, revision: str | None = None, trust_remote_code: bool = False):
    """The config to plan memory with: the shipped copy for an alias, else the base's own."""
    if base == DEMO:  # planned without building it: a dry run writes nothing
        from .demo import demo_config

        return demo_config()
    shipped = SHIPPED_CONFIGS / f"{base}.json"
    if base in ALIASES and shipped.is_file():
        from transformers import LlamaConfig

        return LlamaConfig.from_json_file(shipped)
    return load_config(base, revision, trust_remote_code)


def load_tokenizer(base: str, revision: str | None = None, trust_remote_code: bool = False):
    where = locate(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise PiLoraError(f"cannot load the tokenizer of '{base}': {first_line(e)}") from e
    if tokenizer.eos_token_id is None:
        raise PiLoraError(f"the tokenizer of '{base}' has no end-of-sequence token to separate documents.")
    return tokenizer


def device() -> torch.device:
    """This process's device: its GPU (one per process under torchrun), or the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def compute_dtype(name: str, on: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]  # no fp16: see recipe.ModelSection


def quantization(section, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if section.quant == "none":
        return None
    if section.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


@contextlib.contextmanager
def _library_errors(base: str):
    """Missing optional kernels (flash-attn) and unreadable weights (truncated, garbage) are bad
    input, not crashes."""
    from safetensors import SafetensorError

    try:
        yield
    except (ImportError, OSError, ValueError, SafetensorError) as e:
        raise PiLoraError(f"cannot load '{base}': {first_line(e)}") from None


def check_rank(config, lora) -> None:
    """lora.rank at most the smaller side of every targeted projection: B @ A cannot have a higher
    rank than that, so a larger one only adds weights (and memory) that can learn nothing more."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", hidden)
    sides = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
             "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
             "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    targets = list(sides) if lora.target_modules == "all-linear" else [n for n in lora.target_modules if n in sides]
    if not targets:
        return
    name = min(targets, key=lambda n: min(sides[n]))
    limit = min(sides[name])
    if lora.rank > limit:
        raise PiLoraError(f"lora.rank {lora.rank} is larger than {name}'s smaller dimension ({limit}); "
                          f"give lora.rank {limit} or less.")


def layer_map(config, counts: list[int]) -> dict[str, int]:
    """An accelerate device map putting counts[g] consecutive decoder layers on GPU g.

    Embeddings go to the first GPU, the final norm and head to the last; a head tied to the
    embeddings stays with them (a tied weight lives on one device).
    """
    if sum(counts) != config.num_hidden_layers:
        raise PiLoraError(f"a split of {sum(counts)} layers does not match the model's {config.num_hidden_layers}.")
    last = len(counts) - 1
    mapping = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": last,
               "lm_head": 0 if getattr(config, "tie_word_embeddings", False) else last}
    layer = 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            mapping[f"model.layers.{layer}"] = gpu
            layer += 1
    return mapping


def placement(on: torch.device, split: list[int] | None, config):
    """from_pretrained's device_map: one GPU, the layers split across several, or None on a CPU."""
    if split and len(split) > 1:
        if torch.cuda.device_count() < len(split):
            raise PiLoraError(f"model.gpus is {len(split)} but this machine has {torch.cuda.device_count()} GPU(s).")
        return layer_map(config, split)
    return {"": on.index or 0} if on.type == "cuda" else None


def load_base(section, config, on: torch.device, protect: bool = True, split: list[int] | None = None):
    """The base model with PI already in `config`, quantized as the recipe says, on one or `split` GPUs."""
    where = locate(section.base)
    dtype = compute_dtype(section.compute_dtype, on)
    with warnings.catch_warnings(), _library_errors(section.base):
        warnings.filterwarnings("ignore", message=".*rope_scaling.*")
        model = AutoModelForCausalLM.from_pretrained(
            where,
            config=config,
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            dtype=dtype,
            quantization_config=quantization(section, dtype),
            attn_implementation=section.attn_implementation,
            device_map=placement(on, split, config),
        )
    model.config.use_cache = False
    if protect:
        quant.protect(model)
    return model


def trainable_module_names(model, kinds: list[str]) -> list[str]:
    """peft `modules_to_save` names for LongLoRA's extra trainable layers."""
    names = []
    if "embed" in kinds:
        embed = model.get_input_embeddings()
        names += [name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if mod is embed]
    if "norm" in kinds:
        # peft matches by suffix, so "norm" covers input_layernorm, post_attention_layernorm and the final norm
        names.append("norm")
    return names


def add_lora(model, lora, gradient_checkpointing: bool | int):
    """Wrap the base in a peft LoRA model; only adapters (and `trainable` layers) get gradients.

    `gradient_checkpointing`: True checkpoints every decoder layer, N the first N, False or 0 none.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # non-reentrant checkpointing: the reentrant kind re-runs layers under no_grad, and a no-grad
    # forward through a bitsandbytes 4-bit layer on CPU corrupts its weights (see pi_lora.quant)
    ckpt = {"use_reentrant": False}
    layers = model.model.layers
    count = len(layers) if gradient_checkpointing is True else min(int(gradient_checkpointing), len(layers))
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, count > 0, ckpt)
    elif count:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    # transformers checkpoints every layer (or every k-th); its per-layer flag leaves the last ones
    # out, whose backward runs first, so what they keep is freed before any recompute
    for layer in layers[count:] if count else []:
        layer.gradient_checkpointing = False
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=trainable_module_names(model, lora.trainable) or None,
        ensure_weight_tying="embed" in lora.trainable and bool(model.config.tie_word_embeddings),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise PiLoraError(f"LoRA could not be applied: {first_line(e)}") from e


def trainable(net) -> dict[str, torch.Tensor]:
    """The weights training updates (LoRA factors, trained embed/norm copies), by name."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def build(recipe, config, on: torch.device, dtype: torch.dtype, settings, split: list[int] | None = None):
    """The model `pi-lora train` trains, and the benchmarks measure: the base with the rope setting
    in `config`, quantized as the recipe says, LoRA (and trained embed/norm) added, the memory
    settings (plan.Settings) applied (layers checkpointed, narrow 16-bit activations, tiled MLPs and
    attention blocks), trainable weights in fp32."""
    m = recipe.model
    try:
        base = load_base(m, config, on, split=split)
        net = add_lora(base, recipe.lora, settings.gradient_checkpointing)
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"out of memory loading the base {m.base} ({m.quant}); try model.quant nf4.") from None
    memory.narrow(net, dtype)
    kernels.apply(net, recipe.train.kernels, on)  # after peft and narrow, before the MLP tiling wraps mlp.forward
    if settings.mlp_tile:
        memory.tile_mlps(net, settings.mlp_tile)
    if settings.attention_tile:
        memory.tile_attention(net, settings.attention_tile)
    for x in trainable(net).values():  # AdamW updates of ~lr vanish in 16-bit weights; autocast handles compute
        x.data = x.data.float()
    return net
