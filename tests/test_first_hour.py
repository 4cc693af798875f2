"""What a newcomer meets first: commands in a real terminal, help with defaults, fast offline errors,
resume of a finished run, warmup, units, validation while training, TensorBoard, the adapter card."""

import json
import math
import os
import pty
import select
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from pi_lora import cli, data, hub, run
from pi_lora import train as train_mod
from pi_lora.console import progress_bar
from pi_lora.cli import app
from pi_lora.recipe import DataSection, TrainSection

RUNNER = CliRunner()


def train_args(tiny_base, corpus, out, *extra):
    return ["train", "--base", str(tiny_base), "--target-len", "128", "--data", str(corpus), "--output", str(out),
            "--steps", "4", "--lr", "5e-3", "--grad-accum", "1", "--rank", "4", "--set", "train.warmup_steps=0",
            "--set", "train.save_every=2", *extra]


@pytest.fixture
def terminal(monkeypatch):
    """Every command's console is a terminal (colours, live progress bars), as in a shell."""
    out = Console(force_terminal=True, width=100, record=True)
    monkeypatch.setattr(cli, "console", out)
    monkeypatch.setattr(cli, "err_console", Console(force_terminal=True, width=100, stderr=True))
    return out


@pytest.fixture(scope="module")
def validated_run(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "validated"
    result = RUNNER.invoke(app, train_args(tiny_base, corpus, out, "--steps", "6", "--set", "data.eval_fraction=0.2",
                                           "--set", "train.eval_every=2", "--set", "train.keep_checkpoints=1"),
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_a_progress_task_without_info_renders():
    console = Console(force_terminal=True, width=100, record=True)
    with progress_bar(console) as bar:
        task = bar.add_task("tokenizing", total=2)
        bar.advance(task)
        bar.refresh()
    assert "tokenizing" in console.export_text()


def test_train_merge_export_eval_in_a_terminal(terminal, tiny_base, corpus, tmp_path):
    out = tmp_path / "run"
    steps = [
        train_args(tiny_base, corpus, out),
        ["merge", str(out)],
        ["export", str(out), "--format", "gguf", "--tokenizer-pre", "gpt-2"],
        ["eval", str(out), "--data", str(corpus), "--lengths", "64,128", "--quick", "--no-passkey",
         "--output", str(tmp_path / "eval")],
    ]
    for argv in steps:
        result = RUNNER.invoke(app, argv, catch_exceptions=False)
        assert result.exit_code == 0, (argv[0], result.output)
    shown = terminal.export_text()
    assert "train" in shown and "merge" in shown and "━" in shown  # the bars were drawn


def test_train_under_a_pseudo_terminal(tiny_base, corpus, tmp_path):
    """The installed command with a real terminal attached, as a user runs it."""
    argv = [sys.executable, "-m", "pi_lora", *train_args(tiny_base, corpus, tmp_path / "run", "--steps", "2")]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "80"})
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")[-3000:]
    assert b"\x1b[" in seen and b"done" in seen  # drawn as a terminal, and finished


@pytest.mark.parametrize("command,shown", [
    ("merge", ["[default: RUN_DIR/merged]", "[default: the base's own]", "bf16|fp16|fp32", "full|dequantized"]),
    ("train", ["else what the device has]"]),
    ("plan", ["else this machine's GPU, else 24GiB]"]),
])
def test_help_shows_defaults_and_choices(command, shown):
    result = RUNNER.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for part in shown:
        assert part in text, (part, text)


def test_unreachable_hub_is_one_fast_line(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    went = []
    monkeypatch.setattr(hub, "go_offline", lambda: went.append(True))
    result = RUNNER.invoke(app, ["train", "--base", "someone/model", "--target-len", "128",
                                 "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and went
    assert "cannot reach the Hugging Face hub for the model 'someone/model'" in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


def test_a_mistyped_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "reachable", lambda: pytest.fail("the hub was asked"))
    result = RUNNER.invoke(app, ["eval", "runs/typo", "--quick"])
    assert result.exit_code == 2 and "model folder 'runs/typo' does not exist (no such folder)" in result.output


def test_warmup_starts_above_zero_and_cosine_ends_at_zero():
    t = TrainSection(steps=10, lr=1.0, warmup_steps=4, schedule="cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=t.lr)
    sched = train_mod.scheduler(optimizer, t)
    lrs = []
    for _ in range(t.steps):
        lrs.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


def test_a_run_shorter_than_its_warmup_is_warned(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, train_args(tiny_base, corpus, tmp_path / "r", "--steps", "1",
                                           "--set", "train.warmup_steps=20"), catch_exceptions=False)
    assert result.exit_code == 0
    assert "shorter than train.warmup_steps" in " ".join(result.output.split())
    assert run.read_metrics(tmp_path / "r")[0]["lr"] == pytest.approx(5e-3 / 20)


def test_resuming_a_complete_run_changes_nothing(validated_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(validated_run, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for extra in ([], ["--steps", "3"]):
        result = RUNNER.invoke(app, ["train", "--resume", "--output", str(copy), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "already complete: 6 steps done" in " ".join(result.output.split())
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


def test_recipe_keeps_auto_and_the_run_records_what_was_resolved(validated_run):
    saved = yaml.safe_load((validated_run / run.RECIPE).read_text())
    assert saved["train"]["mlp_tile"] == "auto" and saved["train"]["offload_activations"] == "auto"
    meta = json.loads((validated_run / run.META).read_text())
    assert meta["resolved"] == {"gradient_checkpointing": 0, "mlp_tile": 0, "attention_tile": 0,
                                "offload_activations": False}
    assert meta["adapter_step"] == 6


def test_memory_is_reported_in_gib(validated_run):
    assert all("mem_gib" in r and "mem_gb" not in r for r in run.read_metrics(validated_run))


def test_held_out_tokens_are_never_trained_on(tiny_base, corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    section = DataSection(source=str(corpus), eval_fraction=0.3, shuffle=False)
    whole = data.cached_tokens(section, data.local_files(section.source), tokenizer, tmp_path)
    training = data.load(section, tokenizer, 64, 0, tmp_path)
    held = data.held_out_tokens(section, tokenizer, 10**9, tmp_path)
    cut = training.total_tokens
    assert cut + len(held) == len(whole)
    assert torch.equal(held, torch.from_numpy(whole[cut:].astype("int64")))
    assert whole[cut - 1] == tokenizer.eos_token_id  # held out from a document boundary
    assert len(held) >= 0.15 * len(whole)
    rows = torch.cat(list(next(training.batches(0, training.count)))).flatten()
    assert torch.equal(rows, torch.from_numpy(whole[: training.count * 64].astype("int64")))


def test_streamed_held_out_documents_are_disjoint(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(20)))
    section = DataSection(source=str(path), streaming=True, shuffle=False, eval_fraction=0.25)
    trained = {row["text"] for row in data.every_nth(data.open_dataset(section, [path], True), 0.25, False)}
    held = {row["text"] for row in data.every_nth(data.open_dataset(section, [path], True), 0.25, True)}
    assert len(held) == 5 and len(trained) == 15 and not held & trained


def test_validation_loss_equals_base_plus_adapter_on_the_held_out_data(validated_run, tiny_base, corpus, tmp_path):
    """The logged val_loss is the mean next-token loss of base + final adapter on the held-out sequences."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pi_lora.demo import home

    meta = json.loads((validated_run / run.META).read_text())
    config = AutoConfig.from_pretrained(tiny_base)
    config.rope_parameters = meta["rope_parameters"]
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, config=config),
                                    validated_run / run.ADAPTER).eval()
    section = DataSection(source=str(corpus), eval_fraction=0.2)
    rows = data.validation(section, AutoTokenizer.from_pretrained(tiny_base), 128, 4, home() / "tokens")
    with torch.no_grad():
        want = sum(net(input_ids=r[None], labels=r[None]).loss.item() for r in rows) / len(rows)
    logged = run.read_metrics(validated_run)
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 4, 6]
    # the run trained on NF4 weights; the reference runs the fp32 base: within quantization error
    assert logged[-1]["val_loss"] == pytest.approx(want, rel=0.05)
    assert logged[-1]["val_ppl"] == pytest.approx(math.exp(logged[-1]["val_loss"]))


def test_the_best_checkpoint_is_marked_and_kept(validated_run):
    logged = [r for r in run.read_metrics(validated_run) if "val_loss" in r]
    best = min(logged, key=lambda r: r["val_loss"])
    marked = json.loads((validated_run / run.BEST).read_text())
    assert marked["step"] == best["step"] and marked["val_loss"] == pytest.approx(best["val_loss"])
    assert (validated_run / marked["checkpoint"] / run.STATE).is_file()  # survived keep_checkpoints 1


def test_tensorboard_events_hold_the_logged_values(validated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(validated_run / "tensorboard"))
    events.Reload()
    logged = run.read_metrics(validated_run)
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]
    val = [(e.step, e.value) for e in events.Scalars("validation/val_loss")]
    assert val == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in logged if "val_loss" in r]


def test_adapter_card_says_what_the_adapter_is(validated_run):
    card = (validated_run / run.ADAPTER / "README.md").read_text()
    assert "More Information Needed" not in card
    last = run.read_metrics(validated_run)[-1]
    for part in ("extended to 128 tokens", "trained to 64 tokens", "with YaRN", "factor 2", "r=4", "6 x 1 sequences",
                 f"{last['loss']:.4f} at step 6", f"loss {last['val_loss']:.4f}", "'rope_type': 'yarn'"):
        assert part in card, part


def test_outputs_made_before_a_resume_are_named_stale(validated_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(validated_run, copy)
    assert RUNNER.invoke(app, ["merge", str(copy), "--no-verify"], catch_exceptions=False).exit_code == 0
    assert run.read_outputs(copy)[0]["adapter_step"] == 6
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(copy), "--steps", "7"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"stale: {(copy / 'merged').resolve()} (merged) was made from the adapter at step 6" in text


def test_demo_base_cache_is_keyed_and_readable(monkeypatch, tmp_path):
    from pi_lora import demo

    monkeypatch.setenv("PI_LORA_HOME", str(tmp_path))
    monkeypatch.setattr(demo, "pretrain", lambda folder, **kw: [])
    folder = demo.demo_base()
    assert folder.name == f"demo-base-{demo.demo_key()}"
    mask = os.umask(0)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    monkeypatch.setattr(demo, "DEMO_CONFIG", {**demo.DEMO_CONFIG, "num_hidden_layers": 2})
    assert demo.demo_key() not in folder.name


def test_eval_of_a_run_shows_its_baselines_on_its_held_out_data(validated_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(validated_run, copy)
    result = RUNNER.invoke(app, ["eval", str(copy), "--quick", "--no-passkey", "--stride", "32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "held-out data" in " ".join(result.output.split())
    saved = json.loads((copy / run.EVAL / "results.json").read_text())
    labels = list(saved["results"])
    assert labels == ["run: base, no scaling", "run: base, yarn:2 untrained", str(copy)]
    assert {tuple(r["perplexity"]) for r in saved["results"].values()} == {("64", "128")}  # the same lengths
    assert saved["data"]["eval_fraction"] == 0.2
    again = RUNNER.invoke(app, ["eval", str(copy), "--quick", "--no-passkey"])
    assert again.exit_code == 2 and "--overwrite" in again.output  # an evaluation is not silently replaced
    assert run.read_outputs(copy)[-1]["kind"] == "eval"
