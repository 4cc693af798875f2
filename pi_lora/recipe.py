"""The recipe: every setting of a run, as a strict typed tree.

Precedence: defaults < recipe file < `--set key.path=value` < first-class CLI flags.
All layers are merged as plain dicts and validated once, so every problem (unknown key,
wrong type, missing value) is reported together with its key path.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PiLoraError, RecipeError, read_text

# Bounded where what consumes a number would overflow: a count past int32 is no setting anyone means,
# and torch and numpy refuse (with a traceback) seeds past 2**32 and rates that overflow the weights.
PosInt = Annotated[int, Field(gt=0, lt=2**31)]
NonNegInt = Annotated[int, Field(ge=0, lt=2**31)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
LearningRate = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # Adam moves each weight by about lr
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class _Section(BaseModel):
    # strict: "8" is not an int and 1 is not a bool; a typo is an error, never a silent None.
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSection(_Section):
    base: str | None = None  # alias (see `pi-lora models`), hub id or local folder
    revision: str | None = None
    quant: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    double_quant: bool = True
    # auto: bf16 on GPU, fp32 on CPU. No fp16: it would need loss scaling, which training does not do.
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gpus: PosInt = 1  # split the layers across this many GPUs (balanced by the memory plan)
    shard: bool = False  # under torchrun: shard the base and LoRA state across the processes (FSDP2)
    trust_remote_code: bool = False


class RopeSection(_Section):
    target_len: PosInt | None = None
    # linear: Position Interpolation; yarn; ntk (NTK-aware theta); none: plain RoPE (a no-PI control);
    # dynamic (inference only, eval). null: yarn for a plain-RoPE base (measured best, docs/results.md
    # §3-4), a scaled base's own kind (linear, llama3, yarn) for one already extended
    scaling: Literal["linear", "yarn", "ntk", "none", "dynamic"] | None = None
    original_len: PosInt | None = None  # the base's trained length, when its config claims more (Mistral-7B: 8192)
    beta_fast: PosFloat | None = None  # yarn only; None: transformers' defaults (32, 1, 0.1 ln s + 1)
    beta_slow: PosFloat | None = None
    attention_factor: PosFloat | None = None
    # short-window training (PoSE): each trained sequence holds train_len tokens whose position ids
    # span target_len, in pose_chunks chunks of consecutive positions; null: train_len = target_len
    train_len: PosInt | None = None
    pose_chunks: PosInt = 2


class LoraSection(_Section):
    rank: PosInt = 8
    alpha: PosFloat = 16.0
    dropout: Fraction = 0.0
    target_modules: Literal["all-linear"] | list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # also trained (LongLoRA): the demo ablation found LoRA alone adapts worse (docs/results.md §3)
    trainable: list[Literal["embed", "norm"]] = ["embed", "norm"]
    embed_lr: LearningRate | None = None  # learning rate of the trained embeddings (trainable: [embed]); None: train.lr


class DataSection(_Section):
    source: str = "emozilla/pg19"  # hub dataset id, local file or folder, or "demo"
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    # rows whose text field is missing or null: an error naming the row, or (true) skipped and counted
    skip_bad_rows: bool = False
    streaming: Literal["auto"] | bool = "auto"  # auto: stream hub datasets, cache local files
    shuffle: bool = True
    # held-out validation data, never trained on: the last eval_fraction of a local source's tokens
    # (from a document boundary), or every round(1/eval_fraction)-th document of a hub source;
    # or a separate eval_source (file, folder or hub id; eval_split for a hub dataset)
    eval_fraction: Fraction = 0.0
    eval_source: str | None = None
    eval_split: str = "validation"


class TrainSection(_Section):
    steps: PosInt = 1000
    lr: LearningRate = 2e-5
    warmup_steps: NonNegInt = 20  # the lr rises linearly to train.lr over these steps, from lr/warmup_steps
    schedule: Literal["constant", "cosine"] = "constant"
    batch_size: PosInt = 1
    grad_accum: PosInt = 64
    max_grad_norm: NonNegFloat = 1.0  # 0 disables clipping
    loss_chunk: NonNegInt = 4096  # LM head + loss over this many positions at a time; 0: all at once
    # auto: chosen by the memory plan (pi-lora plan), only when the run would not fit without
    mlp_tile: Literal["auto"] | NonNegInt = "auto"  # run each MLP over this many positions at a time; 0: off
    attention_tile: Literal["auto"] | NonNegInt = "auto"  # norms, q/k/v/o and RoPE over this many positions; 0: off
    offload_activations: Literal["auto"] | bool = "auto"  # checkpointed layer inputs in CPU memory
    # non-reentrant, per decoder layer: true (all), false, or N (the first N; the others keep their
    # activations and skip the recompute); auto: as few as fit (pi-lora plan)
    gradient_checkpointing: Literal["auto"] | bool | NonNegInt = "auto"
    gpu_mem: str | None = None  # memory per device the plan may use, e.g. "24GiB"; default: what the device has
    # fused Triton kernels on CUDA (pi_lora.kernels): liger = Liger-Kernel's RMSNorm, SwiGLU and RoPE; off on a CPU
    kernels: Literal["none", "liger"] = "none"
    weight_decay: NonNegFloat = 0.0
    betas: Annotated[list[Fraction], Field(min_length=2, max_length=2)] = [0.9, 0.95]
    seed: Seed = 42
    log_every: PosInt = 1
    save_every: PosInt = 100
    keep_checkpoints: PosInt = 2  # the newest ones; the best by validation loss is kept as well
    # validation loss at rope.target_len on the held-out data (data.eval_fraction / data.eval_source)
    eval_every: NonNegInt = 0  # every N steps and at the end; 0: at the end only
    eval_sequences: PosInt = 4  # held-out sequences of target_len per validation
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]  # event files in RUN/tensorboard


class Recipe(_Section):
    output: str | None = None  # run folder; default runs/<base>-<target_len>
    model: ModelSection = ModelSection()
    rope: RopeSection = RopeSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()

    @field_validator("output")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        """`~` in output means the home folder, as it does in data.source."""
        return str(Path(value).expanduser()) if value and value.startswith("~") else value


REQUIRED = ("model.base", "rope.target_len")
MOVED = {"model.gradient_checkpointing": "train.gradient_checkpointing"}  # old key -> its name now
SHIPPED_DIRS = (Path(__file__).parent / "recipes", Path(__file__).parent.parent / "recipes")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` as a string; recipes are full of such learning rates."""


def _no_aliases(self, *args, **kwargs):
    """An alias repeats a node: nested ones grow exponentially (a billion-laughs recipe) and no setting
    needs one, so recipes are refused them."""
    if self.check_event(yaml.AliasEvent):
        event = self.peek_event()
        raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in recipes",
                                          event.start_mark)
    return yaml.composer.Composer.compose_node(self, *args, **kwargs)


def _unique_mapping(self, node, deep=False):
    """A key given twice would silently win over the first; it is an error naming the key."""
    seen = set()
    for key_node, _ in node.value:
        key = self.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
        seen.add(key if isinstance(key, (str, int, float, bool)) else id(key))
    return yaml.SafeLoader.construct_mapping(self, node, deep=deep)


_Loader.compose_node = _no_aliases
_Loader.construct_mapping = _unique_mapping
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A `--set` value, typed the way the same text would be in a recipe file."""
    return yaml.load(text, Loader=_Loader)


def shipped() -> dict[str, Path]:
    """Shipped recipe names mapped to their files."""
    for folder in SHIPPED_DIRS:
        if folder.is_dir():
            return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    return {}


def find(name_or_path: str) -> Path:
    """A recipe named by file path or by shipped name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = shipped()
    name = path.name.removesuffix(".yaml")
    if name in recipes and len(path.parts) == 1:
        return recipes[name]
    hint = difflib.get_close_matches(name, list(recipes), n=1)
    more = f" Did you mean '{hint[0]}'?" if hint else ""
    raise PiLoraError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe ({', '.join(recipes)}).{more}"
    )


def read(path: Path) -> dict:
    """The raw mapping of a recipe file; YAML syntax errors say where."""
    text = read_text(path, "recipe")
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], source=str(path)) from e
    except RecursionError:
        raise RecipeError(["not a recipe: nested too deeply"], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([f"top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def parse_sets(items: list[str]) -> dict:
    """`key.path=value` strings as a nested mapping; every bad one is reported together."""
    tree, problems = collect_sets(items)
    if problems:
        raise RecipeError(problems, source="--set")
    return tree


def collect_sets(items: list[str]) -> tuple[dict, list[str]]:
    """The nested mapping of the good `--set` items, and a problem line for each bad one."""
    tree: dict = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set '{item}': expected key.path=value")
            continue
        if not all(part.strip() for part in key.split(".")):
            problems.append(f"--set '{item}': '{key.strip()}' has an empty name; expected key.path=value, "
                            "e.g. train.steps=100")
            continue
        try:
            set_path(tree, key.strip(), parse_value(value))
        except RecursionError:
            problems.append(f"--set '{item}': the value is nested too deeply")
        except yaml.YAMLError as e:
            problems.append(f"--set '{item}': the value is not valid YAML ({str(e).splitlines()[0]})")
        except RecipeError as e:
            problems += [f"--set {p}" for p in e.problems]
    return tree, problems


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError([f"{dotted}: '{part}' is a value, not a section"], source="--set")
    node[leaf] = value


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively for sections."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flat `key.path -> value` view of a nested mapping."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(leaves(value, path + "."))
        else:
            flat[path] = value
    return flat


def _fields_at(loc: list) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def _describe(errors: list[dict]) -> list[str]:
    """Pydantic errors as `key.path: problem`, one line per key, unions folded."""
    by_path: dict[str, list[str]] = {}
    for err in errors:
        # union branches add tags like "list[str]"; keep only real keys and list indices
        loc = [p for p in err["loc"] if isinstance(p, int) or re.fullmatch(r"[A-Za-z_]\w*", p)]
        if err["type"] == "extra_forbidden" and loc[-1:] != [err["loc"][-1]]:
            loc = [*loc, err["loc"][-1]]  # the unknown key itself, whatever its characters
        path = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden" and path in MOVED:
            msg = f"moved to {MOVED[path]}"
        elif err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        else:
            msg = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}"
        by_path.setdefault(path, []).append(msg)
    return [f"{path}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in by_path.items()]


def validate(tree: dict, source: str = "recipe", require: bool = True) -> Recipe:
    """A checked Recipe, or a RecipeError listing every problem with its key path."""
    problems: list[str] = []
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        problems = _describe(e.errors())
        recipe = None
    if require:
        flat = leaves(tree)
        problems += [f"{key}: required, not set" for key in REQUIRED if flat.get(key) is None]
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def default_output(recipe: Recipe) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(recipe.model.base.rstrip("/")).name).strip("-")
    return f"runs/{name}-{recipe.rope.target_len}"


def resolve(file_tree: dict, sets: list[str], flags: dict[str, Any], source: str = "recipe"):
    """Merge the layers, validate once. Returns the recipe and each override with where it came from."""
    defaults = Recipe().model_dump(mode="json")
    set_tree, set_problems = collect_sets(sets)
    layers = [(source, file_tree), ("--set", set_tree), ("flag", {})]
    for dotted, value in flags.items():
        if value is not None:
            set_path(layers[2][1], dotted, value)
    tree = defaults
    origin: dict[str, str] = {}
    for name, layer in layers:
        tree = merge(tree, layer)
        origin.update({key: name for key in leaves(layer)})
    try:
        recipe = validate(tree, source=source)
    except RecipeError as e:  # a bad --set does not hide the other problems, nor they it
        raise blamed(set_problems + e.problems, set(leaves(set_tree)), source) from None
    if set_problems:
        raise RecipeError(set_problems, source=source)
    if recipe.output is None:
        recipe.output = default_output(recipe)
        origin["output"] = "derived"
    flat, flat_defaults = leaves(recipe.model_dump(mode="json")), leaves(defaults)
    overrides = {
        key: (value, origin.get(key, "recipe"))
        for key, value in flat.items()
        if value != flat_defaults.get(key)
    }
    return recipe, overrides


def blamed(problems: list[str], set_keys: set[str], source: str) -> RecipeError:
    """The problems, each of a key given with --set said to be of --set, not of the recipe file."""
    def of_set(problem: str) -> bool:
        key = problem.removeprefix("--set ").split(":")[0].strip("' ")
        return problem.startswith("--set ") or any(key == k or key.startswith(k + ".") for k in set_keys)

    named = [p if p.startswith("--set ") or not of_set(p) else f"--set {p}" for p in problems]
    return RecipeError(named, source="--set" if all(map(of_set, problems)) else source)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
