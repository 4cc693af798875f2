"""`pi-lora export`: a run in forms other tools load.

peft: the adapter plus its rope setting and a loading snippet.
gguf: a merged model as one GGUF file with llama.cpp's LLaMA tensor layout and linear rope scaling.
The `gguf` package writes the file and names the tensors; what is ours is the Q/K permutation
llama.cpp expects and the metadata (the tokenizer's from pi_lora.vocab). Tensors are written one at
a time (two passes: the header needs every tensor's size first), so memory stays at one tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import model, rope, run, vocab
from .errors import PiLoraError, first_line
from .merge import NOT_ASKED, TOO_LARGE, Verification, run_inputs

FORMATS = ("peft", "gguf")
# --dtype, named as everywhere else in pi-lora, and the GGUF tensor type each is written as
DTYPES = {"fp16": "f16", "bf16": "bf16", "q8_0": "q8_0", "fp32": "f32"}

SNIPPET = '''```python
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained("{base}")
# The adapter was trained with Position Interpolation; without this the model breaks past {original_len} tokens.
config.rope_parameters = {rope_parameters}
config.max_position_embeddings = {target_len}
model = AutoModelForCausalLM.from_pretrained("{base}", config=config)
model = PeftModel.from_pretrained(model, "{folder}")
```
'''


def export_peft(run_dir: Path, output: Path, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """The adapter, its rope setting (pi_lora.json) and a README that shows how to load both; the
    adapter is checked whole before it is copied and after its config is rewritten."""
    meta = run.read_meta(run_dir)
    run.require_trust(meta, trust_remote_code, "export")
    adapter = run_dir / run.ADAPTER
    run.check_output(output, run.PEFT, overwrite, run_inputs(run_dir, meta))
    with run.reading(run_dir), run.writing(output):
        run.recover(adapter)  # no train writes the run meanwhile (this holds its read lock)
        if not (adapter / "adapter_config.json").is_file():
            raise PiLoraError(f"no adapter in '{run_dir}': the run has not finished (see its checkpoints/).")
        run.check_output(output, run.PEFT, overwrite)
        run.verify_adapter(adapter)
        return _export_peft(adapter, output, meta)


def _export_peft(adapter: Path, output: Path, meta: dict) -> Path:
    base = meta.get("base_path") or model.ALIASES.get(meta["base"], meta["base"])  # loadable as written
    with run.atomic_dir(output) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / run.META).write_text(json.dumps(meta, indent=2) + "\n")
        snippet = SNIPPET.format(base=base, folder=output, original_len=meta["original_len"],
                                 target_len=meta["target_len"], rope_parameters=meta["rope_parameters"])
        (tmp / "README.md").write_text(
            f"# LoRA adapter: {base} extended to {meta['target_len']} tokens\n\n"
            f"Trained by pi-lora with Position Interpolation (rope_type `{meta['rope_type']}`, factor "
            f"{meta['factor']:g}, rope_theta {meta['rope_theta']:g}; {meta['original_len']} -> "
            f"{meta['target_len']} tokens). The rope setting is not part of a PEFT adapter, so set it on "
            f"the base config before attaching the adapter:\n\n{snippet}"
        )
        run.verify_adapter(tmp)
    return output


def permute_qk(weight, n_head: int):
    """HF's rotate-half layout to the interleaved rotary layout llama.cpp uses (as its converter does)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_kind(shape, outtype: str):
    """The ggml type a tensor is stored as: norms stay f32, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % 32:
        return Q.F16  # q8_0 needs rows in blocks of 32
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def gguf_info(shape, outtype: str):
    """(numpy dtype, shape as stored, byte count, ggml type), known before any data is converted."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    kind = gguf_kind(shape, outtype)
    if kind in (Q.F32, Q.F16):
        dtype = np.float32 if kind == Q.F32 else np.float16
        return dtype, shape, int(np.prod(shape)) * np.dtype(dtype).itemsize, kind
    stored = quant_shape_to_byte_shape(shape, kind)  # the writer takes quantized shapes in bytes
    return np.uint8, stored, int(np.prod(stored)), kind


def gguf_tensor(name: str, tensor, config: dict, outtype: str):
    """One HF tensor as GGUF data: Q/K permuted, converted or quantized."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = tensor.float().numpy()
    if name.endswith("q_proj.weight"):
        data = permute_qk(data, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        data = permute_qk(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    kind = gguf_kind(data.shape, outtype)
    if kind in (Q.F32, Q.F16):
        return data.astype(np.float32 if kind == Q.F32 else np.float16)
    return quantize(data, kind)


def add_metadata(writer, config: dict, meta: dict, outtype: str) -> None:
    from gguf import LlamaFileType

    heads = config["num_attention_heads"]
    writer.add_name(f"{Path(meta['base']).name}-{meta['target_len']}")
    writer.add_context_length(meta["target_len"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    add_rope(writer, rope.from_meta(meta))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype])


def add_rope(writer, pi) -> None:
    """The rope keys llama.cpp reads for each scaling, as its converter writes them: linear and yarn
    as scaling types (yarn with its original length and the parameters that were set), ntk as plain
    RoPE with the raised base, llama3 as the per-frequency `rope_freqs` tensor (add_rope_freqs)."""
    from gguf import RopeScalingType

    params = pi.rope_parameters()
    writer.add_rope_freq_base(params["rope_theta"])
    if pi.rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(pi.factor)
        writer.add_rope_scaling_orig_ctx_len(pi.original_len)
    elif pi.rope_type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(pi.factor)
        writer.add_rope_scaling_orig_ctx_len(pi.original_len)
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(params[key])
    elif pi.rope_type not in ("ntk", "llama3", "none"):  # ntk and none: plain RoPE with their theta
        raise PiLoraError(f"GGUF export of rope_type '{pi.rope_type}' is not supported.")


def rope_freqs(config: dict, pi):
    """llama3 scaling as llama.cpp holds it: one divisor per rotary frequency (1 for high
    frequencies, the factor for low ones, smooth between), from transformers' own llama3 frequencies."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled = LlamaConfig(**{**config, "rope_parameters": pi.rope_parameters()})
    d = pi.rotary_dim
    base = 1.0 / pi.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)  # plain RoPE
    extended, _ = ROPE_INIT_FUNCTIONS["llama3"](scaled, None)
    return (base / extended).to(torch.float32).numpy()


def write_gguf(merged: Path, output: Path, meta: dict, outtype: str, progress=None, tokenizer_pre: str | None = None,
               reference: Path | None = None) -> None:
    from gguf import MODEL_ARCH, GGUFWriter, TensorNameMap
    from safetensors import safe_open

    from .merge import read_tensor

    config = json.loads((merged / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral"):
        raise PiLoraError(f"GGUF export supports the LLaMA layout, not model_type '{config.get('model_type')}'.")
    names = TensorNameMap(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    entries = []
    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise PiLoraError(f"no GGUF name for tensor '{key}'")
                entries.append((file, key, target, tuple(f.get_slice(key).get_shape())))
    writer = GGUFWriter(output, "llama")
    add_metadata(writer, config, meta, outtype)
    vocab.add_tokenizer(writer, merged, config["vocab_size"], tokenizer_pre, reference)
    pi = rope.from_meta(meta)
    freqs = rope_freqs(config, pi) if pi.rope_type == "llama3" else None
    if freqs is not None:
        from gguf import GGMLQuantizationType

        writer.add_tensor_info("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes,
                               raw_dtype=GGMLQuantizationType.F32)
    for _, _, target, shape in entries:  # the header, with every tensor's size, precedes the data
        dtype, stored, nbytes, kind = gguf_info(shape, outtype)
        writer.add_tensor_info(target, stored, dtype, nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    task = progress.add_task("writing gguf", total=len(entries), info="") if progress else None
    if freqs is not None:
        writer.write_tensor_data(freqs)
    for file, key, _, _ in entries:
        writer.write_tensor_data(gguf_tensor(key, read_tensor(file, key), config, outtype))
        if progress:
            progress.advance(task)
    writer.close()


def read_gguf(path: Path, pi=None):
    """A GGUF file back through transformers' own GGUF reader (the oracle), with its rope scaling.

    transformers' reader ignores LLaMA's rope.scaling keys, so they are read here and applied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.rope_parameters = gguf_rope(path, config, pi)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)


def gguf_rope(path: Path, config=None, pi=None) -> dict:
    """transformers' rope_parameters for what a GGUF file's rope keys say. A llama3 file holds its
    scaling as the rope_freqs tensor, which transformers cannot take: it is checked against `pi`'s
    (the run's) and that setting is returned."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        import numpy as np

        if pi is None or pi.rope_type != "llama3":
            raise PiLoraError(f"'{path}' holds llama3 rope frequencies; reading it back needs its run's setting.")
        want = rope_freqs(config.to_dict(), pi)
        if not np.allclose(np.asarray(freqs.data, dtype=np.float32), want, rtol=1e-6):
            raise PiLoraError(f"GGUF round trip failed: rope_freqs in '{path}' differ from the run's llama3 scaling.")
        return pi.rope_parameters()
    f = {name.removeprefix("llama."): field.contents() for name, field in reader.fields.items()
         if name.startswith("llama.rope")}
    params = {"rope_type": "default", "rope_theta": float(f["rope.freq_base"])}
    kind = f.get("rope.scaling.type")
    if kind in ("linear", "yarn"):
        params.update(rope_type=kind, factor=float(f["rope.scaling.factor"]))
    if kind == "yarn":
        params["original_max_position_embeddings"] = int(f["rope.scaling.original_context_length"])
        for key, name in (("attention_factor", "attn_factor"), ("beta_fast", "yarn_beta_fast"),
                          ("beta_slow", "yarn_beta_slow")):
            if f"rope.scaling.{name}" in f:
                params[key] = float(f[f"rope.scaling.{name}"])
    return params


@dataclass
class GgufCheck:
    """What the export verified of the GGUF read back through transformers (its tokenizer, its
    logits against the merged model), and the pre-tokenizer it names."""

    tokens: Verification
    logits: Verification
    pre: str | None
    llamacpp: str | None = None  # what llama.cpp itself measured (--llamacpp-check), see llamacpp.check_export


def base_reference(meta: dict) -> Path | None:
    """The base's own GGUF tokenizer, when the base was a .gguf file (the reference for llama.cpp)."""
    folder = Path(meta.get("base_path") or "")
    return vocab.reference_gguf(folder) if folder.is_dir() else None


def check_tokens(merged: Path, gguf_path: Path, pre: str | None) -> Verification:
    from transformers import AutoTokenizer

    error, known = vocab.tokenization_error(AutoTokenizer.from_pretrained(merged), gguf_path)
    if error:
        raise PiLoraError(f"GGUF tokenizer check failed: transformers reads the GGUF's tokenizer differently, {error}.")
    found = "identical" if known else "identical vocabulary and special tokens (this pre-tokenizer is llama.cpp's own)"
    return Verification("checked", f"transformers reads the GGUF's tokenizer (pre-tokenizer '{pre}') with {found} "
                                   "tokenization of a check text")


# what a GGUF of each type may differ from its merged model by (the type's rounding, not slack for bugs)
GGUF_TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}


def check_logits(merged: Path, gguf_path: Path, meta: dict, outtype: str) -> Verification:
    import torch
    from transformers import AutoModelForCausalLM

    from .merge import fits_twice, logits_error

    if not fits_twice(merged):
        return Verification.skipped(TOO_LARGE)
    err = logits_error(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(),
                       read_gguf(gguf_path, rope.from_meta(meta)).eval(), meta)
    limit = GGUF_TOLERANCE[outtype]
    if not err <= limit:  # NaN compares false with everything: a NaN model fails here
        raise PiLoraError(f"GGUF round trip failed: logits differ by {err:.2e} (relative), limit {limit}.")
    return Verification("checked", "transformers reads the GGUF back with the merged model's logits", err)


def export_gguf(run_dir: Path, output: Path, dtype: str = "fp16", overwrite: bool = False, check: bool = True,
                progress=None, tokenizer_pre: str | None = None, trust_remote_code: bool = False,
                llamacpp_check: bool = False) -> GgufCheck:
    """Merge (streamed, into a temporary folder), write the GGUF, and check its tokenizer and logits
    round trip. Reads the run while no `train --resume` changes it, and is the one writer of `output`."""
    if dtype not in DTYPES:
        raise PiLoraError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    meta = run.read_meta(run_dir)
    run.require_trust(meta, trust_remote_code, "export")
    if llamacpp_check:
        from . import llamacpp

        llamacpp.bin_dir()  # no llama.cpp: said before the merge
    run.check_output(output, "gguf", overwrite, run_inputs(run_dir, meta))
    with run.reading(run_dir), run.writing(output):
        run.check_output(output, "gguf", overwrite)  # again, now that no other writer can change it
        with run.scratch(output) as scratch:
            return _export_gguf(run_dir, output, scratch, meta, DTYPES[dtype], check, progress, tokenizer_pre,
                                trust_remote_code, llamacpp_check)


def _export_gguf(run_dir, output, scratch, meta, outtype, check, progress, tokenizer_pre, trust_remote_code,
                 llamacpp_check=False):
    from .merge import merge

    merged = Path(scratch) / "merged"
    merge(run_dir, merged, check=False, progress=progress, trust_remote_code=trust_remote_code)
    tmp = run.temp_file(output, ".gguf")  # readers go by the suffix; unique per process
    try:
        with run.disk_full_named(output):
            write_gguf(merged, tmp, meta, outtype, progress, tokenizer_pre, base_reference(meta))
        fields = gguf_fields(tmp)
        pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
        if check:
            result = GgufCheck(check_tokens(merged, tmp, pre), check_logits(merged, tmp, meta, outtype), pre)
        else:
            result = GgufCheck(Verification.skipped(NOT_ASKED), Verification.skipped(NOT_ASKED), pre)
        if llamacpp_check:  # a failure raises here: the file is removed below, an earlier output stays
            from . import llamacpp

            result.llamacpp = llamacpp.check_export(merged, tmp, meta, outtype, progress=progress)
        run.put_file(tmp, output)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def gguf_fields(path: Path) -> dict:
    """A GGUF file's key-value fields; a damaged file is a readable error naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path).fields
    except Exception as e:  # the reader fails on a truncated or garbage file with any error type
        raise PiLoraError(f"cannot read GGUF '{path}': {first_line(e)}") from None
