"""`pi-lora train` end to end on a tiny LLaMA: files, loss, resume after kill -9 and Ctrl-C, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pi_lora import run
from pi_lora.cli import app

RUNNER = CliRunner()


def args(tiny_base, corpus, out, *extra):
    return [
        "train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus), "--output", str(out),
        "--steps", "8", "--lr", "5e-3", "--batch-size", "2", "--grad-accum", "1", "--rank", "4",
        "--set", "lora.trainable=[embed, norm]", "--set", "train.save_every=2", "--set", "train.warmup_steps=0",
        "--set", "lora.dropout=0.1", *extra,
    ]


def invoke(argv):
    return RUNNER.invoke(app, argv, catch_exceptions=False)


def losses(folder):
    return [r["loss"] for r in run.read_metrics(Path(folder))]


@pytest.fixture(scope="module")
def reference_run(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    result = invoke(args(tiny_base, corpus, out))
    assert result.exit_code == 0, result.output
    return out


def test_run_folder_contract(reference_run, tiny_base):
    out = reference_run
    meta = json.loads((out / run.META).read_text())
    assert meta["original_len"] == 64 and meta["target_len"] == 256 and meta["factor"] == 4.0
    assert meta["rope_type"] == "yarn" and meta["rope_theta"] == 10000.0  # the default for plain RoPE
    assert meta["base"] == str(tiny_base)
    saved = yaml.safe_load((out / run.RECIPE).read_text())
    assert saved["rope"]["target_len"] == 256 and saved["lora"]["trainable"] == ["embed", "norm"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [c.name for c in run.checkpoints(out)] == ["step-6", "step-8"]  # keep_checkpoints: 2
    rows = run.read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mem_gib"} <= set(rows[0])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_loss_falls(reference_run):
    values = losses(reference_run)
    assert all(v == v and v < 20 for v in values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.1, values


def test_adapter_reproduces_trained_weights(reference_run, tiny_base):
    """The PEFT adapter (with trained embed/norm) holds exactly the weights of the last step."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((reference_run / run.META).read_text())
    config = AutoConfig.from_pretrained(tiny_base)
    config.rope_parameters = meta["rope_parameters"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, config=config)
    net = PeftModel.from_pretrained(base, reference_run / "adapter")
    from pi_lora import checkpoint

    final = checkpoint.read(reference_run / "checkpoints" / "step-8")["weights"]
    params = dict(net.named_parameters())
    assert any("modules_to_save" in k and "embed_tokens" in k for k in final)
    for name, value in final.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0)


def test_resolved_recipe_repeats_the_run(reference_run, tmp_path):
    again = tmp_path / "again"
    result = invoke(["train", "--recipe", str(reference_run / run.RECIPE), "--output", str(again)])
    assert result.exit_code == 0, result.output
    assert losses(again) == pytest.approx(losses(reference_run), rel=1e-6)


def spawn(argv, **env):
    # a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the child the default disposition, as a terminal would
    return subprocess.Popen(
        [sys.executable, "-m", "pi_lora", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **env}, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_until(proc, condition, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended early: {proc.stdout.read()}")
        time.sleep(0.005)
    pytest.fail("the command did not get there in time")


def wait_for_step(proc, folder, step, timeout=240):
    wait_until(proc, lambda: len(run.read_metrics(folder)) >= step, timeout)


def test_kill_9_then_resume_gives_the_same_losses(reference_run, tiny_base, corpus, tmp_path):
    out = tmp_path / "killed"
    proc = spawn(args(tiny_base, corpus, out, "--steps", "8") + ["--set", "train.log_every=1"])
    wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(run.read_metrics(out)) < 8, "the kill came too late to test anything"
    result = invoke(["train", "--resume", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "resumed from step-" in result.output
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(reference_run, tiny_base, corpus, tmp_path):
    out = tmp_path / "interrupted"
    proc = spawn(args(tiny_base, corpus, out) + ["--set", "train.save_every=100"])
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "--resume" in output
    done = run.checkpoints(out)
    assert len(done) == 1 and int(done[0].name.removeprefix("step-")) >= 3
    result = invoke(["train", "--resume", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-6)


def test_out_of_memory_is_explained_and_keeps_the_checkpoint(tiny_base, corpus, tmp_path, monkeypatch):
    import pi_lora.train as train_mod

    real, calls = train_mod.step_loss, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "step_loss", failing)
    out = tmp_path / "oom"
    result = RUNNER.invoke(app, args(tiny_base, corpus, out))
    assert result.exit_code == 3
    assert "out of memory at length 256" in result.output and "train.batch_size" in result.output
    assert [c.name for c in run.checkpoints(out)] == ["step-2"]


def test_tokens_never_reach_the_run_folder(tiny_base, corpus, tmp_path, monkeypatch):
    secret = "hf_SECRETtokenVALUE123"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "tok"
    result = invoke(args(tiny_base, corpus, out, "--steps", "1"))
    assert result.exit_code == 0 and secret not in result.output
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_overwrite_replaces_and_existing_output_is_refused(reference_run, tiny_base, corpus, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / run.RECIPE).write_text("# an older run\n")
    refused = RUNNER.invoke(app, args(tiny_base, corpus, out, "--steps", "1"))
    assert refused.exit_code == 2 and "not empty" in refused.output
    assert (out / "keep.txt").read_text() == "mine"
    replaced = RUNNER.invoke(app, args(tiny_base, corpus, out, "--steps", "1", "--overwrite"))
    assert replaced.exit_code == 0 and not (out / "keep.txt").exists() and (out / "adapter").is_dir()


def gpt2_folder(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change, message", [
    (["--data", "nope/missing.txt"], "does not exist"),
    (["--target-len", "64"], "trained length 64"),
    (["--target-len", "100000"], "one sequence needs 100000"),
    (["--base", "./no/such/model"], "does not exist"),
    (["--set", "lora.rnak=4"], "lora.rnak: unknown key (did you mean 'rank'?)"),
    (["--set", "train.schedule=wavy"], "train.schedule:"),
    (["--resume"], "nothing to resume"),
    (["--recipe", "no-such-recipe"], "neither a file nor a shipped recipe"),
    (["--base", "llama-7b"], "model 'huggyllama/llama-7b' is not in the local cache"),  # offline
    (["--data", "someone/no-such-dataset"], "dataset 'someone/no-such-dataset' is not in the local cache"),
    (["--set", "rope.scaling=cubic"], "rope.scaling:"),
])
def test_bad_input_exits_2_and_leaves_nothing(change, message, tiny_base, corpus, tmp_path):
    out = tmp_path / "out"
    argv = args(tiny_base, corpus, out) + change
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_non_rope_base_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    result = RUNNER.invoke(app, args(gpt2_folder(tmp_path), corpus, out))
    assert result.exit_code == 2 and "model_type 'gpt2'" in result.output and "absolute" in result.output
    assert not out.exists()


def test_wrong_flag_type_is_a_usage_error(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, args(tiny_base, corpus, tmp_path / "o", "--target-len", "long"))
    assert result.exit_code == 2


def test_models_lists_aliases():
    result = invoke(["models"])
    assert result.exit_code == 0
    assert "huggyllama/llama-7b" in result.output and "llama2-13b" in result.output


def test_resume_refuses_to_change_what_the_run_computes(reference_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    changed = RUNNER.invoke(app, ["train", "--resume", "--output", str(copy), "--lr", "1e-2"])
    assert changed.exit_code == 2 and "train.lr" in changed.output
    longer = RUNNER.invoke(app, ["train", "--resume", "--output", str(copy), "--steps", "9"])
    assert longer.exit_code == 0, longer.output
    assert losses(copy)[:8] == losses(reference_run) and len(losses(copy)) == 9


def test_overwrite_refuses_folders_that_are_not_runs(tiny_base, corpus, tmp_path):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "weights.bin").write_text("x")
    result = RUNNER.invoke(app, args(tiny_base, corpus, precious, "--overwrite"))
    assert result.exit_code == 2 and "replaces run folders only" in result.output
    assert (precious / "weights.bin").is_file()


def test_outputs_are_readable_by_others(reference_run):
    for path in [reference_run / run.META, reference_run / "adapter", reference_run / "adapter" / "adapter_config.json"]:
        mode = path.stat().st_mode
        assert mode & 0o044 == 0o044, oct(mode)  # group and others can read (umask 022)


def test_interrupt_before_any_checkpoint_says_nothing_was_kept(tiny_base, corpus, tmp_path, monkeypatch):
    import pi_lora.train as train_mod

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "step_loss", stop)
    out = tmp_path / "early"
    result = RUNNER.invoke(app, args(tiny_base, corpus, out))
    assert result.exit_code == 130 and "nothing is kept" in result.output
    assert not out.exists()


def test_tiled_mlp_run_has_the_same_losses(reference_run, tiny_base, corpus, tmp_path):
    out = tmp_path / "tiled"
    result = invoke(args(tiny_base, corpus, out, "--set", "train.mlp_tile=64"))
    assert result.exit_code == 0, result.output
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-5)


def test_embed_lr_sets_the_learning_rate_of_the_trained_embeddings(tiny_base, corpus, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base).model.embed_tokens.weight.detach()
    moved = {}
    for name, extra in (("same", []), ("frozen-ish", ["--set", "lora.embed_lr=1e-12"])):
        out = tmp_path / name
        result = invoke(args(tiny_base, corpus, out, "--steps", "2", *extra))
        assert result.exit_code == 0, result.output
        weights = load_file(out / run.ADAPTER / "adapter_model.safetensors")
        embed = next(v for k, v in weights.items() if "embed_tokens" in k)
        moved[name] = (embed - base).abs().max().item()
    assert moved["same"] > 1e-3 and moved["frozen-ish"] < 1e-6, moved
