"""The `pi-lora` command: parse, call one function, map known errors to exit codes."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from . import __version__
from . import console as console_mod
from . import recipe as recipes_mod
from .console import ERROR, progress_bar
from .errors import Interrupted, OutOfMemory, PiLoraError, first_line, interrupted, interrupts


class _Switches:
    """typer prints "<bool>" after every switch (--resume <bool>, --help <bool>), which reads as if it
    took a value: a switch gets an empty metavar, so its help row shows no value type."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_Switches, TyperCommand):
    pass


class Group(_Switches, TyperGroup):
    pass


app = typer.Typer(
    cls=Group,
    help="Extend a RoPE model's context window by Position Interpolation, training LoRA on a 4-bit base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(cls=Group, help="List, show and validate recipes.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")
console = Console()
err_console = Console(stderr=True)

# First-class flags and the recipe key each one sets (the flag is the key's leaf name).
FLAG_KEYS = {
    "base": "model.base",
    "target_len": "rope.target_len",
    "scaling": "rope.scaling",
    "train_len": "rope.train_len",
    "source": "data.source",
    "output": "output",
    "steps": "train.steps",
    "lr": "train.lr",
    "rank": "lora.rank",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "seed": "train.seed",
    "trust_remote_code": "model.trust_remote_code",
    "gpu_mem": "train.gpu_mem",
    "gpus": "model.gpus",
    "shard": "model.shard",
}
# what --help says of a flag's default where the recipe has none to give
NO_DEFAULT = {"model.base": "required, from this flag or the recipe",
              "rope.target_len": "required, from this flag or the recipe",
              "output": "the recipe's, else runs/<base name>-<target_len>",
              "train.gpu_mem": "the recipe's, else what the device has",
              "rope.train_len": "the recipe's, else the target length",
              "rope.scaling": "the recipe's, else yarn (a scaled base: its own kind)"}


def recipe_flag(key: str, text: str) -> str:
    """A first-class flag's help: what it sets, its recipe key, and where its default comes from."""
    if key in NO_DEFAULT:
        default = NO_DEFAULT[key]
    else:
        value = recipes_mod.leaves(recipes_mod.Recipe().model_dump(mode="json"))[key]
        default = f"the recipe's, else {value}"
    return f"{text} Recipe key: {key}. \\[default: {default}]"


def show_version(value: bool) -> None:
    if value:
        print(f"pi-lora {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Extend a RoPE model's context window by Position Interpolation, training LoRA on a 4-bit base."""


def handled(command):
    """Known errors become a message and their exit code; nothing else is swallowed. Under torchrun
    every rank meets the same error: rank 0 says it, once."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with interrupts():
                quiet()  # here, not at start-up: --help must not import transformers (a second or more)
                try:
                    return command(*args, **kwargs)
                except Exception as e:
                    if interrupted() and not isinstance(e, PiLoraError):  # a library's error made of the signal
                        raise KeyboardInterrupt from None
                    raise
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1
            say("[bold red]interrupted[/]; what was there before is as it was.")
            raise typer.Exit(Interrupted.exit_code) from None
        except PiLoraError as e:
            say(f"{ERROR} {escape(str(e))}")  # a message is text: 'pi-lora[ruler]' is no markup
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a full disk, a folder that cannot be written: one line, not a traceback
            where = f": '{e.filename}'" if e.filename else ""
            say(f"{ERROR} {e.strerror or first_line(e)}{where}")
            raise typer.Exit(2) from None
        except RuntimeError as e:  # out of memory outside training (eval, merge, export): exit 3, not a crash
            import torch

            if not isinstance(e, torch.OutOfMemoryError):
                raise
            say(f"{ERROR} out of memory ({first_line(e)}); eval uses less with shorter --lengths.")
            raise typer.Exit(OutOfMemory.exit_code) from None

    return wrapper


def say(message: str) -> None:
    """An error line on stderr, from rank 0 only."""
    from .world import current  # no torch: it may be the import a Ctrl-C stopped

    if current().main:
        console_mod.say(err_console, message)


def print_overrides(overrides: dict) -> None:
    table = console_mod.table("key", "value", "from", title="settings that differ from the defaults")
    for key, (value, origin) in overrides.items():
        table.add_row(key, repr(value), origin)
    console.print(table)


# What a resumed run may change: how long it runs and how it logs, never what it computes.
RESUMABLE = {"train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "output",
             "train.eval_every", "train.eval_sequences", "train.report_to"}


def recorded_recipe(folder: Path, checkpoint) -> tuple[dict, str]:
    """What the run computed with, and where that was recorded: the checkpoint it resumes from, else
    pi_lora.json. Never recipe.yaml, which anyone may have edited since."""
    from . import run

    if checkpoint is not None and checkpoint[1].get("recipe"):
        return checkpoint[1]["recipe"], f"checkpoint {checkpoint[0].name}"
    meta = run.read_meta(folder)
    if not isinstance(meta.get("recipe"), dict):
        raise PiLoraError(f"'{folder / run.META}' records no recipe (a run of an older pi-lora): resuming it "
                          "cannot be checked against what it computed. Start a new run.")
    return meta["recipe"], run.META


def check_resume_changes(recorded: dict, where: str, resolved) -> None:
    """Refuse every change to what the run computes, naming the key, its old and its new value."""
    # a setting newer than the run was recorded with has its default there
    saved = {**recipes_mod.leaves(recipes_mod.Recipe().model_dump(mode="json")), **recipes_mod.leaves(recorded)}
    now = recipes_mod.leaves(resolved.model_dump(mode="json"))
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
               if now[k] != saved.get(k) and k not in RESUMABLE]
    if resolved.train.schedule == "cosine" and now["train.steps"] != saved.get("train.steps"):
        changed.append(f"train.steps: {saved.get('train.steps')!r} -> {now['train.steps']!r} "
                       "(the cosine schedule is laid out over it)")
    if changed:
        raise PiLoraError(
            f"a resumed run keeps what it computes; these differ from what {where} recorded: "
            f"{'; '.join(changed)}. Start a new run (new --output) to change them."
        )


def show_resolved(resolved, planner_of) -> None:
    """The resolved recipe as YAML (every key), then its plan."""
    console.rule("resolved recipe")
    console.print(recipes_mod.dump(resolved), highlight=False, markup=False, end="")
    console.rule("plan")
    print_plan(resolved, *planner_of(resolved))


def print_recipe(resolved) -> None:
    """The whole resolved recipe, one line per section."""
    for section, values in resolved.model_dump(mode="json").items():
        if isinstance(values, dict):
            values = ", ".join(f"{k}={v}" for k, v in values.items())
        console.print(f"[dim]{section}: {values}[/]", highlight=False)


@app.command(cls=Command)
@handled
def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe file or shipped recipe name (`pi-lora recipes`) \\[default: none: the flags and the built-in defaults]."),
    base: Optional[str] = typer.Option(None, help=recipe_flag("model.base", "Base model: alias (see `pi-lora models`), hub id or folder.")),
    target_len: Optional[int] = typer.Option(None, help=recipe_flag("rope.target_len", "New context length L'; the rope factor is L'/L.")),
    scaling: Optional[Literal["yarn", "linear", "ntk", "none"]] = typer.Option(None, help=recipe_flag("rope.scaling", "How positions are extended: yarn (YaRN), linear (Position Interpolation), ntk (NTK-aware theta), or none (plain RoPE: a no-PI control).")),
    train_len: Optional[int] = typer.Option(None, help=recipe_flag("rope.train_len", "Short windows (PoSE): tokens per trained sequence, with position ids spread over the target length.")),
    source: Optional[str] = typer.Option(None, "--source", "--data", help=recipe_flag("data.source", "Training data: a hub dataset id, or a local .txt/.jsonl/.json/.parquet file or folder.")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=recipe_flag("output", "Run folder.")),
    steps: Optional[int] = typer.Option(None, help=recipe_flag("train.steps", "Optimizer steps.")),
    lr: Optional[float] = typer.Option(None, help=recipe_flag("train.lr", "Peak learning rate.")),
    rank: Optional[int] = typer.Option(None, help=recipe_flag("lora.rank", "LoRA rank.")),
    batch_size: Optional[int] = typer.Option(None, help=recipe_flag("train.batch_size", "Sequences per micro-batch.")),
    grad_accum: Optional[int] = typer.Option(None, help=recipe_flag("train.grad_accum", "Micro-batches per optimizer step.")),
    seed: Optional[int] = typer.Option(None, help=recipe_flag("train.seed", "Random seed.")),
    trust_remote_code: Optional[bool] = typer.Option(
        None, "--trust-remote-code/--no-trust-remote-code", help=recipe_flag("model.trust_remote_code", "Run model code from the hub.")
    ),
    gpu_mem: Optional[str] = typer.Option(None, help=recipe_flag("train.gpu_mem", "Memory per device the plan may use, e.g. 24GiB.")),
    gpus: Optional[int] = typer.Option(None, help=recipe_flag("model.gpus", "Experimental (not yet run on GPUs): split the layers across this many GPUs (one long sequence on several cards).")),
    shard: Optional[bool] = typer.Option(None, "--shard/--no-shard", help=recipe_flag("model.shard", "Experimental (tested on CPU processes only): under torchrun, shard the base and the LoRA state across the processes (FSDP2), for bases too large for one card.")),
    set_: list[str] = typer.Option([], "--set", help="Any recipe key: --set lora.dropout=0.05 (repeatable) \\[default: none]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the memory plan, then stop: no weight loaded, nothing written."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output folder from its newest whole checkpoint (a damaged one is skipped, said so; with none yet, from step 0)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
):
    """Extend a base model by Position Interpolation and train a LoRA adapter at the new length.

    Data parallel on N GPUs (or CPU processes): torchrun --nproc_per_node N -m pi_lora train ...
    (add --shard to shard the model across them).
    """
    from . import checkpoint as checkpoint_mod
    from . import distributed, preflight, rope, run
    from . import train as train_mod

    given = locals()
    world = distributed.start()
    console.quiet = not world.main  # rank 0 speaks for all
    flags = {key: given[name] for name, key in FLAG_KEYS.items()}
    tree, source = ({}, "flags")
    if recipe is not None:
        path = recipes_mod.find(recipe)
        tree, source = recipes_mod.read(path), str(path)
    if resume:
        folder = output or tree.get("output")
        if folder is None:
            raise PiLoraError("--resume needs the run folder: give --output.")
        run.claim(Path(folder), resume, overwrite)
        tree, source = recipes_mod.read(Path(folder) / run.RECIPE), str(Path(folder) / run.RECIPE)
    resolved, overrides = recipes_mod.resolve(tree, set_, flags, source=source)
    if resolved.rope.scaling not in (None, *rope.TRAINABLE):  # said before any weight loads, as it will be after
        raise PiLoraError(f"rope.scaling '{resolved.rope.scaling}' changes the frequencies with the sequence length, "
                          "so what is trained would not be what runs; use it in pi-lora eval, and train with "
                          f"{', '.join(rope.TRAINABLE)}.")
    if dry_run:
        print_overrides(overrides)
        show_resolved(resolved, train_plan)
        console.print(f"[green]dry run[/]: nothing loaded or written; without --dry-run the run goes to {resolved.output}")
        return
    folder = Path(resolved.output)
    # one writer per run folder, from now on (a new folder's parent may not exist yet: fit takes it then)
    hold = run.writing(folder) if world.main and folder.absolute().parent.is_dir() else contextlib.nullcontext()
    with hold:
        run.claim(folder, resume, overwrite)
        checkpoint = None
        if resume:
            checkpoint = checkpoint_mod.latest(folder, console)  # verified, before any weight loads
            recorded, where = recorded_recipe(folder, checkpoint)
            if recorded.get("model", {}).get("trust_remote_code") and trust_remote_code is not True:
                run.require_trust({"trust_remote_code": True, "base": resolved.model.base}, False, "train --resume")
            check_resume_changes(recorded, where, resolved)
            complete = train_mod.already_complete(folder, resolved.train.steps, checkpoint[0] if checkpoint else None)
            if complete:
                console.print(complete)
                return
            if checkpoint is None:
                console.print(f"[yellow]no checkpoint[/] in {folder} yet: training starts from step 0.")
        print_overrides(overrides)
        print_recipe(resolved)
        with progress_bar(console) as bar:
            prepared = preflight.prepare(resolved, bar, resume)
        preflight.describe(prepared, console)
        try:
            train_mod.fit(prepared, console, resume, overwrite, checkpoint)
        finally:
            distributed.stop()


def show_verification(what: str, checked) -> None:
    """One line: what a merge or export verified of its output (merge.Verification), or why it did not."""
    if checked.status == "checked":
        difference = f" (max relative difference {checked.error:.1e})" if checked.error is not None else ""
        console.print(f"verified: {checked.detail}{difference}", highlight=False)
    else:
        console.print(f"[yellow]{what} not verified[/]: {checked.detail}", highlight=False)


@app.command(cls=Command)
@handled
def merge(
    run_dir: Path = typer.Argument(..., help="Run folder made by `pi-lora train`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the merged model \\[default: RUN_DIR/merged]."),
    base: Optional[str] = typer.Option(None, help="Where the base is, e.g. a local copy \\[default: the base the run's pi_lora.json records]."),
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = typer.Option(None, help="Weights of the merged model \\[default: the base's own]."),
    merge_base: Literal["full", "dequantized"] = typer.Option("full", help="full: merge into the full-precision base weights. dequantized: into dequant(NF4), the weights training saw."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare merged logits with base + adapter after writing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    file_gib: float = typer.Option(1.0, help="Largest output weights file, in GiB; peak memory is about one file."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the base's own model code (needed again for a run trained with it)."),
):
    """Merge a run's adapter into its base: a full model with the extended context in config.json."""
    from . import merge as merge_mod
    from . import run

    if not 0 < file_gib < 2**20:  # nan and inf too
        raise PiLoraError("--file-gib must be a positive number of GiB.")
    output = output or run_dir / run.MERGED
    with progress_bar(console) as bar:
        checked = merge_mod.merge(run_dir, output, base, dtype, merge_base, verify, overwrite, file_gib, bar,
                                  trust_remote_code)
    run.record_output(run_dir, output, "merged")
    show_verification("logits", checked)
    console.print(f"[green]merged[/] into {output}")


@app.command(cls=Command)
@handled
def export(
    run_dir: Path = typer.Argument(..., help="Run folder made by `pi-lora train`."),
    format: Literal["peft", "gguf"] = typer.Option("peft", "--format", help="peft: the adapter with its rope setting and a loading snippet. gguf: a merged model for llama.cpp."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (peft) or file (gguf) \\[default: RUN_DIR/peft, RUN_DIR/<run name>-<dtype>.gguf]."),
    dtype: Literal["fp16", "bf16", "q8_0", "fp32"] = typer.Option("fp16", help="GGUF weights (f16, bf16, q8_0 or f32 in llama.cpp's names)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="GGUF: read it back through transformers and compare tokenization and logits."),
    llamacpp_check: bool = typer.Option(False, "--llamacpp-check/--no-llamacpp-check", help="GGUF: run it in llama.cpp itself at the target length (llama-perplexity, llama-completion: on PATH or in $PI_LORA_LLAMA_CPP): perplexity within a tolerance of the merged model's in transformers (fp32 0.5%, fp16 1%, bf16 2%, q8_0 3%), and 2 passkey prompts answered alike; a mismatch fails the export and writes no file. Minutes on a CPU at 16k."),
    tokenizer_pre: Optional[str] = typer.Option(None, "--tokenizer-pre", metavar="NAME", help="GGUF: llama.cpp's pre-tokenizer name for a BPE vocabulary it does not know \\[default: found as llama.cpp's converter finds it; a .gguf base keeps its own]."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the base's own model code (needed again for a run trained with it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
):
    """Export a run for other tools: a PEFT adapter folder, or a GGUF file with the extended context."""
    from . import export as export_mod
    from . import run

    if format == "peft":
        out = export_mod.export_peft(run_dir, output or run_dir / run.PEFT, overwrite, trust_remote_code)
        run.record_output(run_dir, out, "peft")
        console.print(f"[green]exported[/] peft adapter to {out}; its README.md shows how to load it")
        return
    out = output or run.gguf_name(run_dir, dtype)
    with progress_bar(console) as bar:
        checked = export_mod.export_gguf(run_dir, out, dtype, overwrite, verify, bar, tokenizer_pre, trust_remote_code,
                                         llamacpp_check)
    run.record_output(run_dir, out, "gguf")
    show_verification("tokenizer", checked.tokens)
    show_verification("logits", checked.logits)
    if checked.llamacpp:
        console.print(f"[green]verified[/]: {checked.llamacpp}")
    console.print(f"[green]exported[/] {dtype} GGUF to {out}")


@app.command("eval", cls=Command)
@handled
def eval_(
    models_: list[str] = typer.Argument(..., metavar="MODEL...", help="Run folders, merged or plain model folders, hub ids/aliases, or .gguf files."),
    lengths: Optional[str] = typer.Option(None, help="Comma-separated context lengths L \\[default: powers of two from the base's trained length (at most 2048) up to the model's length]."),
    stride: Optional[int] = typer.Option(None, min=1, help="Sliding-window stride S: every scored token has at least L - S tokens of context \\[default: the paper's 256, or a quarter of the shortest length when that is less]."),
    windows: Optional[int] = typer.Option(None, min=1, help="Strides scored: stride x windows tokens, the same at every length \\[default: 2,048 tokens' worth, quick 512]."),
    source: Optional[str] = typer.Option(None, "--source", "--data", help="Evaluation data: a hub dataset id or a local file/folder \\[default: a run's held-out data (data.eval_fraction, data.eval_source), else its training data; other models: emozilla/pg19]."),
    split: str = typer.Option("test", help="Split of a hub dataset given with --source."),
    text_field: str = typer.Option("text", help="Field holding the text."),
    scaling: Optional[str] = typer.Option(None, "--scaling", "--rope", help="Comma-separated rope settings compared side by side, each none or KIND:S with KIND linear, yarn, ntk or dynamic \\[default: each model's own]."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Show a run beside its base with no scaling and with the run's setting untrained; under --scaling the run is labelled with the setting its adapter was trained with."),
    quant: Literal["none", "nf4", "fp4", "int8"] = typer.Option("none", help="Base weights: none (full precision: a run as deployed, equal to its merged model) or nf4/fp4/int8 (a run as trained)."),
    perplexity: bool = typer.Option(True, "--perplexity/--no-perplexity", help="Measure perplexity with L tokens of context."),
    passkey: bool = typer.Option(True, "--passkey/--no-passkey", help="Measure passkey retrieval."),
    passkey_lengths: Optional[str] = typer.Option(None, help="Comma-separated passkey prompt lengths \\[default: the longest length]."),
    passkey_check: bool = typer.Option(True, "--passkey-check/--no-passkey-check", help="Passkey: first try the key right before the question, then half the prompt away, in a prompt of the length the base was trained at; a model that retrieves none at either cannot do the task, and its distances are not measured (the table says so)."),
    trials: Optional[int] = typer.Option(None, min=1, help="Passkey trials (random 5-digit keys) per distance \\[default: 10, quick 2]."),
    distances: Optional[int] = typer.Option(None, "--distances", "--depths", min=1, help="Passkey distances from the question, evenly spaced out to the prompt length \\[default: 32, quick 8]."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-evaluation-harness tasks run at every length, e.g. RULER's niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe (offline); needs pip install \"pi-lora\\[ruler]\" \\[default: none]."),
    task_limit: int = typer.Option(5, "--task-limit", min=1, help="Samples per task at each length (--tasks)."),
    engine: Literal["transformers", "llama.cpp"] = typer.Option("transformers", "--engine", help="llama.cpp: .gguf files run by llama.cpp itself (its llama-perplexity and llama-completion, on PATH or in $PI_LORA_LLAMA_CPP), and every model's perplexity by llama-perplexity's protocol (each window's second half scored), so a merged model beside its GGUF is compared on the same tokens."),
    quick: bool = typer.Option(False, "--quick", help="A short run: fewer windows, trials and distances (explicit options win)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the base's own model code (needed again for a run trained with it)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json and plot.png \\[default: RUN/eval for one run, else eval/<first model's name>]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Perplexity with L tokens of context, passkey retrieval by distance and lm-evaluation-harness tasks
    (RULER) by length, for models side by side."""
    from . import evaluate as ev
    from . import tasks as tasks_mod

    parsed = ev.parse_lengths(lengths, "--lengths")
    keys_at = ev.parse_lengths(passkey_lengths, "--passkey-lengths")
    task_names = tasks_mod.parse_tasks(tasks)  # an unknown task or no harness fails before any model loads
    if not (perplexity or passkey or task_names):
        raise PiLoraError("--no-perplexity and --no-passkey leave nothing to measure (without --tasks).")
    ev.parse_ropes(scaling)  # a bad setting fails before any model loads
    if engine == "llama.cpp":
        from . import llamacpp

        llamacpp.bin_dir()  # no llama.cpp: one line, before any model loads
        if stride is not None or windows is not None:
            raise PiLoraError("--engine llama.cpp scores llama-perplexity's windows (stride L/2 - 1); "
                              "--stride and --windows do not apply.")
        if scaling is not None and any(m.endswith(".gguf") for m in models_):
            raise PiLoraError("--engine llama.cpp runs a GGUF with the rope setting it carries; --scaling does not apply.")
    settings = ev.Settings(lengths=parsed, stride=stride, windows=windows, scored=512 if quick else 2048,
                           trials=trials if trials is not None else (2 if quick else 10),
                           distances=distances if distances is not None else (8 if quick else 32),
                           passkey=passkey, perplexity=perplexity, passkey_lengths=keys_at, rope=scaling, quant=quant,
                           baselines=baselines, trust_remote_code=trust_remote_code, passkey_check=passkey_check,
                           tasks=task_names, task_limit=task_limit, engine=engine)
    section, note = ev.data_section(models_, source, split, text_field)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    with progress_bar(console) as bar:
        results, output = ev.evaluate(models_, settings, section, output, overwrite, bar)
    console.print(ev.tables(results))
    console.print(f"[green]results[/] in {output / 'results.json'}, plot in {output / 'plot.png'}")


@app.command(cls=Command)
@handled
def plan(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe file or shipped recipe name (`pi-lora recipes`) \\[default: none: the flags and the built-in defaults]."),
    base: Optional[str] = typer.Option(None, help=recipe_flag("model.base", "Base model: alias (planned offline), hub id or folder.")),
    target_len: Optional[int] = typer.Option(None, help=recipe_flag("rope.target_len", "New context length L'.")),
    gpu_mem: Optional[str] = typer.Option(None, help="Memory per GPU, e.g. 24GiB. Recipe key: train.gpu_mem. \\[default: the recipe's, else this machine's GPU, else 24GiB]"),
    gpus: Optional[int] = typer.Option(None, help=recipe_flag("model.gpus", "Experimental: GPUs to split the layers across.")),
    shard: Optional[bool] = typer.Option(None, "--shard/--no-shard", help=recipe_flag("model.shard", "Experimental: shard the model across --processes (FSDP2).")),
    processes: int = typer.Option(1, min=1, help="torchrun processes (one per GPU) the run will use: data parallel, sharded with --shard."),
    batch_size: Optional[int] = typer.Option(None, help=recipe_flag("train.batch_size", "Sequences per micro-batch.")),
    rank: Optional[int] = typer.Option(None, help=recipe_flag("lora.rank", "LoRA rank.")),
    train_len: Optional[int] = typer.Option(None, help=recipe_flag("rope.train_len", "Short windows (PoSE): tokens per trained sequence.")),
    set_: list[str] = typer.Option([], "--set", help="Any recipe key: --set train.loss_chunk=2048 (repeatable) \\[default: none]."),
):
    """Predict a GPU training run's memory by component, whether it fits, and the settings that make it fit.

    Needs no weights: aliases are planned from shipped configs. Planned for bf16 compute on a GPU.
    """
    tree = recipes_mod.read(recipes_mod.find(recipe)) if recipe else {}
    flags = {"model.base": base, "rope.target_len": target_len, "train.gpu_mem": gpu_mem,
             "train.batch_size": batch_size, "lora.rank": rank, "model.gpus": gpus, "model.shard": shard,
             "rope.train_len": train_len}
    resolved, _ = recipes_mod.resolve(tree, set_, flags, source=recipe or "flags")
    print_plan(resolved, *gpu_plan(resolved, processes))


def gpu_plan(resolved, processes: int = 1):
    """The plan of `pi-lora plan`: for bf16 compute on a GPU (this machine's, else 24GiB), from the
    shipped config of an alias. Returns the decision, the base's config and its interpolation."""
    import torch

    from . import model, pose, rope
    from . import plan as planner

    m = resolved.model
    if m.shard and processes == 1:
        raise PiLoraError("model.shard shards across torchrun processes: give their number, e.g. --processes 2.")
    if m.gpus > 1 and processes > 1:
        raise PiLoraError("model.gpus > 1 splits one model across GPUs; with torchrun each process has one GPU. "
                          "Use one or the other.")
    if resolved.train.gpu_mem is None and not torch.cuda.is_available():
        resolved.train.gpu_mem = "24GiB"
    config = model.plan_config(m.base, m.revision, m.trust_remote_code)
    pi = rope.of_recipe(config, resolved.rope, model.TRAINED_LEN.get(m.base))
    pose.check(resolved.rope, rope.extends(pi))
    compute_bytes = 4 if m.compute_dtype == "fp32" else 2
    return planner.decide(planner.Shape.of(config), resolved, compute_bytes, cuda=True, processes=processes), config, pi


def train_plan(resolved):
    """The plan `train` makes on this machine before loading any weight (pi_lora.preflight.plan_memory),
    from the config alone: nothing is downloaded but the config, nothing built or written."""
    from . import preflight

    config, pi = preflight.config_for(resolved, plan_only=True)
    return preflight.plan_memory(resolved, config), config, pi


def print_plan(resolved, decision, config, pi) -> None:
    """The plan's table, its settings and its verdict: fits (needs X of Y GiB per device) or why not."""
    from . import plan as planner

    m, shape = resolved.model, planner.Shape.of(config)
    title = (f"{m.base}: {pi.base_len:,} -> {pi.target_len:,} tokens (rope {pi.rope_type}, factor {pi.factor:g}), "
             f"{m.quant}, LoRA r={resolved.lora.rank}, "
             f"batch {resolved.train.batch_size}"
             + (f" x {resolved.rope.train_len:,}-token short windows (rope.train_len)"
                if resolved.rope.train_len and resolved.rope.train_len < pi.target_len else ""))
    console.print(planner.table(decision, title))
    s = decision.estimate.settings
    chosen = planner.spell(shape, planner.resolved(shape, s))
    console.print(f"settings: loss_chunk {s.loss_chunk}, {chosen}"
                  + (f" (auto: {', '.join(decision.chosen)})" if decision.chosen else ""))
    if m.gpus > 1:
        console.print(f"layers per GPU: {decision.split}")
    if not decision.fits:
        raise PiLoraError(planner.refusal(decision, shape, planner.auto_keys(resolved.train)))
    cuda = decision.estimate.cuda
    longest = planner.max_length(shape, s, decision.budget, cuda, planner.auto_keys(resolved.train))
    console.print(f"[green]fits[/]: needs {decision.estimate.needs / planner.GiB:.2f} of "
                  f"{decision.budget / planner.GiB:.2f} GiB per {'GPU' if cuda else 'device (this CPU)'}; the longest "
                  f"that fits (auto settings resolved per length): {longest:,} tokens")


@app.command(cls=Command)
def models():
    """List the base-model aliases and the hub ids they stand for."""
    from .model import ALIASES, DEMO

    table = console_mod.table("alias", "model")
    for alias, hub_id in ALIASES.items():
        table.add_row(alias, hub_id)
    table.add_row(DEMO, "tiny LLaMA built on this machine (CPU demo, tests)")
    console.print(table)


@recipes_app.callback()
def recipes(ctx: typer.Context):
    """List the shipped recipes (with no subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    table = console_mod.table("name", "base", "target_len", "about")
    for name, path in recipes_mod.shipped().items():
        tree, text = recipes_mod.read(path), path.read_text()
        first = text.splitlines()[0].lstrip("# ") if text.startswith("#") else ""
        table.add_row(name, str(tree.get("model", {}).get("base")), str(tree.get("rope", {}).get("target_len")), first)
    console.print(table)


@recipes_app.command("show", cls=Command)
@handled
def recipes_show(
    name: str = typer.Argument(..., help="Shipped recipe name or file."),
    resolved: bool = typer.Option(False, "--resolved", help="Every key as a run would resolve it (defaults filled in), then the plan of `pi-lora plan --recipe NAME`."),
):
    """Print a recipe file, or (--resolved) what it resolves to and its plan."""
    path = recipes_mod.find(name)
    if not resolved:
        print(path.read_text(), end="")
        return
    quiet()
    recipe, _ = recipes_mod.resolve(recipes_mod.read(path), [], {}, source=str(path))
    show_resolved(recipe, gpu_plan)


@recipes_app.command("validate", cls=Command)
@handled
def recipes_validate(files: list[str] = typer.Argument(..., help="Recipe files or shipped names.")):
    """Check recipes against the schema; every problem is listed with its key path."""
    failed = []
    for name in files:
        path = recipes_mod.find(name)
        try:
            recipes_mod.validate(recipes_mod.read(path), source=str(path), require=False)
            console.print(f"[green]ok[/] {path}")
        except PiLoraError as e:
            console_mod.say(err_console, f"{ERROR} {e}")
            failed.append(path)
    if failed:
        raise typer.Exit(2)


def quiet() -> None:
    """Our own progress and messages only: library chatter is noise in a training log."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels" package hint on every start
    logging.getLogger("kernels").setLevel(logging.ERROR)  # offline, the same hint's "Skipping publisher trust check"
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main():
    # OpenMP threads that spin while waiting for a core another process holds slow a shared machine down
    # several-fold (5x per demo step on 2 cores at load 7; bench/demo_speed.py); waiting passively costs
    # little on idle cores. Set before torch loads its OpenMP runtime; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Libraries' tqdm bars (transformers' GGUF reader, the harness, llama.cpp's converter) would draw
    # over pi-lora's own display, and not all of them can be turned off one by one; tqdm reads this
    # when it is first imported, which is after this line.
    os.environ.setdefault("TQDM_DISABLE", "1")
    app()
