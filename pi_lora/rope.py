"""Rope scaling arithmetic on a transformers config: Position Interpolation and its relatives.

PI maps position p to p * L / L' (Chen et al. 2023), which is transformers' own "linear" rope type
with factor s = L' / L. The others are transformers' own rope types too, so nothing is patched:
- yarn (Peng et al. 2023): interpolates low frequencies, keeps high ones, scales attention;
- ntk (NTK-aware): no interpolation, a larger base, theta * s^(d / (d - 2)) for rotary dim d;
- dynamic (dynamic NTK): the ntk base recomputed from the current sequence length, at inference only;
- none: plain RoPE, positions as they are (training only: the control that fine-tunes as long
  without any scaling, or continues training at the base's own length).
A base that is already scaled is extended in its own kind: linear and yarn raise the factor against
the true original length, a llama3 base (Llama-3.1/3.2) raises its factor by L'/L keeping its
frequency bands. Nothing here touches weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import PiLoraError

SCALINGS = ("linear", "yarn", "ntk", "dynamic")
# what is trained must be what runs: dynamic changes the frequencies with the sequence length
TRAINABLE = ("yarn", "linear", "ntk", "none")
_PLAIN = {"default", None}
# what each kind is called in a model card
METHODS = {"linear": "Position Interpolation", "yarn": "YaRN", "ntk": "NTK-aware scaling",
           "llama3": "llama3 scaling with a raised factor", "dynamic": "dynamic NTK scaling"}
# the base's own keys that an extension keeps
_KEPT = {"llama3": ("low_freq_factor", "high_freq_factor"),
         "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")}


@dataclass(frozen=True)
class Interpolation:
    original_len: int  # L0: the length the weights were pretrained at
    target_len: int  # L'
    factor: float  # s = L' / L0, exact (a llama3 base: its factor raised by L' / L)
    rope_type: str  # linear | yarn | ntk | dynamic | none | llama3 (a llama3 base's own kind)
    rope_theta: float  # the base's theta (ntk raises it in rope_parameters)
    base_len: int = 0  # L: the length the base handles now (L0 unless the base is already scaled)
    rotary_dim: int = 0  # d, for ntk's theta
    extra: dict = field(default_factory=dict)  # kept or given keys: yarn betas, llama3 bands

    def rope_parameters(self) -> dict:
        """The config's `rope_parameters` (transformers 5); `rope_theta` must stay in it."""
        if self.rope_type == "ntk":
            return {"rope_type": "default", "rope_theta": self.ntk_theta()}
        if self.rope_type == "none":
            return {"rope_type": "default", "rope_theta": self.rope_theta}
        params = {"rope_type": self.rope_type, "factor": self.factor, "rope_theta": self.rope_theta}
        if self.rope_type in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = self.original_len
        return {**params, **self.extra}

    def ntk_theta(self) -> float:
        d = self.rotary_dim
        return self.rope_theta * self.factor ** (d / (d - 2))

    def max_position_embeddings(self) -> int:
        """What config.max_position_embeddings must say: dynamic NTK reads it as the trained length."""
        if self.rope_type == "none":  # continued training at (or under) the base's own length claims no less
            return max(self.target_len, self.base_len)
        return self.original_len if self.rope_type == "dynamic" else self.target_len

    def rope_scaling(self) -> dict | None:
        """The legacy (transformers 4, llama.cpp converters) form of the same setting; None for ntk,
        which is plain RoPE with another theta."""
        params = self.rope_parameters()
        if params["rope_type"] == "default":
            return None
        return {"type": self.rope_type, **{k: v for k, v in params.items() if k != "rope_theta"}}

    def as_dict(self) -> dict:
        return asdict(self)


def from_meta(meta: dict) -> Interpolation:
    """The setting a run recorded in pi_lora.json (older runs: linear, no extra keys)."""
    return Interpolation(meta["original_len"], meta["target_len"], meta["factor"], meta["rope_type"],
                         meta["rope_theta"], meta.get("base_len") or meta["original_len"],
                         meta.get("rotary_dim", 0), dict(meta.get("extra") or {}))


def rope_parameters_of(config) -> dict:
    """The base's rope settings, or an error naming the architecture when it has none."""
    params = getattr(config, "rope_parameters", None)
    if not params or "rope_theta" not in params:
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        kind = "ALiBi" if getattr(config, "alibi", False) or "bloom" in config.model_type else "absolute"
        raise PiLoraError(
            f"{arch} (model_type '{config.model_type}') does not use rotary position embeddings "
            f"(it uses {kind} positions); Position Interpolation needs a RoPE model such as LLaMA."
        )
    if any(isinstance(v, dict) for v in params.values()):
        raise PiLoraError(f"model_type '{config.model_type}' has per-layer rope settings (as Gemma 3); "
                          "not supported.")
    return params


def rotary_dim(config) -> int:
    params = rope_parameters_of(config)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head * params.get("partial_rotary_factor", 1.0))


@dataclass(frozen=True)
class Base:
    """How a base handles positions now: its kind, true original length L0, current length L."""

    rope_type: str
    original_len: int
    current_len: int
    factor: float
    extra: dict


def base_scaling(config, original_len: int | None = None) -> Base:
    """What the base is: plain, or already scaled by linear, llama3 or yarn; others are refused."""
    params = rope_parameters_of(config)
    kind = params.get("rope_type", "default")
    if original_len is not None and kind not in _PLAIN:
        raise PiLoraError(f"rope.original_len overrides the trained length of a plain-RoPE base; this base "
                          f"already uses rope_type '{kind}', which says its own original length.")
    if kind in _PLAIN:
        length = original_len or int(config.max_position_embeddings)
        return Base("default", length, length, 1.0, {})
    if kind not in ("linear", "llama3", "yarn"):
        raise PiLoraError(
            f"the base already uses rope_type '{kind}'; pi-lora extends plain RoPE and bases scaled by "
            "linear, llama3 or yarn."
        )
    factor = float(params["factor"])
    if kind == "linear":
        length = int(params.get("original_max_position_embeddings") or round(config.max_position_embeddings / factor))
        return Base(kind, length, round(length * factor), factor, {})
    length = int(params["original_max_position_embeddings"])
    extra = {k: params[k] for k in _KEPT[kind] if params.get(k) is not None}
    # llama3 bases claim more than L0 x factor (Llama-3.1: 8192 x 8, and 131072 positions)
    current = int(config.max_position_embeddings) if kind == "llama3" else round(length * factor)
    return Base(kind, length, current, factor, extra)


def original_len(config) -> int:
    """L0: the length the weights were pretrained at, undoing any stretch already applied."""
    return base_scaling(config).original_len


def interpolation(config, target_len: int, scaling: str | None = None, original_len: int | None = None,
                  **yarn) -> Interpolation:
    """The setting that takes this base to `target_len` tokens. `scaling` None: the default (see
    `default_scaling`). `yarn`: beta_fast, beta_slow, attention_factor (None: transformers' defaults)."""
    base = base_scaling(config, original_len)
    scaling = scaling or default_scaling(base)
    if scaling not in SCALINGS and scaling != "none":
        raise PiLoraError(f"rope scaling '{scaling}' is not supported; use one of {', '.join(SCALINGS)}.")
    if scaling == "none":
        return unscaled(config, base, target_len, yarn)
    if target_len <= base.current_len:
        raise PiLoraError(
            f"target length {target_len} must be longer than the model's trained length {base.current_len}; "
            "context extension only extends."
        )
    kind, extra = scaling, {k: v for k, v in yarn.items() if v is not None}
    if base.rope_type == "llama3":
        if scaling != "linear":
            raise PiLoraError(f"a llama3-scaled base is extended by raising its own factor; rope.scaling "
                              f"'{scaling}' does not combine with it (use linear, or leave rope.scaling unset).")
        kind = "llama3"
    elif base.rope_type == "yarn" and scaling not in ("linear", "yarn"):
        raise PiLoraError(f"a yarn-scaled base is extended by raising its yarn factor; rope.scaling "
                          f"'{scaling}' does not combine with it (use yarn).")
    elif base.rope_type == "yarn":
        kind = "yarn"
    elif base.rope_type == "linear" and scaling != "linear":
        raise PiLoraError(f"this base is already linearly interpolated; rope.scaling '{scaling}' does not "
                          "combine with it (use linear).")
    if kind != "yarn" and extra:
        raise PiLoraError(f"rope.{', rope.'.join(extra)} apply to yarn only, not to rope.scaling '{scaling}'.")
    if base.rope_type in ("llama3", "yarn"):
        extra = {**base.extra, **extra}
    theta = float(rope_parameters_of(config)["rope_theta"])
    # L'/L0, exact; a llama3 base raises its own factor by L'/L
    factor = base.factor * target_len / base.current_len if kind == "llama3" else target_len / base.original_len
    return Interpolation(base.original_len, target_len, factor, kind, theta, base.current_len,
                         rotary_dim(config), extra)


def default_scaling(base: Base) -> str:
    """YaRN for a plain-RoPE base: with the same training it beat PI on the demo and on SmolLM2 8k -> 16k
    (docs/results.md §3-4). A base already extended keeps its own kind (a llama3 base raises its own
    factor through linear), the one way it combines."""
    return {"default": "yarn", "yarn": "yarn"}.get(base.rope_type, "linear")


def unscaled(config, base: Base, target_len: int, yarn: dict) -> Interpolation:
    """Plain RoPE at any length: the no-PI control of a study (direct extension, or more training at
    the base's own length)."""
    if base.rope_type not in _PLAIN:
        raise PiLoraError(f"rope.scaling none keeps a plain-RoPE base as it is; this base already uses "
                          f"rope_type '{base.rope_type}'.")
    if any(v is not None for v in yarn.values()):
        raise PiLoraError("rope.beta_fast, rope.beta_slow and rope.attention_factor apply to yarn only, "
                          "not to rope.scaling 'none'.")
    theta = float(rope_parameters_of(config)["rope_theta"])
    return Interpolation(base.original_len, target_len, 1.0, "none", theta, base.current_len, rotary_dim(config))


def extends(pi: Interpolation) -> bool:
    """Whether the setting takes the base past the length it handles now."""
    return pi.target_len > pi.base_len


def of_recipe(config, section, trained_len: int | None = None) -> Interpolation:
    """The setting a recipe's `rope` section asks for; `trained_len`: a known default for
    rope.original_len (an alias whose config claims more positions than it was trained at)."""
    return interpolation(config, section.target_len, section.scaling, section.original_len or trained_len,
                         beta_fast=section.beta_fast, beta_slow=section.beta_slow,
                         attention_factor=section.attention_factor)


def check_trainable(pi: Interpolation) -> None:
    if pi.rope_type not in TRAINABLE and pi.rope_type != "llama3":
        raise PiLoraError(f"rope.scaling '{pi.rope_type}' changes the frequencies with the sequence length, so "
                          "what is trained would not be what runs; use it in pi-lora eval, and train with "
                          f"{', '.join(TRAINABLE)}.")


def apply(config, pi: Interpolation) -> None:
    """Set the scaling on a config in place, the transformers-5 way (assigning `rope_scaling` would
    drop theta)."""
    config.rope_parameters = pi.rope_parameters()
    config.max_position_embeddings = pi.max_position_embeddings()
