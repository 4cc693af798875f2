"""`pi-lora eval --tasks`: lm-evaluation-harness tasks (RULER's among them) on the model eval built.

The harness is used as it ships: its task definitions, its prompts, its scoring, through its Python
API (`lm_eval.simple_evaluate` with an `HFLM` wrapping the model object pi-lora loaded: the run's
base + adapter under its rope setting, a merged folder, a base under `--scaling`). Nothing of it is
copied here; this module only picks the lengths, the number of samples, and reads the scores back.

RULER's tasks build their prompts from a tokenizer, sized to each length in
`metadata={"max_seq_lengths": [...]}`. The harness's `limit` counts samples per task, not per
length, and a task lists its lengths one after the other, so a limit with several lengths would
measure the first length only: each length is one harness call here, `limit` samples each.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile

from .errors import PiLoraError, first_line

EXTRA = 'pip install "pi-lora[ruler]"'
VERSIONS = ">=0.4.13,<0.5"  # as pyproject's extra: the RULER task names and metrics of 0.4.13
# RULER tasks that build every prompt from the tokenizer alone: they run offline.
OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# RULER tasks that fetch their text on first use (then the hub's cache serves them).
DOWNLOADS = {
    "niah_single_2": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_single_3": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multikey_1": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multiquery": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multivalue": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "ruler_qa_squad": "SQuAD 2.0 (rajpurkar.github.io)",
    "ruler_qa_hotpot": "HotpotQA (huggingface.co, dataset namlh2004/hotpotqa)",
    "ruler": "Paul Graham's essays, SQuAD 2.0 and HotpotQA (the whole group)",
}
HEADROOM = 256  # tokens the harness may add to a prompt of L tokens: its generation (RULER: <= 128)


def harness():
    """lm_eval, or one line saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise PiLoraError(f"--tasks runs lm-evaluation-harness, which is not installed: {EXTRA}") from None
    return lm_eval, HFLM


def parse_tasks(text: str | None) -> list[str]:
    """`niah_single_1,ruler_vt` -> the names, checked against the harness's tasks before any model loads."""
    if not text:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    harness()
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PiLoraError(f"--tasks: no lm-evaluation-harness task named {', '.join(unknown)} "
                          f"(RULER's that run offline: {', '.join(OFFLINE)}).")
    return names


def score_of(metrics: dict, length: int) -> tuple[str, float]:
    """The task's figure at `length`: RULER reports one metric per length, named by it; another task
    its first metric (the harness names them 'acc,none', 'exact_match,strict-match'...)."""
    if f"{length},none" in metrics:
        return str(length), float(metrics[f"{length},none"])
    for key, value in metrics.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key.split(",")[0], float(value)
    raise PiLoraError(f"the harness returned no score: {sorted(metrics)}")


def task_part(subject, tasks: list[str], lengths: list[int], limit: int, progress=None) -> dict:
    """{task: {"metric", "samples", "score": {L: value}}}: each task at each length, `limit` samples."""
    lm_eval, _ = harness()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings are about this use (a model object, L-named metrics)
    out = {name: {"metric": None, "samples": {}, "score": {}} for name in tasks}
    # RULER loads its sizing tokenizer by name; this one is the very tokenizer pi-lora loaded (a
    # revision, a .gguf base), saved where the harness can find it offline.
    with tempfile.TemporaryDirectory(prefix=".pi-lora-tokenizer-") as folder:
        subject.tokenizer.save_pretrained(folder)
        for length in lengths:
            lm = measured_lm(subject, length, progress)
            results = run_harness(lm_eval, lm, tasks, length, limit, folder, progress)
            for name in tasks:
                metric, value = score_of(results["results"][name], length)
                out[name]["metric"] = "L" if metric == str(length) else metric  # RULER: named by the length
                out[name]["score"][str(length)] = value
                out[name]["samples"][str(length)] = int(results["results"][name].get("sample_len") or limit)
    return out


def measured_lm(subject, length: int, progress=None):
    """The harness's own HF model (HFLM) around the model pi-lora built, its generation requests counted
    on pi-lora's progress display instead of the harness's tqdm bar (a subclass: the harness's
    documented way to adapt its model; nothing of it is patched)."""
    _, HFLM = harness()

    # shown from the start: the harness first builds its samples (RULER: 500 per task, whatever the
    # limit), a minute or more at 8k, and only then asks for generations
    bar = progress.add_task(f"tasks at {length:,} (building prompts)", total=None, info="") if progress else None

    class Counted(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            if progress is not None:
                progress.update(bar, description=f"tasks at {length:,}", total=len(requests), completed=0)
            return super().generate_until(requests, disable_tqdm=progress is not None)

        def _model_generate(self, context, *args, **kwargs):
            made = super()._model_generate(context, *args, **kwargs)
            if progress is not None:
                progress.advance(bar, context.shape[0])
            return made

    with tied_as_loaded(subject.net):
        return Counted(pretrained=subject.net, tokenizer=subject.tokenizer, batch_size=1, max_length=length + HEADROOM)


@contextlib.contextmanager
def tied_as_loaded(net):
    """HFLM ties the model's weights again when it is made. The model pi-lora loaded is tied already,
    and a run that trains a tied embedding (SmolLM2) holds the embedding and the head in peft wrappers
    whose `weight` transformers' tie cannot set (KeyError "attribute 'weight' already exists"): that
    one call is skipped on this model object, and only while HFLM is made."""
    net.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del net.tie_weights


def run_harness(lm_eval, lm, tasks: list[str], length: int, limit: int, tokenizer: str, progress=None) -> dict:
    """One call of the harness at one length. What it prints (RULER's haystack sizing and sample bars,
    nltk's failed download offline) is dropped; a task whose text cannot be fetched is named, in one line."""
    try:
        with harness_output_dropped(progress):
            return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=0,
                                           metadata={"max_seq_lengths": [length], "tokenizer": tokenizer})
    except OSError as e:  # datasets' and requests' ConnectionError are OSErrors
        fetching = [name for name in tasks if name in DOWNLOADS]
        if not fetching:
            raise
        what = "; ".join(f"{name} downloads {DOWNLOADS[name]}" for name in fetching)
        raise PiLoraError(f"--tasks: {what}, and that failed ({first_line(e)}); the tasks that run offline "
                          f"are {', '.join(OFFLINE)}.") from None
    except ValueError as e:  # the harness's word on its input: RULER's "no room at max_seq_length=..."
        raise PiLoraError(f"--tasks at {length:,} tokens: {first_line(e)}") from None


@contextlib.contextmanager
def harness_output_dropped(progress=None):
    """sys.stdout and sys.stderr to nowhere while the harness runs, except for pi-lora's own progress
    display: its console is held to the stream it drew on (rich resolves sys.stdout at each write
    unless given a file) and let go after."""
    console = progress.console if progress is not None else None
    held = console._file if console is not None else None  # None: rich follows sys.stdout
    drawn_on = console.file if console is not None else None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if console is not None:
            console.file = drawn_on
        try:
            yield
        finally:
            if console is not None:
                console.file = held


def rows(results: dict):
    """(model label, task, {L: score}, samples) for every task measured."""
    for label, r in results.items():
        for name, entry in (r.get("tasks") or {}).items():
            yield label, name, entry


def table(results: dict):
    """One row per model and task, a column per length: the harness's score (RULER: the share of
    the expected answers found in the model's answer)."""
    from rich.table import Table

    entries = list(rows(results))
    lengths = sorted({int(n) for _, _, entry in entries for n in entry["score"]})
    out = Table("model", "task", *[f"{n:,}" for n in lengths], "samples",
                title="lm-evaluation-harness tasks: score with an L-token prompt", title_justify="left")
    for label, name, entry in entries:
        cells = [shown(entry["score"].get(str(n))) for n in lengths]
        out.add_row(label, name, *cells, ", ".join(sorted({f"{v:,}" for v in entry["samples"].values()})))
    return out


def shown(value) -> str:
    return "-" if value is None or value < 0 else f"{value:.0%}"  # the harness's -1: no sample at L


def plot(ax, results: dict) -> None:
    """Each model's mean score over its tasks, by length (the table has each task)."""
    for label, r in results.items():
        entries = list((r.get("tasks") or {}).values())
        if not entries:
            continue
        lengths = sorted({int(n) for entry in entries for n in entry["score"]})
        means = [sum(max(e["score"].get(str(n), 0.0), 0.0) for e in entries) / len(entries) for n in lengths]
        ax.plot(lengths, means, marker="o", label=f"{label}, mean of {len(entries)}")
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="score", ylim=(-0.05, 1.05),
           title="lm-evaluation-harness tasks")
    ax.set_xticks(sorted({int(n) for _, _, e in rows(results) for n in e["score"]}))
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.minorticks_off()
