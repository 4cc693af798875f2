"""Position Interpolation arithmetic on a transformers config.

PI maps position p to p * L / L' (Chen et al. 2023), which is transformers' own "linear"
rope type with factor s = L' / L. Nothing here touches weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import PiLoraError

# Rope types that already stretch positions; we know how to stack PI on top of "linear" only.
_PLAIN = {"default", None}


@dataclass(frozen=True)
class Interpolation:
    original_len: int  # L: the length the base was trained to
    target_len: int  # L'
    factor: float  # s = L' / L, exact
    rope_type: str
    rope_theta: float

    def rope_parameters(self) -> dict:
        """The config's `rope_parameters` (transformers 5); `rope_theta` must stay in it."""
        return {"rope_type": self.rope_type, "factor": self.factor, "rope_theta": self.rope_theta}

    def rope_scaling(self) -> dict:
        """The legacy (transformers 4, llama.cpp converters) form of the same setting."""
        return {"type": self.rope_type, "rope_type": self.rope_type, "factor": self.factor}

    def as_dict(self) -> dict:
        return asdict(self)


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
        raise PiLoraError(f"model_type '{config.model_type}' has per-layer rope settings; not supported yet.")
    return params


def original_len(config) -> int:
    """L: the length the weights were pretrained at, undoing any linear stretch already applied."""
    params = rope_parameters_of(config)
    rope_type = params.get("rope_type", "default")
    if rope_type in _PLAIN:
        return int(config.max_position_embeddings)
    if rope_type == "linear":
        if "original_max_position_embeddings" in params:
            return int(params["original_max_position_embeddings"])
        return round(config.max_position_embeddings / float(params["factor"]))
    raise PiLoraError(
        f"the base already uses rope_type '{rope_type}'; linear Position Interpolation can extend only "
        "a base with plain or linear RoPE."
    )


def interpolation(config, target_len: int, scaling: str = "linear") -> Interpolation:
    """The PI setting that takes this base to `target_len` tokens."""
    if scaling != "linear":
        raise PiLoraError(f"rope scaling '{scaling}' is not supported; use 'linear'.")
    length = original_len(config)
    if target_len <= length:
        raise PiLoraError(
            f"target length {target_len} must be longer than the model's trained length {length}; "
            "Position Interpolation only extends."
        )
    theta = float(rope_parameters_of(config)["rope_theta"])
    return Interpolation(length, target_len, target_len / length, scaling, theta)


def apply(config, pi: Interpolation) -> None:
    """Set PI on a config in place, the transformers-5 way (assigning `rope_scaling` would drop theta)."""
    config.rope_parameters = pi.rope_parameters()
    config.max_position_embeddings = pi.target_len
