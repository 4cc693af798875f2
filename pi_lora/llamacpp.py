"""A GGUF file measured by llama.cpp itself: `pi-lora eval FILE.gguf --engine llama.cpp` and the check
`pi-lora export --format gguf --llamacpp-check` runs.

Only llama.cpp can say how llama.cpp reads a file (its rope keys, its tokenizer), so the figures come
from its own tools, fed the exact token ids pi-lora's transformers path uses:

- perplexity: `llama-perplexity --kl-divergence` reads its tokens from a file (the "base logits"
  file of its KL mode), so it scores our windows, not its own tokenization of a text. Its protocol
  scores the second half of each window: with L tokens, tokens L/2+1 .. L-1 are predicted, each with
  at least L/2 + 1 tokens of context; consecutive windows step by L/2 - 1, so the scored tokens are
  contiguous. The log-probabilities that file would hold for a reference model are not needed (only
  its tokens are read for our figure): the file is sparse, zeros.
- passkey: `llama-completion`, greedy, on the same prompts as evaluate.passkey_prompt, as text; its
  `--verbose-prompt` listing of the token ids it fed is checked equal to ours before an answer counts.

llama-cpp-python would give the same from Python, but it has no binary wheel on PyPI (its build is a
15-minute compile on 2 cores); the two tools come with every llama.cpp build. They are found in
$PI_LORA_LLAMA_CPP (a build's bin folder) or on PATH.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from .errors import PiLoraError

TOOLS = ("llama-perplexity", "llama-completion")
ENV = "PI_LORA_LLAMA_CPP"
# llama.cpp's logger writes from a thread that is never joined, so at exit its last lines (the result)
# can be lost on a busy machine; a preloaded library whose destructor waits a moment gives that
# thread the time (built once with the C compiler when there is one; nothing else changes).
LINGER_C = "#include <unistd.h>\n__attribute__((destructor)) static void linger(void) { usleep(300000); }\n"
# what llama.cpp's perplexity may differ from transformers' (fp32, the merged model) by, relative, per
# GGUF type: the type's rounding and llama.cpp's f16 KV cache; a missing or wrong rope scaling is
# off by far more past the base's length
PERPLEXITY_TOLERANCE = {"f32": 0.005, "f16": 0.01, "bf16": 0.02, "q8_0": 0.03}
CHECK_PROMPTS = 2  # passkey prompts of the export's check: keys at half and at the whole target length


def bin_dir() -> Path:
    """The folder holding llama.cpp's tools: $PI_LORA_LLAMA_CPP, else where PATH finds them."""
    folder = os.environ.get(ENV)
    found = Path(folder) if folder else None
    if found is None and shutil.which(TOOLS[0]):
        found = Path(shutil.which(TOOLS[0])).parent
    missing = [t for t in TOOLS if found is None or not (found / t).is_file()]
    if missing:
        raise PiLoraError(f"--engine llama.cpp runs llama.cpp's {' and '.join(missing)}: put a llama.cpp build's "
                          f"bin folder on PATH or in ${ENV}.")
    return found


def linger() -> str | None:
    """The preload library that keeps llama.cpp's last lines, built once; None without a C compiler."""
    from .demo import home

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    lib = home() / "llamacpp" / f"linger-{hashlib.sha256(LINGER_C.encode()).hexdigest()[:12]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        source = lib.with_suffix(".c")
        source.write_text(LINGER_C)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source)], capture_output=True)
        if built.returncode:
            return None
        tmp.replace(lib)
    return str(lib)


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """One of llama.cpp's tools, its output captured; a failure is one line with its last error."""
    env = dict(os.environ)
    preload = linger()
    if preload:
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD"), preload]))
    done = subprocess.run([str(bin_dir() / tool), *args], capture_output=True, text=True, errors="replace", env=env)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "failed" in line.lower()]
        raise PiLoraError(f"llama.cpp's {tool} failed (exit {done.returncode}): "
                          f"{(errors or done.stderr.strip().splitlines() or ['no output'])[-1].strip()}")
    return done


def threads() -> str:
    import torch

    return str(torch.get_num_threads())


# --- the GGUF ------------------------------------------------------------------------------------------

def fields(path: Path) -> dict:
    from .export import gguf_fields

    return {name: field.contents() for name, field in gguf_fields(path).items()
            if name.startswith(("llama.", "tokenizer.ggml.add_bos", "tokenizer.ggml.bos"))}


def describe_rope(path: Path) -> tuple[dict, int, int]:
    """The file's rope parameters (transformers' names), the length it claims and the one its base had."""
    from .export import gguf_rope

    f = fields(path)
    claimed = int(f.get("llama.context_length") or 0)
    original = int(f.get("llama.rope.scaling.original_context_length") or claimed)
    try:
        params = gguf_rope(path)
    except PiLoraError:  # llama3 frequencies as a tensor: llama.cpp reads them, transformers' names cannot
        params = {"rope_type": "llama3", "rope_freqs": "in the file"}
    return params, claimed, original


def vocab_size(path: Path) -> int:
    from .export import gguf_fields

    return len(gguf_fields(path)["tokenizer.ggml.tokens"].data)


def bos(path: Path) -> int | None:
    """The token llama-perplexity writes over each window's first one (files that add BOS), else None."""
    f = fields(path)
    return int(f["tokenizer.ggml.bos_token_id"]) if f.get("tokenizer.ggml.add_bos_token") else None


# --- perplexity --------------------------------------------------------------------------------------------

def windows(length: int, scored: int, end: int) -> list[tuple[int, int]]:
    """llama-perplexity's windows of `length` tokens ending at `end`, enough for `scored` tokens: each
    scores its last length/2 - 1 (those with at least length/2 + 1 of context), back to back."""
    step = length - 1 - length // 2
    if step < 1:
        raise PiLoraError(f"--engine llama.cpp scores the second half of each window; {length} tokens is too short.")
    count = max(1, math.ceil(scored / step))
    return [(end - length - i * step, end - i * step) for i in reversed(range(count))]


def span(lengths: list[int], scored: int) -> int:
    """Tokens needed so that every length's windows fit, all ending at the same token."""
    return max(length + (len(windows(length, scored, 0)) - 1) * (length - 1 - length // 2) for length in lengths)


def tokens_file(path: Path, chunks: list[list[int]], n_vocab: int) -> None:
    """The file llama-perplexity's KL mode reads: '_logits_', n_ctx, n_vocab, n_chunk, the tokens,
    then per chunk its reference log-probabilities (uint16, n_vocab rounded up to even + 4): left as
    a hole, read back as zeros, since only the tokens matter here."""
    n_ctx = len(chunks[0])
    rows = n_ctx - 1 - n_ctx // 2
    width = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, len(chunks)))
        for chunk in chunks:
            f.write(struct.pack(f"<{n_ctx}i", *chunk))
        f.truncate(f.tell() + len(chunks) * rows * width * 2)


def scored_windows(tokens, length: int, scored: int, first_token: int | None) -> list[list[int]]:
    chunks = [list(map(int, tokens[b:e])) for b, e in windows(length, scored, len(tokens))]
    if first_token is not None:  # what llama-perplexity does to a file that adds BOS, done here for both engines
        for chunk in chunks:
            chunk[0] = first_token
    return chunks


def gguf_perplexity(gguf: Path, chunks: list[list[int]]) -> float:
    """llama.cpp's perplexity of each chunk's second half (tokens n/2+1 .. n-1), over all chunks."""
    length = len(chunks[0])
    with tempfile.TemporaryDirectory(prefix=".pi-lora-llamacpp-") as folder:
        ids = Path(folder) / "tokens.kld"
        tokens_file(ids, chunks, vocab_size(gguf))
        done = run_tool("llama-perplexity", "-m", str(gguf), "--kl-divergence-base", str(ids), "--kl-divergence",
                        "-c", str(length), "-b", str(min(length, 2048)), "-t", threads(), "--no-warmup")
    found = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+|nan|inf)", done.stdout)
    last = re.findall(rf"^\s*{len(chunks)}\s+([0-9.]+|nan|inf|-nan)\s+±", done.stdout, re.MULTILINE)
    value = found.group(1) if found else (last[-1] if last else None)
    if value is None:
        raise PiLoraError(f"llama-perplexity printed no perplexity for '{gguf}' at {length:,} tokens.")
    return float(value)


def transformers_perplexity(net, chunks: list[list[int]]) -> float:
    """The same figure in transformers: the NLL of each chunk's tokens n/2+1 .. n-1."""
    import torch

    from .evaluate import token_nll

    device = next(net.parameters()).device
    total, count = 0.0, 0
    for chunk in chunks:
        n = len(chunk)
        nll = token_nll(net, torch.tensor(chunk, device=device))[n // 2 : n - 1]
        total, count = total + float(nll.double().sum()), count + len(nll)
    return math.exp(total / count)


def perplexity_part(measure, tokenizer, lengths: list[int], scored: int, section, first_token, progress=None) -> dict:
    """evaluate's perplexity entries, by llama-perplexity's protocol, `measure(chunks)` giving the figure."""
    from .evaluate import eval_tokens

    tokens = eval_tokens(section, tokenizer, span(lengths, scored))
    task = progress.add_task("perplexity", total=len(lengths), info="") if progress else None
    out = {"perplexity": {}, "scored_tokens": {}, "min_context": {}}
    for length in lengths:
        chunks = scored_windows(tokens, length, scored, first_token)
        out["perplexity"][str(length)] = measure(chunks)
        out["scored_tokens"][str(length)] = len(chunks) * (length - 1 - length // 2)
        out["min_context"][str(length)] = length // 2 + 1
        if progress:
            progress.advance(task)
    return {**out, "tokens": len(tokens), "stride": "length/2 - 1 (llama-perplexity's protocol)"}


# --- passkey ----------------------------------------------------------------------------------------------

def completion(gguf: Path, tokenizer, prompt: list[int], new_tokens: int) -> str:
    """llama.cpp's greedy answer to `prompt`, which it must have read as exactly these ids."""
    with tempfile.TemporaryDirectory(prefix=".pi-lora-llamacpp-") as folder:
        text = Path(folder) / "prompt.txt"
        text.write_bytes(tokenizer.decode(prompt).encode())
        done = run_tool("llama-completion", "-m", str(gguf), "-f", str(text), "-n", str(new_tokens), "--temp", "0",
                        "-c", str(len(prompt) + new_tokens), "-no-cnv", "--no-display-prompt", "--verbose-prompt",
                        "--no-escape", "--no-warmup", "-t", threads())
    # "    385 -> 'Th'" per token, after the logger's time and level ("0.00.012.780 I ")
    fed = [int(m) for m in re.findall(r"^(?:[\d.]+ [A-Z] )?\s*(\d+) -> '", done.stderr, re.MULTILINE)]
    if fed != list(prompt):
        at = next((i for i, (a, b) in enumerate(zip(fed, prompt)) if a != b), min(len(fed), len(prompt)))
        raise PiLoraError(f"llama.cpp tokenizes the passkey prompt differently from transformers ({len(fed):,} vs "
                          f"{len(prompt):,} tokens, first difference at token {at:,}), so its answers are not "
                          f"comparable; check the GGUF's tokenizer.")
    return done.stdout


def passkey_accuracy(answer, tokenizer, length: int, distances: list[int], trials: int, seed: int = 0,
                     progress=None) -> dict[int, float]:
    """evaluate.passkey_accuracy's keys and prompts (one seed), answered by `answer(prompt)`."""
    from .evaluate import passkey_found, passkey_prompt

    rng = random.Random(seed)
    task = progress.add_task(f"passkey {length:,}", total=len(distances) * trials, info="") if progress else None
    result = {}
    for distance in distances:
        hits = 0
        for _ in range(trials):
            prompt, key = passkey_prompt(tokenizer, length, distance, rng.randint(10000, 99999))
            hits += passkey_found(answer(prompt), key)
            if progress:
                progress.advance(task)
        result[distance] = hits / trials
    return result


def passkey_part(gguf: Path, tokenizer, s, lengths: list[int], progress=None) -> dict:
    from .evaluate import ANSWER_TOKENS, distances_for, effective_window

    out = {}
    for length in s.passkey_lengths or lengths[-1:]:
        distances = distances_for(length, s.distances)
        accuracy = passkey_accuracy(lambda p: completion(gguf, tokenizer, p, ANSWER_TOKENS), tokenizer, length,
                                    distances, s.trials, progress=progress)
        out[str(length)] = {"trials": s.trials, "accuracy": {str(k): v for k, v in accuracy.items()},
                            "k_max": effective_window(accuracy)}
    return out


# --- eval --engine llama.cpp --------------------------------------------------------------------------------

def evaluate_gguf(spec: str, s, section, progress=None) -> dict:
    """A .gguf file under llama.cpp: perplexity by llama-perplexity's protocol and passkey, as
    evaluate.evaluate_one reports them (the same keys, the same table and plot)."""
    from . import model
    from .evaluate import default_lengths

    path = Path(spec)
    if path.suffix != ".gguf" or not path.is_file():
        raise PiLoraError(f"--engine llama.cpp runs .gguf files; '{spec}' is not one.")
    bin_dir()
    params, claimed, original = describe_rope(path)
    tokenizer = model.load_tokenizer(spec)
    lengths = sorted(s.lengths or default_lengths(claimed, min(2048, original)))
    result = {"max_len": claimed, "trained_len": original, "rope": params, "engine": "llama.cpp", "quant": "gguf"}
    if s.perplexity:
        result.update(perplexity_part(lambda chunks: gguf_perplexity(path, chunks), tokenizer, lengths, s.scored,
                                      section, bos(path), progress))
    if s.passkey:
        result["passkey"] = passkey_part(path, tokenizer, s, lengths, progress)
    return result


def gguf_label(spec: str) -> str:
    return f"{spec} (llama.cpp)"


PROTOCOL = ("--engine llama.cpp: llama-perplexity's protocol at every L: windows of L tokens with their second half "
            "scored (ctx >= L/2 + 1), back to back, ending at the same token; the tokens scored differ between "
            "lengths, not between models.")


# --- export's check ---------------------------------------------------------------------------------------

def check_export(merged: Path, gguf: Path, meta: dict, outtype: str, scored: int = 1024,
                 prompts: int = CHECK_PROMPTS, progress=None) -> str:
    """The GGUF in llama.cpp against the merged model in transformers, at the run's target length:
    perplexity on the same windows of a text (within PERPLEXITY_TOLERANCE[outtype]) and passkey answers
    to the same prompts (found alike in every one). Returns what was checked; a mismatch is a
    PiLoraError naming the figure (and a GGUF whose rope setting is not the run's, by name)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo import TEXT
    from .evaluate import ANSWER_TOKENS, distances_for, passkey_found, passkey_prompt, token_ids

    bin_dir()
    length = meta["target_len"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    net = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    net.config.use_cache = True
    text = TEXT.read_text()
    ids = token_ids(tokenizer, text)
    need = span([length], scored)
    tokens = (ids * (need // len(ids) + 1))[:need]  # the demo's text, repeated when the length asks for more
    chunks = scored_windows(tokens, length, scored, bos(gguf))
    task = progress.add_task("llama.cpp check", total=2 + 2 * prompts, info="") if progress else None
    step = (lambda: progress.advance(task)) if progress else (lambda: None)
    got = gguf_perplexity(gguf, chunks)
    step()
    want = transformers_perplexity(net, chunks)
    step()
    rope_note = rope_mismatch(gguf, meta)
    limit = PERPLEXITY_TOLERANCE[outtype]
    if not abs(got / want - 1) <= limit or rope_note:
        raise PiLoraError(f"llama.cpp check failed: perplexity at {length:,} tokens is {got:.3f} in llama.cpp, "
                          f"{want:.3f} in transformers (limit {limit:.1%})" + (f"; {rope_note}" if rope_note else ""))
    rng = random.Random(0)
    agree = 0
    for distance in distances_for(length, prompts):
        prompt, key = passkey_prompt(tokenizer, length - ANSWER_TOKENS, distance, rng.randint(10000, 99999))
        theirs = passkey_found(completion(gguf, tokenizer, prompt, ANSWER_TOKENS), key)
        step()
        with torch.no_grad():
            ours_ids = net.generate(input_ids=torch.tensor([prompt]), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)[0, len(prompt):]
        ours = passkey_found(tokenizer.decode(ours_ids), key)
        step()
        if theirs != ours:
            raise PiLoraError(f"llama.cpp check failed: passkey at distance {distance:,} of a {length - ANSWER_TOKENS:,}"
                              f"-token prompt is {'found' if theirs else 'missed'} by llama.cpp, "
                              f"{'found' if ours else 'missed'} by transformers.")
        agree += ours
    return (f"llama.cpp: perplexity {got:.3f} at {length:,} tokens (transformers {want:.3f}, within {limit:.1%}); "
            f"passkey answered alike in {prompts} prompts ({agree} found)")


def rope_mismatch(gguf: Path, meta: dict) -> str | None:
    """What the GGUF's rope keys say if it is not the run's setting (e.g. its scaling was removed)."""
    params, _, _ = describe_rope(gguf)
    want = meta["rope_parameters"]
    same = [params.get("rope_type", "default") == want.get("rope_type", "default"),
            math.isclose(float(params.get("factor", 1)), float(want.get("factor", 1))),
            math.isclose(float(params.get("rope_theta", 0)), float(want.get("rope_theta", 0)))]
    if all(same):
        return None
    has = "no rope scaling" if params.get("rope_type") == "default" else f"rope scaling {params.get('rope_type')} " \
                                                                          f"x{params.get('factor', 1):g}"
    return (f"the GGUF has {has}, the run was trained with {want.get('rope_type')} x{float(want.get('factor', 1)):g} "
            f"(llama.cpp reads positions past {meta['original_len']:,} as the base never saw them)")
