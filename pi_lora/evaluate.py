"""`pi-lora eval`: did the extension work? The PI paper's two measures on the user's own model.

Perplexity with L tokens of context (paper §3.2): at every evaluated length L the same tokens are
scored, each predicted by a window of L tokens ending at or just after it (sliding, stride S), so
each has at least L - S tokens of context. Tokens that cannot get that much context at the longest
length are scored at no length, so the lengths differ only in the context the model is given.
Perplexity by position inside full windows of the longest length says where a model breaks.

Passkey retrieval (paper §3.3): the key is placed k tokens before the end of the prompt (the
question), for distances k from near the question out to the start of the window. The effective
window k_max is the largest k such that every tested k' <= k succeeds in at least 20% of trials: it
grows outward from the question.

The LM head and the loss run in chunks of positions, so no (length x vocab) float32 logits exist.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model, rope, run
from .errors import Interrupted, PiLoraError, first_line, stop_if_interrupted
from .loss import parts

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
# Small instruct models answer "the pass key. 27611 is ...": room to echo a phrase, then the number.
ANSWER_TOKENS = 20
THRESHOLD = 0.2  # the paper's: a distance counts as retrieved if at least 20% of its trials succeed
LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")  # decoder at .model, head at .lm_head (see loss.parts)


# --- what to evaluate --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rope:
    """A rope setting to evaluate a model with: `none` (plain RoPE), or a rope.SCALINGS kind by `factor`."""

    text: str
    kind: str
    factor: float = 1.0


def parse_rope(text: str) -> Rope:
    """One `--scaling` setting: `none`, or KIND:S with KIND one of rope.SCALINGS and S >= 1."""
    kind, _, arg = text.strip().partition(":")
    if kind == "none" and not arg:
        return Rope(text.strip(), "none")
    if kind in rope.SCALINGS:
        try:
            factor = float(arg)
        except ValueError:
            factor = 0.0
        if 1 <= factor < 2**20:  # inf or nan would reach the rope tables as inf and nan
            return Rope(text.strip(), kind, factor)
    raise PiLoraError(f"--scaling takes comma-separated settings, each 'none' or KIND:S with KIND one of "
                      f"{', '.join(rope.SCALINGS)} and S a number from 1 (finite); not '{text}'.")


def parse_lengths(text: str | None, flag: str) -> list[int] | None:
    """`2048,8192` -> [2048, 8192]; None stays None (the default). A length is at least 2 (one
    prediction)."""
    try:
        lengths = [int(x) for x in text.split(",")] if text else None
    except ValueError:
        raise PiLoraError(f"{flag} must be comma-separated integers, not '{text}'.") from None
    if lengths and max(lengths) >= 2**31:
        raise PiLoraError(f"{flag}: {max(lengths):,} tokens is beyond any model.")
    if lengths and min(lengths) < 2:
        raise PiLoraError(f"{flag}: every length must be at least 2, not {min(lengths)}.")
    return lengths


def parse_ropes(text: str | None) -> list[Rope | None]:
    """`none,linear:4` -> one setting each, side by side; None -> [None]: each model's own setting."""
    if text is None:
        return [None]
    return [parse_rope(part) for part in text.split(",")]


def set_rope(config, setting: Rope) -> int:
    """Plain RoPE, or the setting's kind by its factor over the base's trained length (a llama3
    base: over the length it handles), through rope.interpolation. Returns the length it claims."""
    if setting.kind == "none":
        length = rope.original_len(config)
        config.rope_parameters = {"rope_type": "default",
                                  "rope_theta": float(rope.rope_parameters_of(config)["rope_theta"])}
        config.max_position_embeddings = length
        return length
    base = rope.base_scaling(config)
    length = base.current_len if base.rope_type == "llama3" else base.original_len
    pi = rope.interpolation(config, round(length * setting.factor), setting.kind)
    rope.apply(config, pi)
    return pi.target_len


@dataclass
class Subject:
    """A model under evaluation, with the length it claims."""

    label: str
    net: object
    tokenizer: object
    max_len: int
    notes: dict = field(default_factory=dict)
    trained_len: int = 0  # the base's pretrained length: where the default lengths start (at most 2048)


def is_run(path: Path) -> bool:
    return (path / run.RECIPE).is_file() and (path / run.META).is_file()


def section_for(spec: str, quant: str, trust_remote_code: bool = False):
    """The ModelSection that loads `spec`'s base, and the run's metadata (None for a plain model).

    A run folder is loaded from the base it was trained on, at the run's revision, with its
    trust_remote_code; quant 'none' is the full-precision base the user deploys (the merged model's
    numbers), 'nf4' the 4-bit base the adapter was trained on.
    """
    from . import recipe as recipes_mod
    from .recipe import ModelSection

    path = Path(spec)
    if not is_run(path):
        return ModelSection(base=spec, quant=quant, trust_remote_code=trust_remote_code), None
    if not (path / run.ADAPTER / "adapter_config.json").is_file():
        raise PiLoraError(f"run '{spec}' has no adapter yet (unfinished); finish it with pi-lora train --resume.")
    meta = run.read_meta(path)
    run.require_trust(meta, trust_remote_code, "eval")
    trained = recipes_mod.read(path / run.RECIPE).get("model") or {}
    section = ModelSection(base=meta.get("base_path") or meta["base"], quant=quant,
                           revision=trained.get("revision") or meta.get("revision"),
                           trust_remote_code=trust_remote_code)
    if quant != "none":  # as trained: its double quantization and compute dtype
        section.double_quant = meta.get("double_quant", True)
        section.compute_dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(meta.get("compute_dtype"), "auto")
    return section, meta


def load_subject(spec: str, setting: Rope | None = None, quant: str = "none", on: torch.device | None = None,
                 trust_remote_code: bool = False, label: str | None = None, adapter: bool = True) -> Subject:
    """A run folder (base + adapter, with the run's rope setting unless `setting` replaces it), a
    merged or plain model folder, a hub id or alias, or a .gguf file. `adapter=False`: a run's base
    alone (the baselines)."""
    on = on or model.device()
    section, meta = section_for(spec, quant, trust_remote_code)
    config = model.load_config(section.base, section.revision, section.trust_remote_code)
    trained_len = rope.original_len(config) if getattr(config, "rope_parameters", None) else 0
    claimed = config.max_position_embeddings
    if meta is not None and setting is None:
        config.rope_parameters = dict(meta["rope_parameters"])
        config.max_position_embeddings = rope.from_meta(meta).max_position_embeddings()
        claimed, trained_len = meta["target_len"], meta["original_len"]
    if getattr(config, "model_type", None) not in LAYOUTS:
        raise PiLoraError(f"'{spec}' is model_type '{config.model_type}'; eval supports LLaMA-layout models.")
    if setting is not None:
        claimed = set_rope(config, setting)
    net = model.load_base(section, config, on)
    net.config.use_cache = True  # load_base turns the cache off for training; generation needs it
    if meta is not None and adapter:
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, Path(spec) / run.ADAPTER)
        except (OSError, ValueError, RuntimeError) as e:
            raise PiLoraError(f"cannot load the adapter of '{spec}': {first_line(e)}") from e
    label = label or spec + (f" (scaling {setting.text})" if setting else "") + (f" [{quant}]" if quant != "none" else "")
    tokenizer = model.load_tokenizer(section.base, section.revision, section.trust_remote_code)
    return Subject(label, net.eval(), tokenizer, claimed,
                   {"rope": setting.text if setting else None, "quant": quant}, trained_len)


def baselines(spec: str) -> list[tuple[Rope, str]]:
    """What a run is measured against: its base with plain RoPE, and with the run's setting untrained."""
    meta = run.read_meta(Path(spec))
    name = Path(spec).name
    if meta["rope_type"] == "none":  # trained without scaling: its base as it is is the one baseline
        return [(Rope("none", "none"), f"{name}: base, no scaling")]
    llama3 = meta["rope_type"] == "llama3"  # extended by raising its own factor: "linear" over its length
    kind = "linear" if llama3 else meta["rope_type"]
    factor = meta["target_len"] / ((meta.get("base_len") if llama3 else None) or meta["original_len"])
    own = Rope(f"{kind}:{factor:g}", kind, factor)
    return [(Rope("none", "none"), f"{name}: base, no scaling"),
            (own, f"{name}: base, {own.text} untrained")]


# --- perplexity ----------------------------------------------------------------------------------------

@torch.no_grad()
def token_nll(net, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """NLL of ids[1:] given the prefix, one value per predicted token, with the head run in chunks."""
    decoder, head = parts(net)
    # no KV cache: eval loads the model with one for generation, and a 32k window's is GiBs for nothing
    hidden = decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    out = []
    for i in range(0, len(ids) - 1, chunk):
        logits = head(hidden[i : min(i + chunk, len(ids) - 1)]).float()
        target = ids[i + 1 : i + 1 + len(logits)]
        out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    return torch.cat(out)


def window_nll(net, tokens: torch.Tensor):
    """nll(begin, end): NLL of tokens[begin+1:end] given tokens[begin:...], remembered, as the
    position bins reuse the first window of the longest length."""
    device = next(net.parameters()).device

    @functools.lru_cache(maxsize=None)
    def nll(begin: int, end: int) -> torch.Tensor:
        return token_nll(net, tokens[begin:end].to(device)).double().cpu()

    return nll


def step_for(length: int, stride: int) -> int:
    """The stride a window of `length` can use: each window must keep at least one token of context."""
    return max(1, min(stride, length - 1))


def scored_span(longest: int, stride: int, windows: int) -> tuple[int, int]:
    """[first, end) of the scored tokens: from the first that has longest - stride tokens of context
    at the longest length, `windows` strides of it."""
    step = step_for(longest, stride)
    first = longest - step
    return first, first + step * windows


@dataclass
class Scored:
    perplexity: float
    tokens: int
    min_context: int


def sliding_perplexity(nll, first: int, end: int, length: int, stride: int) -> Scored:
    """Perplexity of tokens [first, end), each predicted by a window of `length` tokens.

    The scored tokens are cut into chunks of `stride`; each chunk is scored by the window of `length`
    that ends at the chunk's end, so each of its tokens has at least length - stride tokens of context.
    `nll(begin, end)` gives the NLL of tokens begin+1 .. end-1 predicted within [begin, end).
    """
    step = step_for(length, stride)
    total, count, least = 0.0, 0, None
    for start in range(first, end, step):
        stop = min(start + step, end)
        begin = max(0, stop - length)
        new = nll(begin, stop)[start - begin - 1 : stop - begin - 1]  # [j] predicts token begin + j + 1
        total += float(new.sum())
        count += len(new)
        least = start - begin if least is None else min(least, start - begin)
    return Scored(math.exp(total / count), count, least)


def windows_at(length: int, stride: int, first: int, end: int) -> int:
    return math.ceil((end - first) / step_for(length, stride))


def position_perplexity(net, tokens: torch.Tensor, length: int, bins: int, nll=None) -> list[float]:
    """Perplexity by position inside full windows: bin b covers positions [b*length/bins, (b+1)*length/bins)."""
    nll_of = nll or window_nll(net, tokens)
    sums, counts = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins)
    width = length // bins
    for start in range(0, len(tokens) - length + 1, length):
        nll = nll_of(start, start + length)
        positions = torch.arange(1, length)
        index = torch.clamp(positions // width, max=bins - 1)
        sums.index_add_(0, index, nll)
        counts.index_add_(0, index, torch.ones(length - 1))
    if counts.sum() == 0:
        raise PiLoraError(f"the data holds fewer than {length} tokens; no full window to bin.")
    return [math.exp(s / c) if c else float("nan") for s, c in zip(sums.tolist(), counts.tolist())]


# --- passkey -------------------------------------------------------------------------------------------

def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, distance: int, key: int) -> tuple[list[int], str]:
    """The paper's prompt, `length` tokens long, the key's sentence starting `distance` tokens before
    the end (the end is the question). Distances beyond what the task text leaves put the key right
    after it; distances shorter than the key's sentence and the question put it just before the question."""
    head, info, question = prompt_parts(tokenizer, key)
    filler = token_ids(tokenizer, " " + FILLER)
    room = length - len(head) - len(info) - len(question)
    if room < 0:
        raise PiLoraError(f"a passkey prompt needs at least {length - room} tokens; {length} is too short.")
    after = min(max(distance - len(info) - len(question), 0), room)  # filler between key and question
    fill = filler * (room // len(filler) + 2)
    prompt = head + fill[: room - after] + info + fill[room - after : room] + question
    return prompt, str(key)


def prompt_parts(tokenizer, key: int) -> tuple[list[int], list[int], list[int]]:
    """The task text (after BOS), the key's sentence and the question: what every prompt holds."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + token_ids(tokenizer, TASK + " "),
            token_ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. "),
            token_ids(tokenizer, " " + QUESTION))


def shortest_prompt(tokenizer) -> int:
    return sum(len(part) for part in prompt_parts(tokenizer, 99999))


def passkey_found(generated: str, key: str) -> bool:
    """The first 5-digit number of the answer is the key (echoed words before it are fine)."""
    match = re.search(r"(?<!\d)\d{5}(?!\d)", generated)
    return bool(match) and match.group(0) == key


def distances_for(length: int, count: int) -> list[int]:
    """`count` distances from the question, evenly spaced from length/count out to the whole window."""
    return sorted({max(1, round(length * (i + 1) / count)) for i in range(count)})


@torch.no_grad()
def passkey_accuracy(net, tokenizer, length: int, distances: list[int], trials: int, seed: int = 0,
                     progress=None) -> dict[int, float]:
    """Fraction of `trials` random 5-digit keys retrieved at each distance, greedy decoding.
    The same keys for every model (one seed), so models are compared on the same prompts."""
    rng = random.Random(seed)
    task = progress.add_task(f"passkey {length:,}", total=len(distances) * trials, info="") if progress else None
    device = next(net.parameters()).device
    result = {}
    for distance in distances:
        hits = 0
        for _ in range(trials):
            key = rng.randint(10000, 99999)
            prompt, answer = passkey_prompt(tokenizer, length, distance, key)
            ids = torch.tensor([prompt], device=device)
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                               do_sample=False, pad_token_id=tokenizer.eos_token_id)
            hits += passkey_found(tokenizer.decode(out[0, len(prompt):]), answer)
            if progress:
                progress.advance(task)
        result[distance] = hits / trials
    return result


def effective_window(accuracy: dict[int, float], threshold: float = THRESHOLD) -> int:
    """The paper's k_max: the largest distance k such that every tested k' <= k succeeds in at least
    `threshold` of its trials, scanned from the question outward; 0 when even the nearest fails."""
    best = 0
    for distance in sorted(accuracy):
        if accuracy[distance] < threshold:
            break
        best = distance
    return best


# --- data, settings, one model -------------------------------------------------------------------------

def eval_tokens(section, tokenizer, need: int) -> torch.Tensor:
    """The first `need` tokens of the data (documents framed with BOS/EOS, as in training); of a
    run's held-out data when the section holds some out (data.eval_fraction / data.eval_source)."""
    from . import data
    from .demo import home

    if section.eval_fraction or section.eval_source:
        tokens = data.held_out_tokens(section, tokenizer, need, home() / "tokens")
        if len(tokens) < need:
            raise PiLoraError(f"the run's held-out data holds {len(tokens)} tokens; this evaluation needs {need} "
                              "(lower the longest length or the number of windows, or give --source).")
        return tokens
    files = data.local_files(section.source)
    if files is not None:
        stream = data.cached_tokens(section, files, tokenizer, home() / "tokens")
        found = len(stream)
        tokens = torch.from_numpy(stream[:need].astype("int64"))
    else:
        taken: list[int] = []
        docs = data.texts(data.open_dataset(section, None, streaming=True), section.text_field)
        for ids in data.token_ids(docs, tokenizer):
            taken.extend(ids)
            if len(taken) >= need:
                break
        found, tokens = len(taken), torch.tensor(taken[:need])
    if found < need:
        raise PiLoraError(f"the data holds {found} tokens; this evaluation needs {need} "
                          "(lower the longest length or the number of windows).")
    return tokens


def default_lengths(max_len: int, smallest: int = 2048) -> list[int]:
    out, n = [], min(smallest, max_len)
    while n <= max_len:
        out.append(n)
        n *= 2
    return out


@dataclass
class Settings:
    lengths: list[int] | None  # None: powers of two up to each model's length
    stride: int | None = None  # None: the paper's 256, or a quarter of the shortest length when less
    windows: int | None = None  # strides scored at the longest length: tokens scored = stride * windows
    scored: int = 2048  # tokens scored when `windows` is None
    trials: int = 10
    distances: int = 32
    passkey: bool = True
    perplexity: bool = True
    passkey_lengths: list[int] | None = None  # None: the longest perplexity length
    rope: str | None = None  # comma-separated settings, side by side; None: each model's own
    quant: str = "none"
    baselines: bool = True  # a run is shown beside its base with no scaling and with its own, untrained
    trust_remote_code: bool = False
    passkey_check: bool = True  # first try the key right before the question and half the prompt away (able_to_retrieve)
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks at every length (tasks.py)
    task_limit: int = 5  # samples per task and length
    engine: str = "transformers"  # or llama.cpp: .gguf files run by llama.cpp, every model by its protocol (llamacpp.py)


def perplexities(nll, lengths: list[int], stride: int, first: int, end: int, progress=None) -> dict[int, Scored]:
    """The same tokens [first, end) scored at every length, each with that length's context."""
    task = None
    if progress:
        task = progress.add_task("perplexity", total=sum(windows_at(n, stride, first, end) for n in lengths), info="")
    out = {}
    for n in lengths:
        counted = nll if task is None else counting(nll, progress, task)
        out[n] = sliding_perplexity(counted, first, end, n, stride)
    return out


def counting(nll, progress, task):
    def call(begin: int, end: int):
        value = nll(begin, end)
        progress.advance(task)
        return value

    return call


def stride_and_windows(s: Settings, lengths: list[int]) -> tuple[int, int]:
    """The stride (the paper's 256 unless the shortest length is under 1,024: then a quarter of it, so
    each token scored there keeps three quarters of its window as context, not 1 token to all of it)
    and the number of strides scored."""
    stride = s.stride or max(1, min(256, lengths[0] // 4))
    return stride, s.windows or max(1, s.scored // stride)


def perplexity_part(subject: Subject, s: Settings, lengths: list[int], section, progress=None) -> dict:
    longest = lengths[-1]
    stride, windows = stride_and_windows(s, lengths)
    first, end = scored_span(longest, stride, windows)
    tokens = eval_tokens(section, subject.tokenizer, end)
    nll = window_nll(subject.net, tokens)
    scored = perplexities(nll, lengths, stride, first, end, progress)
    bins = max(1, longest // 2048) if longest >= 4096 else min(4, longest)  # a bin is at least one position
    width = longest // bins
    return {
        "perplexity": {str(n): r.perplexity for n, r in scored.items()},
        "scored_tokens": {str(n): r.tokens for n, r in scored.items()},
        "min_context": {str(n): r.min_context for n, r in scored.items()},
        "by_position": {f"{i * width}-{(i + 1) * width}": v
                        for i, v in enumerate(position_perplexity(subject.net, tokens, longest, bins, nll))},
        "tokens": len(tokens),
        "stride": stride,
    }


def able_to_retrieve(subject: Subject, s: Settings, longest: int, progress=None) -> str | None:
    """Why the model cannot do the task at all, or None. Tried in a prompt within the length the base
    was trained at: the key right before the question, then half the prompt away. A model that
    retrieves none of `trials` keys at either is taken to fail at every length and distance, so
    measuring them all would only spend time (a tiny model: most of its evaluation). Not the key
    right before the question alone: YaRN x2 on SmolLM2 misses it there, yet retrieves out to 12,288
    in 16k prompts (docs/results.md §4a). A trained length too short for a prompt: the shortest prompt."""
    length = min(max(subject.trained_len or longest, shortest_prompt(subject.tokenizer)), longest)
    middle = max(1, length // 2)
    for distance in (1, middle):
        (hits,) = passkey_accuracy(subject.net, subject.tokenizer, length, [distance], s.trials,
                                   progress=progress).values()
        if hits:
            return None
    return (f"0 of {s.trials} keys retrieved right before the question in {length:,}-token prompts, nor "
            f"{middle:,} tokens from it: the model cannot do the task, so no distance was measured "
            f"(--no-passkey-check measures them anyway)")


def passkey_part(subject: Subject, s: Settings, lengths: list[int], progress=None) -> dict:
    out = {}
    for length in s.passkey_lengths or lengths[-1:]:
        distances = distances_for(length, s.distances)
        accuracy = passkey_accuracy(subject.net, subject.tokenizer, length, distances, s.trials, progress=progress)
        out[str(length)] = {"trials": s.trials, "accuracy": {str(k): v for k, v in accuracy.items()},
                            "k_max": effective_window(accuracy)}
    return out


def evaluate_one(subject: Subject, s: Settings, section, progress=None) -> dict:
    lengths = sorted(s.lengths or default_lengths(subject.max_len, min(2048, subject.trained_len or 2048)))
    result = {"max_len": subject.max_len, "trained_len": subject.trained_len, **subject.notes}
    if s.perplexity and s.engine == "llama.cpp":  # on the windows llama-perplexity scores, beside a GGUF
        from . import llamacpp

        first = subject.tokenizer.bos_token_id if adds_bos(subject.tokenizer) else None
        result.update(llamacpp.perplexity_part(lambda chunks: llamacpp.transformers_perplexity(subject.net, chunks),
                                               subject.tokenizer, lengths, s.scored, section, first, progress))
    elif s.perplexity:
        result.update(perplexity_part(subject, s, lengths, section, progress))
    longest_prompt = max(s.passkey_lengths or lengths[-1:])
    unable = able_to_retrieve(subject, s, longest_prompt, progress) if s.passkey and s.passkey_check else None
    if unable:
        result["passkey_unable"] = unable
    elif s.passkey:
        result["passkey"] = passkey_part(subject, s, lengths, progress)
    if s.tasks:
        from . import tasks

        result["tasks"] = tasks.task_part(subject, s.tasks, lengths, s.task_limit, progress)
    return result


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def shared_lengths(specs: list[str], s: Settings) -> Settings:
    """Every model at the same lengths (the same tokens scored): with a run among them, the default
    lengths go from its base's trained length (at most 2048) to its target, for its baselines too."""
    import dataclasses

    runs = [Path(spec) for spec in specs if is_run(Path(spec))]
    if s.lengths or not runs:
        return s
    meta = run.read_meta(runs[0])
    return dataclasses.replace(s, lengths=default_lengths(meta["target_len"], min(2048, meta["original_len"])))


def subjects(specs: list[str], s: Settings):
    """(spec, rope setting, label, with adapter) of everything to evaluate, in table order. A run under
    another --scaling than its own is labelled with both: its adapter was trained under its own."""
    for spec in specs:
        run_folder = is_run(Path(spec))
        if s.baselines and run_folder:
            for setting, label in baselines(spec):
                yield spec, setting, label, False
        for setting in parse_ropes(s.rope):
            label = None
            if run_folder and setting is not None:
                own = baselines(spec)[1][0].text
                label = f"{spec}: adapter trained with {own}, evaluated with {setting.text}"
            yield spec, setting, label, True


def default_output(specs: list[str]) -> Path:
    """RUN/eval for one run folder (its outputs live in it), else eval/<the first model's name>."""
    first = Path(specs[0])
    if len(specs) == 1 and is_run(first):
        return first / run.EVAL
    name = first.resolve().name if first.exists() else specs[0].replace("/", "--")
    return Path("eval") / (name + (f"+{len(specs) - 1}" if len(specs) > 1 else ""))


def data_section(specs: list[str], source: str | None, split: str, text_field: str):
    """What to evaluate on, and a note to show: --source when given; else the first run's own data,
    its held-out part when it holds one out; else PG-19's test split."""
    from . import recipe as recipes_mod
    from .recipe import DataSection

    if source is not None:
        return DataSection(source=source, split=split, text_field=text_field), None
    runs = [Path(s) for s in specs if is_run(Path(s))]
    if not runs:
        return DataSection(source="emozilla/pg19", split="test", text_field=text_field), None
    saved = recipes_mod.read(runs[0] / run.RECIPE).get("data") or {}
    section = DataSection.model_validate({k: v for k, v in saved.items() if k in DataSection.model_fields})
    if section.eval_fraction or section.eval_source:
        return section, f"evaluating on the held-out data of {runs[0]} (never trained on)"
    return section, (f"{runs[0]} holds no data out (data.eval_fraction, data.eval_source), so this is its "
                     f"training data '{section.source}'; give --source for text it has not seen")


def save_json(path: Path, data: dict) -> None:
    run.write_json(path, json.loads(json.dumps(data, default=str)))


def evaluate(specs: list[str], s: Settings, section, output: Path | None = None, overwrite: bool = False,
             progress=None) -> tuple[dict, Path]:
    """Every model in `specs` under every rope setting, side by side, into `output` (default:
    default_output): results.json and plot.png. Returns the results and the output folder, which
    each run evaluated records (outputs.json)."""
    output = output or default_output(specs)
    runs = [Path(spec) for spec in specs if is_run(Path(spec))]
    with writing_output(output, specs, overwrite):
        results = measure(specs, s, section, output, progress)
    for folder in runs:
        run.record_output(folder, output, "eval")
    return results, output


@contextlib.contextmanager
def writing_output(output: Path, specs: list[str], overwrite: bool):
    """Be the one writer of `output` while no `train --resume` changes the runs measured. The output
    is checked as every command checks its own (run.check_output): the models measured and the runs'
    bases are its inputs, never replaced."""
    runs = [Path(spec) for spec in specs if is_run(Path(spec))]
    inputs = [Path(spec) for spec in specs if Path(spec).exists()]
    for folder in runs:
        meta = run.read_meta(folder)
        inputs += [Path(b) for b in (meta.get("base_path"), meta.get("base")) if b and Path(b).exists()]
    run.check_output(output, run.EVAL, overwrite, inputs)
    with contextlib.ExitStack() as held:
        held.enter_context(run.writing(output))
        for folder in runs:
            held.enter_context(run.reading(folder))
        run.check_output(output, run.EVAL, overwrite)  # again, now that no other writer can change it
        yield


def measure(specs: list[str], s: Settings, section, output: Path, progress=None) -> dict:
    """The measurements, model by model, into a folder that replaces `output` once all are done (a
    failure leaves `output` as it was). Cut short by Ctrl-C or SIGTERM, the models finished are kept
    when that replaces no earlier results."""
    results = {}
    s = shared_lengths(specs, s)
    todo = list(subjects(specs, s))
    with run.atomic_dir(output) as tmp:
        try:
            for spec, setting, label, adapter in todo:
                if s.engine == "llama.cpp" and spec.endswith(".gguf"):
                    from . import llamacpp

                    results[llamacpp.gguf_label(spec)] = llamacpp.evaluate_gguf(spec, s, section, progress)
                    save_json(tmp / "results.json", {"settings": s.__dict__, "data": section.model_dump(),
                                                      "results": results})
                    save_plot(tmp / "plot.png", results)
                    continue
                subject = load_subject(spec, setting, s.quant, trust_remote_code=s.trust_remote_code, label=label,
                                       adapter=adapter)
                results[subject.label] = evaluate_one(subject, s, section, progress)
                del subject
                save_json(tmp / "results.json", {"settings": s.__dict__, "data": section.model_dump(),
                                                  "results": results})
                save_plot(tmp / "plot.png", results)
            stop_if_interrupted()  # a signal something swallowed (a __del__) still stops before the rename
        except KeyboardInterrupt:
            raise Interrupted(cut_short(tmp, output, len(results), len(todo))) from None
    return results


def cut_short(tmp: Path, output: Path, done: int, total: int) -> str:
    """Keep what an interrupted evaluation measured unless earlier results would go; say which."""
    if run.contents(output):
        return f"interrupted; the earlier results in {output} are kept as they were."
    if not done:
        return "interrupted before the first model was measured; nothing was written."
    run.publish(tmp)
    run.replace(tmp, output)
    return (f"interrupted after {done} of {total} models; their results are in {output} "
            "(run again with --overwrite for all).")


def save_plot(path: Path, results: dict) -> None:
    import matplotlib.pyplot as plt

    fig = figure(results)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --- reporting -----------------------------------------------------------------------------------------

def passkey_rows(results: dict):
    """(label, length, entry) for every passkey measurement."""
    for label, r in results.items():
        for length, entry in (r.get("passkey") or {}).items():
            yield label, int(length), entry


def marks(results: dict) -> dict[int, str]:
    """Lengths to mark on the perplexity axis: each base's trained length, and each length a model was
    extended to past it (a run's target)."""
    out = {}
    for r in results.values():
        trained, claimed = r.get("trained_len") or 0, r.get("max_len") or 0
        if trained:
            out[trained] = "trained length"
        if claimed > trained and out.get(claimed) != "trained length":
            out[claimed] = "target"
    return out


def figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    from . import tasks

    rows = list(passkey_rows(results))
    scored = any(r.get("tasks") for r in results.values())
    panels = 1 + bool(rows) + scored
    fig, axes = plt.subplots(1, panels, figsize=(1 + 5 * panels, 4), squeeze=False)
    left = axes[0][0]
    evaluated = set()
    for label, r in results.items():
        if "perplexity" not in r:
            continue
        lengths = sorted(int(k) for k in r["perplexity"])
        evaluated.update(lengths)
        left.plot(lengths, [r["perplexity"][str(n)] for n in lengths], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
             title="Perplexity with L tokens of context")
    # log axes ticked where something was measured, in plain numbers (not 3x10^2)
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    left.set_xticks(sorted(evaluated))
    left.xaxis.set_minor_locator(NullLocator())
    left.xaxis.set_major_formatter(plain)
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(NullFormatter())
    if evaluated:
        for length, what in marks(results).items():
            left.axvline(length, color="grey", linestyle="--", linewidth=1)
            left.annotate(f"{what} {length:,}", (length, 1), xycoords=("data", "axes fraction"), rotation=90,
                          ha="right", va="top", fontsize=7, color="grey")
    if rows:
        right = axes[0][1]
        for label, length, entry in rows:
            distances = sorted(int(k) for k in entry["accuracy"])
            right.plot(distances, [entry["accuracy"][str(d)] for d in distances], marker="o",
                       label=f"{label}, {length:,}-token prompt")
        right.set(xlabel="distance from the question (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05),
                  title="Passkey retrieval")
    if scored:
        tasks.plot(axes[0][-1], results)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tables(results: dict):
    """Perplexity by context length and passkey k_max, one row per model (and rope setting)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    measured = {label: r for label, r in results.items() if "perplexity" in r}
    lengths = sorted({int(n) for r in measured.values() for n in r["perplexity"]})
    context = {n: min(r["min_context"][str(n)] for r in measured.values() if str(n) in r["min_context"])
               for n in lengths}
    notes = [SCORED_RULE]
    if any(r.get("engine") == "llama.cpp" or isinstance(r.get("stride"), str) for r in measured.values()):
        from .llamacpp import PROTOCOL

        notes = [PROTOCOL]
    ppl = Table("model", *[f"{n:,}\n(ctx >= {context[n]:,})" for n in lengths], "scored tokens",
                title="perplexity with L tokens of context (the same tokens at every L)", title_justify="left")
    for label, r in measured.items():
        cells = [f"{r['perplexity'][str(n)]:.2f}" if str(n) in r["perplexity"] else "-" for n in lengths]
        if "-" in cells:
            notes.append(f"- {label}: not measured past its own length, {r['max_len']:,} (without --lengths each "
                         "model is measured up to its own length; --lengths measures all at the same lengths)")
        counts = sorted({v for v in r["scored_tokens"].values()})
        ppl.add_row(label, *cells, ", ".join(f"{c:,}" for c in counts))
    out = [ppl, Text("\n".join(notes), style="dim")] if measured else []
    rows = list(passkey_rows(results))
    unable = {label: r["passkey_unable"] for label, r in results.items() if r.get("passkey_unable")}
    if rows or unable:
        keys = Table("model", "prompt", "k_max", "accuracy by distance from the question", title="passkey retrieval",
                     title_justify="left")
        for label, length, entry in rows:
            acc = " ".join(f"{int(k):,}:{v:.0%}" for k, v in entry["accuracy"].items())
            keys.add_row(label, f"{length:,}", f"{entry['k_max']:,}", acc)
        for label, why in unable.items():
            keys.add_row(label, "-", "0", "not measured*")
        out.append(keys)
        if unable:
            out.append(Text("\n".join(f"* {label}: {why}" for label, why in unable.items()), style="dim"))
    if any(r.get("tasks") for r in results.values()):
        from . import tasks

        out.append(tasks.table(results))
    return Group(*out)


SCORED_RULE = ("Scored tokens: each model's perplexities at every L are of the same tokens, the ones that get "
               "at least L - stride tokens of context at its longest L; another longest L scores other tokens, "
               "so compare numbers within one table.")
