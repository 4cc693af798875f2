"""`pi-lora plan`: where one training step's memory goes, predicted before any weight is loaded.

The model counts bytes per component from the base config and the recipe; the constants below are
derived from what each op keeps for backward (see docs/design.md, "Memory model") and checked
against measured peaks by bench/memory.py. What peft and transformers do that matters here:
prepare_model_for_kbit_training casts every non-4-bit weight (embeddings, LM head, norms) to fp32,
which memory.narrow undoes for the frozen embeddings and head and for the residual stream (so the
checkpointed layer inputs are in the compute dtype); autocast makes a compute-dtype copy of each
activation a LoRA or 4-bit matmul reads.

The peak of a step is the weights and optimizer state, plus every checkpointed layer input, plus
what the layers left un-checkpointed keep for backward, plus the larger of two phases that never
overlap: the LM head and loss, and one layer's recompute and backward.

Settings left `auto` are resolved to the fastest that fit (`fit`), by a cost model in matmul FLOPs
(`cost`): a layer's forward is 2·T·(its linear weights) + 2·T²·(q width) for the causal attention
core, its backward two forwards; each checkpointed layer adds one forward (its recompute); a tiled
MLP adds one MLP forward per layer and a tiled attention block one forward of the q/k/v/o
projections per layer (their tiles are recomputed); an offload adds its bytes crossing the host link
twice, at FLOPS_PER_BYTE. For every combination of tiles and offload, the fewest checkpointed layers
that fit (the first ones are checkpointed; the last ones, whose backward runs first, keep their
activations), then the cheapest combination. With memory to spare that is no checkpointing, no
tiling and no offload; an offload always comes with every layer checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import PiLoraError

GiB = 2**30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Bytes per weight of a quantized linear: 4-bit codes plus block scales (64 weights per block;
# double quantization stores those scales in 8 bits with one fp32 per 256 blocks).
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
QUANT_BYTES_SINGLE = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0}
ADAM = 4 + 4 + 8  # fp32 weight, its gradient, two moments
# Per token, per logit, for the LM head + cross-entropy: fp32 logits, log-softmax output, and in
# backward its incoming and outgoing gradients (a 16-bit head output is freed before the peak:
# measured 10.8 bytes a logit in bf16, bench/memory.py).
LOGIT_BYTES = 12
# One layer's recompute + backward, per token, in three parts (bench/memory.py measures each
# technique's slope on two shapes; docs/benchmarks.md): what the attention block saves for its
# backward, live through the whole backward of the layer; then two phases that follow each other,
# the MLP's backward and the attention block's, whose transient tensors never coexist.
# Saved by the attention block: the two RMSNorms' fp32 internals (ATTN_SAVED_FP32_H hidden-size
# vectors in fp32), ATTN_SAVED_DT_H hidden-size vectors in the compute dtype (q, the attention
# output and its copy, the normed residual the MLP reads) and ATTN_SAVED_KV copies of k and v
# (grouped KV heads make these smaller). The attention block's backward: ATTN_GRAD_KV more copies of
# k and v (their gradients). The MLP's phase: LAYER_M_BYTES per MLP unit (gate, up, silu(gate), their
# product and the gradients, in the compute dtype; 2 bytes each for bf16, 4 for fp32). Counted from
# what each op saves, then fitted to the LLaMA-7B and Llama-3-8B slopes in bf16 and fp32.
ATTN_SAVED_FP32_H, ATTN_SAVED_DT_H, ATTN_SAVED_KV, ATTN_GRAD_KV = 4.2, 3.3, 1.65, 2.35
LAYER_M_BYTES = {4: 16.8, 2: 8.4}  # bytes per MLP unit per token, by compute dtype
# With the attention block tiled (memory.tile_attention), what it saves over the whole sequence, in
# the compute dtype: q, k and v (ATTN_WHOLE_QKV copies: SDPA's inputs) and ATTN_WHOLE_H hidden-size
# vectors (the attention output and its contiguous copy, the normed residual, the o-projection
# input the tiles read); its backward then holds one tile's untiled working set at a time. Fitted to
# the rows with both tiles on (LLaMA-7B and Llama-3-8B, whose q/k/v widths differ).
ATTN_WHOLE_H, ATTN_WHOLE_QKV = 4.5, 1.23
# Without checkpointing, the part of a layer's working set its forward keeps for backward (fitted to
# the un-checkpointed rows of bench/memory.py, one layer or both unchecked: 0.69-0.75).
SAVED_FRACTION = 0.7
# bitsandbytes dequantizes a 4-bit weight for each matmul: the largest one, forward and backward.
DEQUANT_COPIES = 1
# CPU only: what the libraries allocate beside the tensors (measured alone: 0.09 GiB; 0.13 fits the
# rows of bench/memory.py). On a GPU the CUDA context and allocator slack, which are not in
# max_memory_allocated, take its place.
CPU_RUNTIME = 0.13 * GiB
# GPU only: the CUDA context and allocator slack are not in max_memory_allocated.
CUDA_RESERVE = 0.8 * GiB
CUDA_SLACK = 0.05


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shape:
        needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
        missing = [k for k in needed if getattr(config, k, None) is None]
        if missing:
            raise PiLoraError(f"cannot plan memory: the config has no {', '.join(missing)} (not a LLaMA layout).")
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size, layers=config.num_hidden_layers, intermediate=config.intermediate_size,
            vocab=config.vocab_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linear(self, name: str) -> tuple[int, int]:
        """(in, out) features of one layer's linear."""
        h, m, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}[name]


@dataclass(frozen=True)
class Settings:
    """The recipe values that move memory (one name each, as in the recipe)."""

    train_len: int  # each trained sequence: rope.train_len (short windows), or rope.target_len
    batch_size: int = 1
    quant: str = "nf4"
    double_quant: bool = True
    compute_bytes: int = 2  # 2: bf16, 4: fp32
    rank: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    trainable: tuple[str, ...] = ()
    gradient_checkpointing: bool | int = True  # True: every layer; N: the first N (0, False: none)
    loss_chunk: int = 4096
    mlp_tile: int = 0
    attention_tile: int = 0
    offload_activations: bool = False
    gpus: int = 1
    shards: int = 1  # processes sharing the model (model.shard under torchrun)
    replicas: int = 1  # processes each holding the whole model (data parallel under torchrun)

    @classmethod
    def of(cls, recipe, compute_bytes: int, processes: int = 1) -> Settings:
        t, lora = recipe.train, recipe.lora
        targets = LINEARS if lora.target_modules == "all-linear" else tuple(lora.target_modules)
        return cls(
            train_len=recipe.rope.train_len or recipe.rope.target_len, batch_size=t.batch_size, quant=recipe.model.quant,
            double_quant=recipe.model.double_quant, compute_bytes=compute_bytes, rank=lora.rank,
            target_modules=targets, trainable=tuple(lora.trainable),
            gradient_checkpointing=True if t.gradient_checkpointing == "auto" else t.gradient_checkpointing,
            loss_chunk=t.loss_chunk, mlp_tile=t.mlp_tile if isinstance(t.mlp_tile, int) else 0,
            attention_tile=t.attention_tile if isinstance(t.attention_tile, int) else 0,
            offload_activations=t.offload_activations is True, gpus=recipe.model.gpus,
            shards=processes if recipe.model.shard else 1, replicas=1 if recipe.model.shard else processes,
        )


def weights(shape: Shape, s: Settings) -> dict[str, float]:
    per_layer = sum(i * o for i, o in map(shape.linear, LINEARS))
    per_weight = (QUANT_BYTES if s.double_quant else QUANT_BYTES_SINGLE).get(s.quant, s.compute_bytes)
    embed = shape.vocab * shape.hidden
    # frozen embeddings and head in the compute dtype (memory.narrow); norms fp32 after k-bit preparation
    heads = embed * (1 if shape.tied else 2)
    norms = (2 * shape.layers + 1) * shape.hidden
    return {
        "base weights (linears)": shape.layers * per_layer * per_weight,
        "base weights (embeddings, head, norms)": heads * s.compute_bytes + norms * 4,
    }


def lora_params(shape: Shape, s: Settings) -> int:
    return shape.layers * sum(s.rank * sum(shape.linear(n)) for n in s.target_modules if n in LINEARS)


def checkpointed(shape: Shape, s: Settings) -> int:
    """How many decoder layers are checkpointed (the first ones)."""
    if s.gradient_checkpointing is True:
        return shape.layers
    return min(int(s.gradient_checkpointing), shape.layers)


def checkpoint_bytes(shape: Shape, s: Settings) -> float:
    """Every layer's input, kept for its recompute: the residual stream in the compute dtype (memory.narrow)."""
    return float(s.batch_size * s.train_len * shape.hidden * s.compute_bytes * shape.layers)


def dequant_bytes(shape: Shape, s: Settings) -> float:
    """The one dequantized 4-bit weight a layer's matmuls hold (the largest, an MLP weight)."""
    return DEQUANT_COPIES * shape.hidden * shape.intermediate * s.compute_bytes if s.quant != "none" else 0


def kept_per_layer(shape: Shape, s: Settings) -> float:
    """What an un-checkpointed layer keeps for its backward: part of its working set, less the weight."""
    return (layer_bytes(shape, s) - dequant_bytes(shape, s)) * SAVED_FRACTION


def attention_bytes(shape: Shape, s: Settings, positions: int) -> tuple[float, float]:
    """What the untiled attention block over `positions` saves for its backward, and what its
    backward adds."""
    h, kv, c = shape.hidden, shape.kv_heads * shape.head_dim, s.compute_bytes
    saved = positions * (h * (4 * ATTN_SAVED_FP32_H + c * ATTN_SAVED_DT_H) + c * ATTN_SAVED_KV * 2 * kv)
    return saved, positions * c * ATTN_GRAD_KV * 2 * kv


def layer_bytes(shape: Shape, s: Settings) -> float:
    """One layer's recompute + backward working set: what the attention block saves, plus the larger
    of the MLP's backward and the attention block's (one follows the other), plus the dequantized weight."""
    T, h, m, c = s.batch_size * s.train_len, shape.hidden, shape.intermediate, s.compute_bytes
    mlp = (min(s.mlp_tile, T) if s.mlp_tile else T) * m * LAYER_M_BYTES.get(c, 16.8)
    if s.attention_tile and s.attention_tile < T:
        # q, k, v and ATTN_WHOLE_H more vectors of the whole sequence; then one tile's recompute and
        # backward at a time
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        saved = T * c * (ATTN_WHOLE_H * h + ATTN_WHOLE_QKV * (q + 2 * kv))
        grad = sum(attention_bytes(shape, s, s.attention_tile))
    else:
        saved, grad = attention_bytes(shape, s, T)
    return saved + max(mlp, grad) + dequant_bytes(shape, s)


def activations(shape: Shape, s: Settings) -> dict[str, float]:
    """Bytes of the step's activations: checkpoints (all live at once) and the two exclusive phases.

    A layer that is not checkpointed keeps what its forward saved (measured: SAVED_FRACTION of its
    working set) until its backward; the last layers are the ones left unchecked, so the first of
    their backwards runs with the others' kept activations, and the LM head runs with all of them.
    """
    T, h, c = s.batch_size * s.train_len, shape.hidden, s.compute_bytes
    layer = layer_bytes(shape, s)
    unchecked = shape.layers - checkpointed(shape, s)
    saved = kept_per_layer(shape, s)
    chunk = min(s.loss_chunk, T) if s.loss_chunk else T
    # + the final norm's fp32 internals, its output and that output's gradient
    head = chunk * shape.vocab * LOGIT_BYTES + T * h * (8 + 2 * c)
    parts = {"checkpointed layer inputs": 0.0 if s.offload_activations else checkpoint_bytes(shape, s)}
    if unchecked > 1:
        parts[f"kept by {unchecked - 1} more un-checkpointed layers"] = 0.0 if s.offload_activations else saved * (unchecked - 1)
    if s.offload_activations:  # the input of the layer being recomputed is back on the device
        layer += checkpoint_bytes(shape, s) / shape.layers
    return parts | {
        "one layer's recompute + backward": float(layer),
        # with the last layer unchecked, what it keeps is live while the head runs
        "LM head + loss": float(head + (saved if unchecked and not s.offload_activations else 0)),
    }


def kept_bytes(parts: dict) -> float:
    return sum(v for k, v in parts.items() if k.startswith("kept by "))


@dataclass
class Estimate:
    shape: Shape
    settings: Settings
    parts: dict[str, float]
    peak: float  # what torch.cuda.max_memory_allocated would report on the busiest device
    offloaded: float  # host memory the offload needs
    cuda: bool
    loading: float = 0.0  # sharded: each process loads the whole base before sharding it

    @property
    def needs(self) -> float:
        """Device memory to reserve: the peak, plus the CUDA context and allocator slack on a GPU."""
        return self.peak * (1 + CUDA_SLACK) + CUDA_RESERVE if self.cuda else self.peak


def estimate(shape: Shape, s: Settings, cuda: bool = True) -> Estimate:
    w = weights(shape, s)
    lora = lora_params(shape, s) * ADAM
    t = {"LoRA weights, gradients, AdamW": float(lora)}
    extra = (shape.vocab * shape.hidden if "embed" in s.trainable else 0) + (
        (2 * shape.layers + 1) * shape.hidden if "norm" in s.trainable else 0)
    if extra:
        t["trained embed/norm copies, gradients, AdamW"] = float(extra * ADAM)
    if s.replicas > 1:  # DDP's gradients become views into its buckets only at the end of the first backward
        t["DDP first step: gradients beside their buckets"] = float((lora_params(shape, s) + extra) * 4)
    loading = 0.0
    if s.shards > 1:  # FSDP2: 1/shards of each at rest; gathered whole while in use
        loading = sum(w.values()) + shape.vocab * shape.hidden * 4 * (1 if shape.tied else 2)  # + k-bit fp32 upcast
        w = {k: v / s.shards for k, v in w.items()} | {"gathered by FSDP (2 layers, embeddings, head)": gathered(shape, s, w)}
        t = {k: v / s.shards for k, v in t.items()}
    if not cuda:
        w["library buffers (CPU)"] = CPU_RUNTIME
    a = activations(shape, s)
    parts = {**w, **t, **a}
    static = sum(w.values()) + sum(t.values()) + a["checkpointed layer inputs"] + kept_bytes(a)
    peak = static + max(a["one layer's recompute + backward"], a["LM head + loss"])
    if s.gpus > 1:
        peak = max(loads(shape, s, parts, split(shape, s, parts)))
    offloaded = offloaded_bytes(shape, s) if s.offload_activations else 0.0
    return Estimate(shape, s, parts, max(peak, loading), float(offloaded), cuda, loading)


def offloaded_bytes(shape: Shape, s: Settings) -> float:
    """What the offload moves to host memory: the checkpointed layer inputs, and everything the
    layers that are not checkpointed save for backward."""
    unchecked = shape.layers - checkpointed(shape, s)
    return checkpoint_bytes(shape, s) + kept_per_layer(shape, s) * unchecked


def gathered(shape: Shape, s: Settings, whole: dict[str, float]) -> float:
    """What FSDP2 holds whole at once: the layer computing and the next (prefetched), and the decoder's
    and the head's own parameters, which, as roots, stay whole from their forward through their
    backward: embeddings and head in the compute dtype, and a trained embeddings copy with its fp32
    gradient."""
    embed = shape.vocab * shape.hidden
    trained = 2 * embed * 4 if "embed" in s.trainable else 0
    return 2 * whole["base weights (linears)"] / shape.layers + embed * s.compute_bytes * 2 + trained


def _devices(shape: Shape, s: Settings, parts: dict) -> tuple[float, list[float], list[float]]:
    """Bytes per layer (weights, LoRA state, checkpoint), and per device what it holds besides layers
    and its busiest phase. The first device holds the embeddings (and a trained copy); the last the
    final norm, the head and the loss, unless the head is tied to the embeddings and lives with them."""
    n, N = shape.layers, s.gpus
    per_layer = (parts["base weights (linears)"] + parts["LoRA weights, gradients, AdamW"]
                 + parts["checkpointed layer inputs"] + kept_bytes(parts)) / n
    embed = shape.vocab * shape.hidden * s.compute_bytes
    trained = parts.get("trained embed/norm copies, gradients, AdamW", 0.0)
    layer, head = parts["one layer's recompute + backward"], parts["LM head + loss"]
    fixed, phase = [0.0] * N, [layer] * N
    fixed[0] += embed + trained
    at = 0 if shape.tied else N - 1
    fixed[at] += 0 if shape.tied else embed
    phase[at] = max(layer, head)
    return per_layer, fixed, phase


def split(shape: Shape, s: Settings, parts: dict) -> list[int]:
    """Layers per device, in order, so that the busiest device holds as little as possible."""
    per_layer, fixed, phase = _devices(shape, s, parts)
    base = [f + p for f, p in zip(fixed, phase)]
    low, high = max(base), max(base) + per_layer * shape.layers
    for _ in range(60):  # bisect the busiest device's load
        mid = (low + high) / 2
        room = sum(max(0, int((mid - b) // per_layer)) for b in base)
        low, high = (low, mid) if room >= shape.layers else (mid, high)
    counts, left = [], shape.layers
    for b in base:
        take = min(left, max(0, int((high - b) // per_layer)))
        counts.append(take)
        left -= take
    counts[-1] += left
    return counts


def loads(shape: Shape, s: Settings, parts: dict, counts: list[int]) -> list[float]:
    per_layer, fixed, phase = _devices(shape, s, parts)
    return [f + k * per_layer + p for f, k, p in zip(fixed, counts, phase)]


TILES = (0, 4096, 2048, 1024)  # candidate tiles for an `auto` mlp_tile/attention_tile, in order of preference
AUTO = ("gradient_checkpointing", "mlp_tile", "attention_tile", "offload_activations")
# A step's cost in matmul FLOPs; an offloaded byte costs what the device computes while it crosses
# the host link twice (out and back): ~400 TFLOP/s of 16-bit matmuls over ~25 GB/s.
FLOPS_PER_BYTE = 16_000
# The cost counts matmul FLOPs, not the launches and copies each tile adds: more tiling or an
# offload must be this much cheaper by that count to be picked over a simpler setting.
MARGIN = 0.01


def cost(shape: Shape, s: Settings) -> float:
    """Relative time of a step, to order settings that fit: every layer's forward and backward
    (~2 forwards), one more forward per checkpointed layer, one more MLP forward per layer when the
    MLP is tiled (its tiles are recomputed), one more forward of the projections per layer when the
    attention block is tiled, and the host transfers of an offload. The LM head and loss are the
    same under every setting and left out."""
    T, h, m, n = s.batch_size * s.train_len, shape.hidden, shape.intermediate, shape.layers
    q = shape.heads * shape.head_dim
    mlp = 2 * T * 3 * h * m
    projections = 2 * T * sum(i * o for i, o in map(shape.linear, ("q_proj", "k_proj", "v_proj", "o_proj")))
    forward = mlp + projections + 2 * T * T * q  # + the causal attention core (QK^T and PV, half the square)
    total = (3 * n + checkpointed(shape, s)) * forward
    total += n * mlp if s.mlp_tile and s.mlp_tile < T else 0
    total += n * projections if s.attention_tile and s.attention_tile < T else 0
    return total + (2 * offloaded_bytes(shape, s) * FLOPS_PER_BYTE if s.offload_activations else 0)


def candidates(s: Settings, cuda: bool, auto: set[str]) -> list[dict]:
    """The combinations of tiles and offload to try, in order of preference (checkpointing apart)."""
    options = [[(k, v) for v in ((False, True) if k == "offload_activations" else TILES)] if k in auto else []
               for k in ("mlp_tile", "attention_tile", "offload_activations")]
    if not cuda and options[2]:
        options[2] = [("offload_activations", False)]  # on a CPU the activations are in host memory already
    combos = [{}]
    for choices in options:
        combos = [c | dict([choice]) for c in combos for choice in choices] if choices else combos
    return combos


def fit(shape: Shape, s: Settings, budget: float, cuda: bool, auto: set[str]) -> tuple[Estimate, dict]:
    """The fastest settings (by `cost`) that fit `budget`, changing only the settings in `auto`.

    For each combination of tiles and offload, the fewest checkpointed layers that fit (when
    gradient_checkpointing is auto; memory falls as layers are checkpointed, time rises). A
    combination later in the order of preference replaces an earlier one only if it is MARGIN
    cheaper. Returns the estimate and the settings changed; when nothing fits, the smallest estimate.
    """
    best, smallest = None, None
    for combo in candidates(s, cuda, auto):
        trial = replace(s, **combo)
        if "gradient_checkpointing" in auto and trial.offload_activations:
            # offloaded, an unchecked layer would send all it saves to the host and back: more
            # transfer than its recompute costs, and host memory without bound
            combo = combo | {"gradient_checkpointing": shape.layers}
            e = estimate(shape, replace(trial, gradient_checkpointing=True), cuda)
        elif "gradient_checkpointing" in auto:
            e = fewest_checkpointed(shape, trial, budget, cuda)
            combo = combo | {"gradient_checkpointing": checkpointed(shape, e.settings)}
        else:
            e = estimate(shape, trial, cuda)
        if smallest is None or e.needs < smallest[0].needs:
            smallest = (e, combo)
        faster = best is None or cost(shape, e.settings) < cost(shape, best[0].settings) * (1 - MARGIN)
        if e.needs <= budget and faster:
            best = (e, combo)
    e, combo = best or smallest
    before = resolved(shape, s)
    return e, {k: v for k, v in combo.items() if v != before[k]}


def fewest_checkpointed(shape: Shape, s: Settings, budget: float, cuda: bool) -> Estimate:
    """The estimate with the fewest checkpointed layers that fits (all of them when none fits)."""
    low, high = 0, shape.layers  # memory falls with every layer checkpointed: bisect
    every = estimate(shape, replace(s, gradient_checkpointing=high), cuda)
    if every.needs > budget:
        return every
    while low < high:
        mid = (low + high) // 2
        if estimate(shape, replace(s, gradient_checkpointing=mid), cuda).needs <= budget:
            high = mid
        else:
            low = mid + 1
    return estimate(shape, replace(s, gradient_checkpointing=low), cuda)


def max_length(shape: Shape, s: Settings, budget: float, cuda: bool, auto: set[str], step: int = 1024) -> int:
    """The longest train_len (a multiple of `step`) whose best settings fit `budget`; 0 if none."""
    low, high = 0, step
    while fit(shape, replace(s, train_len=high), budget, cuda, auto)[0].needs <= budget and high < 2**24:
        low, high = high, high * 2
    while high - low > step:
        mid = (low + high) // 2 // step * step
        if fit(shape, replace(s, train_len=mid), budget, cuda, auto)[0].needs <= budget:
            low = mid
        else:
            high = mid
    return low


def parse_size(text: str) -> float:
    """'24GiB', '24G', '512MiB' (binary units) or '24GB', '80 GB' (decimal, 10^9) -> bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise PiLoraError(f"memory size '{text}' is not like 24GiB, 24GB (10^9 bytes) or 512MiB.")
    power = " KMGT".index(match.group(2).upper() or " ")
    decimal = match.group(2) and (match.group(3) or "").upper() == "B"
    return float(match.group(1)) * (1000 if decimal else 1024) ** power


def device_memory(cuda: bool) -> float:
    """What one device has: a GPU's total memory, or the RAM available now on a CPU."""
    if cuda:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return float(psutil.virtual_memory().available)


def auto_keys(train) -> set[str]:
    return {k for k in AUTO if getattr(train, k) == "auto"}


@dataclass
class Decision:
    """The plan for a recipe: the estimate with the chosen settings, and whether it fits."""

    estimate: Estimate
    chosen: dict  # auto settings resolved: every key in auto_keys, with the value picked
    budget: float
    fits: bool

    @property
    def split(self) -> list[int]:
        """Decoder layers per GPU when the model is split across several."""
        e = self.estimate
        return split(e.shape, e.settings, e.parts) if e.settings.gpus > 1 else [e.shape.layers]


def decide(shape: Shape, recipe, compute_bytes: int, cuda: bool, budget: float | None = None,
           processes: int = 1) -> Decision:
    t = recipe.train
    if t.offload_activations is True and not t.loss_chunk:
        raise PiLoraError("train.offload_activations needs train.loss_chunk > 0 (the chunked loss runs the offload).")
    budget = budget or (parse_size(t.gpu_mem) if t.gpu_mem else device_memory(cuda))
    if type(t.gradient_checkpointing) is int and t.gradient_checkpointing > shape.layers:
        raise PiLoraError(f"train.gradient_checkpointing is {t.gradient_checkpointing} layers; the model has "
                          f"{shape.layers}. Give at most {shape.layers}, true (all), false or auto.")
    auto = auto_keys(t)
    if not t.loss_chunk:
        auto.discard("offload_activations")
    s = Settings.of(recipe, compute_bytes, processes)
    e, changes = fit(shape, s, budget, cuda, auto)
    chosen = resolved(e.shape, e.settings)
    return Decision(e, {k: chosen[k] for k in AUTO if k in auto}, budget, e.needs <= budget)


def resolved(shape: Shape, s: Settings) -> dict:
    """The settings `auto` can stand for, as a run computes with them (recorded beside the recipe)."""
    return {"gradient_checkpointing": checkpointed(shape, s), "mlp_tile": s.mlp_tile,
            "attention_tile": s.attention_tile, "offload_activations": s.offload_activations}


def spell(shape: Shape, values: dict) -> str:
    """Settings as a recipe spells them, for printing: a checkpointed-layer count is `true` when it
    is every layer, `false` when none, and otherwise says of how many."""
    def one(key, v):
        if key == "gradient_checkpointing" and not isinstance(v, bool):
            return "true" if v >= shape.layers else "false" if v == 0 else f"{v} (of {shape.layers} layers)"
        return str(v).lower() if isinstance(v, bool) else v
    return ", ".join(f"{k} {one(k, v)}" for k, v in values.items())


def refusal(d: Decision, shape: Shape, auto: set[str]) -> str:
    """Why a run cannot fit, and what would make it fit."""
    e, s = d.estimate, d.estimate.settings
    if e.loading and e.loading * (1 + CUDA_SLACK) + CUDA_RESERVE > d.budget:
        return (f"each process loads the whole 4-bit base ({e.loading / GiB:.1f} GiB) before sharding it, and a "
                f"device has {d.budget / GiB:.1f} GiB. Options: GPUs with more memory; model.gpus to split the "
                "layers across the GPUs of one process instead. See: pi-lora plan.")
    biggest = sorted(e.parts.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {v / GiB:.1f} GiB" for name, v in biggest)
    longest = max_length(shape, s, d.budget, e.cuda, auto | set(AUTO))
    hints = [f"sequences of {longest:,} tokens fit (rope.target_len, or rope.train_len for short windows)"
             if longest else "no length fits"]
    if s.batch_size > 1:
        hints.append("train.batch_size 1 (raise train.grad_accum to keep the batch)")
    if e.cuda:
        hints.append("more GPUs (pi-lora plan --gpus 2, or --shard --processes 2 under torchrun)")
    if not auto >= set(AUTO):
        hints.append(", ".join(f"train.{k}" for k in AUTO if k not in auto) + " auto")
    return (f"this run needs {e.needs / GiB:.1f} GiB per device and has {d.budget / GiB:.1f} GiB "
            f"(largest parts: {parts}). Options: {'; '.join(hints)}. See: pi-lora plan.")


def table(d: Decision, title: str):
    from rich.table import Table

    e = d.estimate
    grid = Table(title=title, show_footer=False)
    grid.add_column("component")
    grid.add_column("GiB", justify="right")
    for name, value in e.parts.items():
        grid.add_row(name, f"{value / GiB:.2f}")
    layer, head = e.parts["one layer's recompute + backward"], e.parts["LM head + loss"]
    if e.settings.gpus == 1:
        grid.add_row("[dim]minus the smaller of the last two (they never run at once)[/]",
                     f"[dim]-{min(layer, head) / GiB:.2f}[/]")
    if e.cuda:  # on a CPU the peak is what it needs
        busiest = f" on the busiest of {e.settings.gpus} GPUs" if e.settings.gpus > 1 else ""
        grid.add_row(f"peak of the tensors{busiest} (what torch reports as allocated)", f"{e.peak / GiB:.2f}")
        grid.add_row("CUDA context and allocator slack", f"{(e.needs - e.peak) / GiB:.2f}")
    grid.add_row("[bold]needs per device[/]", f"[bold]{e.needs / GiB:.2f}[/]")
    if e.offloaded:
        grid.add_row("[dim]host memory for offloaded activations[/]", f"[dim]{e.offloaded / GiB:.2f}[/]")
    if e.loading:
        grid.add_row("[dim]whole base while loading, before sharding (a peak if larger)[/]", f"[dim]{e.loading / GiB:.2f}[/]")
    return grid
