"""`pi-lora eval`: did the extension work? The PI paper's two measures on the user's own model.

Perplexity at several lengths by sliding window (stride 256 as the paper), scoring only the tokens
new to each window, plus perplexity by position inside full windows (where a model breaks).
Passkey retrieval (the paper's prompt) gives the effective context window.

The LM head and the loss run in chunks of positions, so no (length x vocab) float32 logits exist.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model, rope, run
from .loss import parts
from .errors import PiLoraError, first_line

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Subject:
    """A model under evaluation, with the length it claims."""

    label: str
    net: object
    tokenizer: object
    max_len: int
    notes: dict = field(default_factory=dict)


def parse_rope(text: str | None) -> float | None:
    """`none` -> 1.0 (plain RoPE), `linear:S` -> S, None -> keep the checkpoint's setting."""
    if text is None:
        return None
    if text == "none":
        return 1.0
    kind, _, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if kind != "linear" or value < 1:
        raise PiLoraError(f"--rope must be 'none' or 'linear:S' with S >= 1, not '{text}'.")
    return value


def set_rope(config, factor: float) -> None:
    """Plain RoPE (factor 1) or linear PI by `factor`, keeping rope_theta and the trained length."""
    length = rope.original_len(config)
    theta = float(rope.rope_parameters_of(config)["rope_theta"])
    if factor == 1.0:
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        config.max_position_embeddings = length
    else:
        rope.apply(config, rope.Interpolation(length, round(length * factor), factor, "linear", theta))


def load_subject(spec: str, rope_text: str | None = None, on: torch.device | None = None) -> Subject:
    """A run folder (base + adapter), a merged or plain model folder, a hub id or alias, or a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    on = on or model.device()
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    path = Path(spec)
    factor = parse_rope(rope_text)
    adapter = None
    is_run = (path / run.RECIPE).is_file() and (path / run.META).is_file()
    if is_run and not (path / run.ADAPTER / "adapter_config.json").is_file():
        raise PiLoraError(f"run '{spec}' has no adapter yet (unfinished); finish it with pi-lora train --resume.")
    if is_run:
        meta = run.read_meta(path)
        where, adapter = model.locate(meta.get("base_path") or meta["base"]), path / run.ADAPTER
        config = AutoConfig.from_pretrained(where)
        config.rope_parameters = dict(meta["rope_parameters"])
        config.max_position_embeddings = meta["target_len"]
    else:
        where = model.locate(spec)
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as e:
            raise PiLoraError(f"cannot load model '{spec}': {first_line(e)}") from e
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        raise PiLoraError(f"'{spec}' is model_type '{config.model_type}'; eval supports LLaMA-layout models.")
    if factor is not None:
        set_rope(config, factor)
    try:
        net = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype).to(on)
    except (OSError, ValueError) as e:
        raise PiLoraError(f"cannot load the weights of '{spec}': {first_line(e)}") from e
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    label = f"{spec} (rope {rope_text})" if rope_text else spec
    return Subject(label, net.eval(), AutoTokenizer.from_pretrained(where), config.max_position_embeddings)


@torch.no_grad()
def token_nll(net, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """NLL of ids[1:] given the prefix, one value per predicted token, with the head run in chunks."""
    decoder, head = parts(net)
    hidden = decoder(input_ids=ids[None]).last_hidden_state[0]
    out = []
    for i in range(0, len(ids) - 1, chunk):
        logits = head(hidden[i : min(i + chunk, len(ids) - 1)]).float()
        target = ids[i + 1 : i + 1 + len(logits)]
        out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    return torch.cat(out)


def window_nll(net, tokens: torch.Tensor):
    """NLL of a window [begin, end) of `tokens`, remembered: lengths and position bins share windows."""
    import functools

    device = next(net.parameters()).device

    @functools.lru_cache(maxsize=None)
    def nll(begin: int, end: int) -> torch.Tensor:
        return token_nll(net, tokens[begin:end].to(device)).double().cpu()

    return nll


def sliding_perplexity(net, tokens: torch.Tensor, length: int, stride: int = 256, nll=None) -> tuple[float, int]:
    """Perplexity over `tokens` with windows of `length` whose ends advance by `stride`.

    Each token is scored once, in the first window that ends at or after it, so after the first
    window every token sees at least length - stride tokens of context. The last window ends at the
    end of the data and is still full length (no short, context-poor window at the edge). A stride of
    `length` or more is taken as length - 1: windows must overlap by one token for each to be scored.
    """
    nll = nll or window_nll(net, tokens)
    stride = min(stride, length - 1)
    total, count, scored_to = 0.0, 0, 1  # tokens[0] has no prediction
    end = min(length, len(tokens))
    while scored_to < len(tokens):
        begin = max(0, end - length)
        new = nll(begin, end)[scored_to - begin - 1 :]  # nll[j] predicts token begin + j + 1
        total += new.sum().item()
        count += len(new)
        scored_to = end
        end = min(end + stride, len(tokens))
    return math.exp(total / count), count


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


def passkey_prompt(tokenizer, length: int, depth: int, key: int) -> tuple[list[int], str]:
    """The paper's passkey prompt, `length` tokens long, with the key's sentence at token `depth`."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head, info, question = bos + ids(TASK + " "), ids(f" The pass key is {key}. Remember it. {key} is the pass key. "), ids(" " + QUESTION)
    filler = ids(" " + FILLER)
    room = length - len(head) - len(info) - len(question)
    if room < 0:
        raise PiLoraError(f"a passkey prompt needs at least {length - room} tokens; {length} is too short.")
    before = min(max(depth - len(head), 0), room)
    fill = (filler * (room // len(filler) + 2))
    prompt = head + fill[:before] + info + fill[before : room] + question
    return prompt, str(key)


def passkey_found(generated: str, key: str) -> bool:
    """Exactly the key: the first number in the answer is the key."""
    import re

    match = re.search(r"\d+", generated)
    return bool(match) and match.group(0) == key


@torch.no_grad()
def passkey_accuracy(net, tokenizer, length: int, depths: list[int], trials: int, seed: int = 0,
                     progress=None) -> dict[int, float]:
    rng = random.Random(seed)
    task = progress.add_task("passkey", total=len(depths) * trials) if progress else None
    device = next(net.parameters()).device
    result = {}
    for depth in depths:
        hits = 0
        for _ in range(trials):
            key = rng.randint(10000, 99999)
            prompt, answer = passkey_prompt(tokenizer, length, depth, key)
            ids = torch.tensor([prompt], device=device)
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, pad_token_id=tokenizer.eos_token_id)
            hits += passkey_found(tokenizer.decode(out[0, len(prompt):]), answer)
            if progress:
                progress.advance(task)
        result[depth] = hits / trials
    return result


def effective_window(accuracy: dict[int, float], threshold: float = 0.2) -> int:
    """The paper's k_max: the largest k such that every k' <= k succeeds in at least 20% of trials."""
    best = 0
    for depth in sorted(accuracy):
        if accuracy[depth] < threshold:
            break
        best = depth
    return best


def save_json(path: Path, data: dict) -> None:
    run.write_json(path, json.loads(json.dumps(data, default=str)))


def eval_tokens(section, tokenizer, need: int) -> torch.Tensor:
    """The first `need` tokens of the data (documents framed with BOS/EOS, as in training)."""
    from . import data
    from .demo import home

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


def depths_for(length: int, count: int) -> list[int]:
    """Key positions spread over the window, from near the start to near the question."""
    return sorted({max(1, round(length * (i + 0.5) / count)) for i in range(count)})


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        lengths = sorted(int(k) for k in r["perplexity"])
        left.plot(lengths, [r["perplexity"][str(n)] for n in lengths], marker="o", label=label)
        if r.get("passkey"):
            depths = sorted(int(k) for k in r["passkey"]["accuracy"])
            right.plot(depths, [r["passkey"]["accuracy"][str(d)] for d in depths], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
             title="Perplexity by length (sliding window)")
    right.set(xlabel="passkey position (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05), title="Passkey retrieval")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Settings:
    lengths: list[int] | None  # None: powers of two up to each model's length
    stride: int = 256
    windows: int = 8  # windows at the longest length: tokens = longest + stride * (windows - 1)
    trials: int = 5
    depths: int = 8
    passkey: bool = True
    rope: str | None = None


def evaluate_one(subject: Subject, s: Settings, section, progress=None) -> dict:
    lengths = s.lengths or default_lengths(subject.max_len)
    longest = max(lengths)
    tokens = eval_tokens(section, subject.tokenizer, max(longest + s.stride * (s.windows - 1), longest))
    task = progress.add_task(f"perplexity {subject.label}", total=len(lengths)) if progress else None
    ppl, nll = {}, window_nll(subject.net, tokens)
    for n in lengths:
        # the same tokens at every length, as the paper compares lengths on the same documents
        ppl[str(n)], _ = sliding_perplexity(subject.net, tokens, n, s.stride, nll)
        if progress:
            progress.advance(task)
    bins = max(1, longest // 2048) if longest >= 4096 else 4
    by_position = position_perplexity(subject.net, tokens, longest, bins, nll)
    width = longest // bins
    result = {
        "max_len": subject.max_len,
        "perplexity": ppl,
        "by_position": {f"{i * width}-{(i + 1) * width}": v for i, v in enumerate(by_position)},
        "tokens": len(tokens),
    }
    if s.passkey:
        depths = depths_for(longest, s.depths)
        accuracy = passkey_accuracy(subject.net, subject.tokenizer, longest, depths, s.trials, progress=progress)
        result["passkey"] = {"length": longest, "trials": s.trials, "accuracy": {str(k): v for k, v in accuracy.items()},
                             "k_max": effective_window(accuracy)}
    return result


def evaluate(specs: list[str], s: Settings, section, output: Path, progress=None) -> dict:
    """Every model in `specs`, side by side; writes results.json and plot.png to `output`."""
    results = {}
    for spec in specs:
        subject = load_subject(spec, s.rope)
        results[subject.label] = evaluate_one(subject, s, section, progress)
        del subject
    output.mkdir(parents=True, exist_ok=True)
    save_json(output / "results.json", {"settings": s.__dict__, "data": section.model_dump(), "results": results})
    plot(output / "plot.png", results)
    return results


def tables(results: dict):
    """Perplexity by length and passkey k_max, one row per model."""
    from rich.console import Group
    from rich.table import Table

    lengths = sorted({int(n) for r in results.values() for n in r["perplexity"]})
    ppl = Table("model", *[f"{n:,}" for n in lengths], title="perplexity by length", title_justify="left")
    for label, r in results.items():
        ppl.add_row(label, *[f"{r['perplexity'][str(n)]:.2f}" if str(n) in r["perplexity"] else "-" for n in lengths])
    parts_ = [ppl]
    if any("passkey" in r for r in results.values()):
        keys = Table("model", "length", "k_max", "accuracy by position", title="passkey retrieval", title_justify="left")
        for label, r in results.items():
            p = r.get("passkey")
            if p:
                acc = " ".join(f"{k}:{v:.0%}" for k, v in p["accuracy"].items())
                keys.add_row(label, f"{p['length']:,}", f"{p['k_max']:,}", acc)
        parts_.append(keys)
    return Group(*parts_)
