"""Hostile input and faults: one writer per folder, resume checked against the run, checkpoints that
run no code and fall back when damaged, corrupt files as one line, no silent data loss, no leftovers,
limits, and trust_remote_code as part of the run. Real files truncated, real processes killed."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from pi_lora import data, run
from pi_lora.cli import app
from pi_lora.console import progress_bar
from pi_lora.errors import PiLoraError
from test_train import args, invoke, losses, spawn, wait_for_step, wait_until

RUNNER = CliRunner()


def refused(argv) -> str:
    """The command fails as bad input: exit 2, one readable message, no traceback."""
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def truncate(path: Path, size: int) -> None:
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(tiny_base, corpus, tmp_path_factory):
    """A finished 8-step run with checkpoints step-6 and step-8 (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("hard") / "ref"
    result = invoke(args(tiny_base, corpus, out))
    assert result.exit_code == 0, result.output
    return out


def copy_run(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pi_lora import run
    with run.writing(Path(sys.argv[1])):
        if len(sys.argv) > 2:  # a save in progress: a temporary beside the target
            with run.atomic_dir(Path(sys.argv[2])) as tmp:
                (tmp / "weights").write_bytes(b"x" * 4096)
                print("held", flush=True)
                time.sleep(600)
        print("held", flush=True)
        time.sleep(600)
""")


def hold(target: Path, inside: Path | None = None) -> subprocess.Popen:
    """A second, real process holding `target`'s write lock (and writing `inside` under it)."""
    argv = [sys.executable, "-c", HOLDER, str(target)] + ([str(inside)] if inside else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


# 1. One writer per run folder --------------------------------------------------------------------


def test_second_trainer_is_refused_naming_the_first(tiny_base, corpus, tmp_path):
    out = tmp_path / "shared"
    first = spawn(args(tiny_base, corpus, out, "--steps", "400", "--set", "train.save_every=1000"))
    try:
        wait_for_step(first, out, 1)
        for extra in ([], ["--overwrite"], ["--resume"]):
            message = refused(args(tiny_base, corpus, out, "--steps", "2", *extra))
            assert f"in use by process {first.pid}" in message and "pi-lora train" in message
        rows = run.read_metrics(out)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one writer's rows only
        assert (out / run.RECIPE).is_file()  # --overwrite deleted nothing
    finally:
        kill(first)
    with run.writing(out):  # kill -9 leaves no stale lock
        pass


def test_locked_folder_refuses_train_and_merge_and_overwrite(done, tiny_base, corpus, tmp_path):
    out = copy_run(done, tmp_path / "run")
    merged = tmp_path / "merged"
    before = tree(out)
    holder = hold(out)
    try:
        assert f"in use by process {holder.pid}" in refused(args(tiny_base, corpus, out, "--overwrite"))
        assert "in use" in refused(["merge", str(out), "--output", str(tmp_path / "m2")])  # it reads the run
        assert tree(out) == before and not (tmp_path / "m2").exists()
    finally:
        kill(holder)
    holder = hold(merged)
    try:
        assert f"in use by process {holder.pid}" in refused(["merge", str(out), "--output", str(merged)])
    finally:
        kill(holder)
    assert RUNNER.invoke(app, ["merge", str(out), "--output", str(merged)]).exit_code == 0


def test_lock_leaves_no_file_behind(tmp_path):
    target = tmp_path / "out"
    with run.writing(target):
        assert run.lock_file(target).is_file()
    assert list(tmp_path.iterdir()) == []


# 2. Resume checks the run, not itself ------------------------------------------------------------


@pytest.mark.parametrize("key, value, shown", [
    ("rope.target_len", 128, "rope.target_len: 256 -> 128"),
    ("lora.rank", 8, "lora.rank: 4 -> 8"),
    ("train.lr", 0.1, "train.lr: 0.005 -> 0.1"),
])
def test_resume_refuses_an_edited_recipe(done, tmp_path, key, value, shown):
    out = copy_run(done, tmp_path / "edited")
    recipe = yaml.safe_load((out / run.RECIPE).read_text())
    section, leaf = key.split(".")
    recipe[section][leaf] = value
    (out / run.RECIPE).write_text(yaml.safe_dump(recipe))
    before = tree(out)
    message = refused(["train", "--resume", "--output", str(out), "--steps", "10"])
    assert shown in message and "checkpoint step-8" in message
    assert tree(out) == before


def test_resume_without_checkpoint_starts_from_step_0(done, tiny_base, corpus, tmp_path):
    out = tmp_path / "early"
    proc = spawn(args(tiny_base, corpus, out, "--set", "train.save_every=100"))
    wait_for_step(proc, out, 2)
    kill(proc)
    assert run.checkpoints(out) == []
    result = invoke(["train", "--resume", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "training starts from step 0" in " ".join(result.output.split())
    assert losses(out) == pytest.approx(losses(done), rel=1e-6)


# 3. Loading a checkpoint runs no code ------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: the side effect a crafted state.pt would have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused_and_does_not_run(done, tmp_path):
    import pickle

    out = copy_run(done, tmp_path / "crafted")
    marker = tmp_path / "pwned"
    for checkpoint in run.checkpoints(out):  # every checkpoint replaced by an old-style pickle
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
        (checkpoint / "state.pt").write_bytes(pickle.dumps({"step": 8, "x": Payload(marker)}))
    pickle.loads(pickle.dumps(Payload(tmp_path / "probe")))  # the payload does work when unpickled
    assert (tmp_path / "probe").exists()
    message = refused(["train", "--resume", "--output", str(out), "--steps", "10"])
    assert "no checkpoint" in message and "pickle" in message and "not loaded" in message
    assert not marker.exists()


def test_pi_lora_never_unpickles():
    source = "".join(p.read_text() for p in Path(run.__file__).parent.glob("*.py"))
    assert "weights_only=False" not in source and "pickle.load" not in source and "torch.load(" not in source


# 4. A damaged newest checkpoint falls back -------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "edit-state", "drop-state"])
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(done, tmp_path, damage):
    out = copy_run(done, tmp_path / "damaged")
    newest = out / run.CHECKPOINTS / "step-8"
    if damage == "truncate":
        truncate(newest / run.TENSORS, 100)
    elif damage == "edit-state":
        state = json.loads((newest / run.STATE).read_text())
        state["sequences_seen"] = 0
        (newest / run.STATE).write_text(json.dumps(state))
    else:
        (newest / run.STATE).unlink()
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(out), "--steps", "10"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "checkpoint skipped: step-8" in text and "resuming from step-6 instead" in text
    assert losses(out)[:8] == pytest.approx(losses(done), rel=1e-6) and len(losses(out)) == 10


def test_no_readable_checkpoint_is_one_line(done, tmp_path):
    out = copy_run(done, tmp_path / "broken")
    for checkpoint in run.checkpoints(out):
        truncate(checkpoint / run.TENSORS, 10)
    before = tree(out)
    message = refused(["train", "--resume", "--output", str(out), "--steps", "10"])
    assert "no checkpoint" in message and "step-8: tensors.safetensors is 10 bytes" in message
    assert tree(out) == before


# 5. Corrupt or impossible input: one line, exit 2, nothing written --------------------------------


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_adapter_is_refused_by_merge(done, tmp_path, how):
    out = copy_run(done, tmp_path / "run")
    weights = out / run.ADAPTER / "adapter_model.safetensors"
    truncate(weights, 200) if how == "truncate" else weights.write_bytes(os.urandom(4096))
    message = refused(["merge", str(out), "--output", str(tmp_path / "merged")])
    assert str(weights) in message
    assert not (tmp_path / "merged").exists()
    with pytest.raises(PiLoraError, match="adapter_model.safetensors"):
        run.verify_adapter(out / run.ADAPTER)


def test_damaged_metadata_is_refused(done, tmp_path):
    out = copy_run(done, tmp_path / "run")
    truncate(out / run.META, 40)
    assert "pi_lora.json' is damaged" in refused(["merge", str(out), "--output", str(tmp_path / "m")])
    assert "pi_lora.json' is damaged" in refused(["train", "--resume", "--output", str(out), "--steps", "10",
                                                 "--set", "train.save_every=100"])
    assert not (tmp_path / "m").exists()


def test_damaged_base_weights_are_refused(done, tiny_base, corpus, tmp_path):
    broken = tmp_path / "base"
    shutil.copytree(tiny_base, broken)
    truncate(broken / "model.safetensors", 1000)
    out = copy_run(done, tmp_path / "run")
    message = refused(["merge", str(out), "--base", str(broken), "--output", str(tmp_path / "m")])
    assert str(broken / "model.safetensors") in message and not (tmp_path / "m").exists()
    message = refused(args(broken, corpus, tmp_path / "new"))
    assert "cannot load" in message and not (tmp_path / "new").exists()


def test_garbage_gguf_base_is_refused(corpus, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(2000))
    assert "cannot read GGUF" in refused(args(fake, corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_that_cannot_be_created(tiny_base, corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file, not a folder" in refused(args(tiny_base, corpus, blocker / "run"))
    assert blocker.read_text() == "x"


def test_corrupt_token_cache_is_rebuilt(tiny_base, corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    from pi_lora.recipe import DataSection

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    section, files = DataSection(source=str(corpus)), data.local_files(str(corpus))
    first = np.array(data.cached_tokens(section, files, tokenizer, tmp_path))
    (cache,) = tmp_path.glob("*.npy")
    for damage in (lambda: truncate(cache, cache.stat().st_size // 2), lambda: cache.write_bytes(os.urandom(500))):
        damage()
        again = data.cached_tokens(section, files, tokenizer, tmp_path)
        assert np.array_equal(first, again)
        assert "cannot be used" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.name, cache.with_suffix(".json").name])


# 6. No silent data loss -------------------------------------------------------------------------


def jsonl(tmp_path: Path, rows: list) -> Path:
    from pi_lora.demo import TEXT

    text = TEXT.read_text()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r if r is not None else {"text": text[i * 5000:(i + 1) * 5000]}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def test_rows_without_text_are_an_error_or_skipped_and_counted(tiny_base, tmp_path):
    source = jsonl(tmp_path, [None, {"id": 7}, None, None])
    out = tmp_path / "out"
    message = refused(args(tiny_base, source, out))
    assert "data row 2 has no 'text'" in message and "data.skip_bad_rows" in message and not out.exists()
    result = invoke(args(tiny_base, source, out, "--steps", "1", "--set", "data.skip_bad_rows=true"))
    assert result.exit_code == 0, result.output
    assert "1 row(s) without text skipped" in " ".join(result.output.split())


def test_non_string_text_names_the_row(tiny_base, tmp_path):
    source = jsonl(tmp_path, [{"text": ["a paragraph", "another"]}] * 3)  # a column of lists, not text
    message = refused(args(tiny_base, source, tmp_path / "out", "--set", "data.skip_bad_rows=true"))
    assert "data row 1 has a list in 'text', not text" in message and not (tmp_path / "out").exists()


# 7. No leftovers that live forever --------------------------------------------------------------


def test_temporaries_of_a_killed_merge_are_removed_by_the_next(done, tmp_path):
    out = copy_run(done, tmp_path / "run")
    merged = out / run.MERGED
    holder = hold(merged, inside=merged)  # a merge in progress, then killed -9
    stale = [p for p in out.iterdir() if run.MARK in p.name]
    assert len(stale) == 1 and (stale[0] / "weights").is_file()
    assert "in use" in refused(["merge", str(out)])
    assert stale[0].exists()  # not touched while its writer lives
    kill(holder)
    result = RUNNER.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "removed" in " ".join(result.output.split()) and not stale[0].exists()
    assert not [p for p in out.iterdir() if run.MARK in p.name or p.name.endswith(".lock")]


def test_temporaries_of_a_killed_checkpoint_save_are_removed_on_resume(done, tmp_path):
    out = copy_run(done, tmp_path / "run")
    holder = hold(out, inside=out / run.CHECKPOINTS / "step-9")
    kill(holder)
    stale = [p for p in (out / run.CHECKPOINTS).iterdir() if run.MARK in p.name]
    assert len(stale) == 1
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(out), "--steps", "9"])
    assert result.exit_code == 0, result.output
    assert not stale[0].exists() and "removed" in result.output
    assert [c.name for c in run.checkpoints(out)] == ["step-8", "step-9"]


# 8. Limits and defaults -------------------------------------------------------------------------


def test_rank_above_the_smallest_targeted_dimension(tiny_base, corpus, tmp_path):
    # the tiny base: hidden 64, 2 key/value heads of 16, so k_proj maps 64 -> 32
    message = refused(args(tiny_base, corpus, tmp_path / "out", "--rank", "33"))
    assert "lora.rank 33 is larger than k_proj's smaller dimension (32)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-1e-4"])
def test_learning_rate_is_finite_and_positive(tiny_base, corpus, tmp_path, lr):
    assert "train.lr" in refused(args(tiny_base, corpus, tmp_path / "out", "--lr", lr))


def test_every_set_problem_is_reported_together(tiny_base, corpus, tmp_path):
    message = refused(args(tiny_base, corpus, tmp_path / "out", "--set", "lora.rank", "--set", "train.betas=[0.9,",
                           "--set", "lora.rnak=4", "--set", "train.warmup_steps=-1"))
    assert "--set 'lora.rank': expected key.path=value" in message
    assert "--set 'train.betas=[0.9,': the value is not valid YAML" in message
    assert "lora.rnak: unknown key" in message and "train.warmup_steps:" in message


# 9. trust_remote_code is part of the run ---------------------------------------------------------


@pytest.fixture(scope="module")
def coded_base(tiny_base, tmp_path_factory):
    """The tiny base as a model that ships its own code (auto_map), as hub models with custom
    architectures do; loading it runs that code only with trust_remote_code."""
    folder = tmp_path_factory.mktemp("coded") / "model"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marked_llama", architectures=["MarkedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_marked.MarkedConfig",
                            "AutoModelForCausalLM": "modeling_marked.MarkedForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_marked.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MarkedConfig(LlamaConfig):\n    model_type = 'marked_llama'\n")
    (folder / "modeling_marked.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_marked import MarkedConfig\n\n\n"
        "class MarkedForCausalLM(LlamaForCausalLM):\n    config_class = MarkedConfig\n")
    return folder


@pytest.fixture(scope="module")
def coded_run(coded_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("coded-run") / "run"
    result = invoke(args(coded_base, corpus, out, "--steps", "2", "--trust-remote-code"))
    assert result.exit_code == 0, result.output
    return out


def test_remote_code_needs_the_flag_to_train(coded_base, corpus, tmp_path):
    assert "trust_remote_code" in refused(args(coded_base, corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_run_with_remote_code_records_it_and_merge_needs_the_flag_again(coded_run, tmp_path):
    assert run.read_meta(coded_run)["trust_remote_code"] is True
    merged = tmp_path / "merged"
    message = refused(["merge", str(coded_run), "--output", str(merged)])
    assert "--trust-remote-code" in message and not merged.exists()
    result = RUNNER.invoke(app, ["merge", str(coded_run), "--output", str(merged), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and (merged / "modeling_marked.py").is_file()


def test_resume_of_a_run_with_remote_code_needs_the_flag_again(coded_run, tmp_path):
    out = copy_run(coded_run, tmp_path / "run")
    assert "--trust-remote-code" in refused(["train", "--resume", "--output", str(out), "--steps", "3"])
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(out), "--steps", "3", "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert len(losses(out)) == 3


def test_require_trust():
    run.require_trust({"trust_remote_code": False}, False, "eval")
    run.require_trust({"trust_remote_code": True}, True, "eval")
    with pytest.raises(PiLoraError, match="eval runs it too only with --trust-remote-code"):
        run.require_trust({"trust_remote_code": True, "base": "x"}, False, "eval")


def test_an_os_error_is_one_line(done, monkeypatch, tmp_path):
    import pi_lora.merge as merge_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "merged" / "model.safetensors"))

    monkeypatch.setattr(merge_mod, "merge", full)
    message = refused(["merge", str(done), "--output", str(tmp_path / "merged")])
    assert f"No space left on device: '{tmp_path / 'merged' / 'model.safetensors'}'" in message


def test_damaged_metrics_lines_are_dropped(tmp_path):
    (tmp_path / run.METRICS).write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{"step": 3}\n')
    assert run.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# 10. Never destroy what was there ---------------------------------------------------------------


def new_run_started(out: Path, steps: int) -> bool:
    """The run in `out` is the new one (its recipe says `steps`), not the one it replaces."""
    try:
        return f"steps: {steps}\n" in (out / run.RECIPE).read_text()
    except OSError:
        return False


def test_overwrite_stopped_before_its_first_checkpoint_keeps_the_previous_run(done, tiny_base, corpus, tmp_path):
    out = copy_run(done, tmp_path / "run")
    before = tree(out)
    proc = spawn(args(tiny_base, corpus, out, "--overwrite", "--steps", "397"))
    wait_until(proc, lambda: new_run_started(out, 397))
    proc.send_signal(signal.SIGINT)
    text = " ".join(proc.communicate(timeout=120)[0].split())
    assert proc.returncode == 130, text
    assert "previous run" in text and "kept" in text and "Traceback" not in text
    assert tree(out) == before and not [p for p in tmp_path.iterdir() if run.MARK in p.name]


def test_overwrite_killed_before_its_first_checkpoint_keeps_the_previous_run(done, tiny_base, corpus, tmp_path):
    out = copy_run(done, tmp_path / "run")
    before = tree(out)
    proc = spawn(args(tiny_base, corpus, out, "--overwrite", "--steps", "397"))
    wait_until(proc, lambda: new_run_started(out, 397))
    kill(proc)
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(out), "--steps", "8"])
    assert result.exit_code == 0, result.output
    assert "restored the previous run" in " ".join(result.output.split())
    assert tree(out) == before and not [p for p in tmp_path.iterdir() if run.MARK in p.name]


def poison(folder: Path, value: float) -> None:
    """Every lora_B of the adapter in `folder` set to `value`: finite weights whose model is not."""
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: t.fill_(value) if "lora_B" in k else t for k, t in tensors.items()}, weights)


def test_a_model_that_computes_nan_fails_verification(done, tmp_path):
    out = copy_run(done, tmp_path / "run")
    poison(out / run.ADAPTER, 1e30)  # what --lr 1e30 made: finite weights, overflowing logits
    message = refused(["merge", str(out), "--output", str(tmp_path / "merged")])
    assert "verification failed" in message and "NaN" in message and not (tmp_path / "merged").exists()
    message = refused(["export", str(out), "--format", "gguf", "--output", str(tmp_path / "m.gguf"),
                       "--tokenizer-pre", "gpt-2"])
    assert "failed" in message and not (tmp_path / "m.gguf").exists()


def test_weights_that_became_nan_are_not_saved(tiny_base, corpus, tmp_path):
    out = tmp_path / "run"
    message = refused(args(tiny_base, corpus, out, "--steps", "1", "--set", "train.weight_decay=1e300"))
    assert "NaN or infinite" in message and "train.weight_decay" in message
    assert not out.exists()


def test_eval_never_replaces_a_base_or_an_input(done, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    out = copy_run(done, tmp_path / "run")
    meta = json.loads((out / run.META).read_text())
    (out / run.META).write_text(json.dumps({**meta, "base_path": str(base)}))
    before = tree(base)
    message = refused(["eval", str(out), "--output", str(base), "--overwrite", "--quick", "--lengths", "64"])
    assert "which this command reads" in message and tree(base) == before


@pytest.mark.parametrize("where", ["adapter", "base", "run"])
def test_merge_never_writes_over_its_own_inputs(done, tiny_base, tmp_path, where):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    out = copy_run(done, tmp_path / "run")
    target = {"adapter": out / run.ADAPTER, "base": base, "run": out}[where]
    before, base_before = tree(out), tree(base)
    message = refused(["merge", str(out), "--base", str(base), "--output", str(target), "--overwrite"])
    assert "which this command reads" in message
    assert tree(out) == before and tree(base) == base_before


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_overwrite_leaves_a_users_files_alone(done, tmp_path, command):
    out = copy_run(done, tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine too")
    extra = ["--quick", "--lengths", "64"] if command == "eval" else []
    assert "is a file" in refused([command, str(out), "--output", str(notes), "--overwrite", *extra])
    assert "left alone" in refused([command, str(out), "--output", str(folder), "--overwrite", *extra])
    assert notes.read_text() == "mine" and (folder / "thesis.tex").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt", "run"]
    assert RUNNER.invoke(app, ["merge", str(out), "--output", str(tmp_path / "merged")]).exit_code == 0
    assert notes.read_text() == "mine" and (folder / "thesis.tex").read_text() == "mine too"


EVAL_ARGS = ["--lengths", "64,256", "--stride", "16", "--windows", "40", "--trials", "30", "--distances", "16"]


def test_eval_overwrite_stopped_keeps_the_earlier_results(done, corpus, tmp_path):
    out = copy_run(done, tmp_path / "run")
    first = RUNNER.invoke(app, ["eval", str(out), "--quick", "--lengths", "256", "--data", str(corpus)])
    assert first.exit_code == 0, first.output
    before = tree(out / run.EVAL)
    assert set(before) == {"results.json", "plot.png"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = spawn(["eval", str(out), "--overwrite", "--data", str(corpus), *EVAL_ARGS])
        # under way: its lock is taken (and, before the fix, the old results were deleted at once)
        wait_until(proc, lambda: run.lock_file(out / run.EVAL).exists() or not (out / run.EVAL).exists())
        proc.send_signal(sig)
        text = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, text
        assert "interrupted" in text and "Traceback" not in text and len(text.strip().splitlines()) <= 3, text
        assert tree(out / run.EVAL) == before
    assert not [p for p in out.iterdir() if run.MARK in p.name or p.name.endswith(".lock")]


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pi_lora import run
    run.EXCHANGE = False  # the two-rename replacement, as where the OS cannot swap
    rename = Path.rename
    def slow(self, target):
        out = rename(self, target)
        if str(target).endswith(".old") and Path(target).name.startswith(".adapter"):
            print("between", flush=True)
            time.sleep(600)
        return out
    Path.rename = slow
    from pi_lora.cli import main
    sys.argv = ["pi-lora", *sys.argv[1:]]
    main()
""")


def test_kill_between_the_renames_of_the_final_adapter_is_recovered(done, tmp_path):
    out = copy_run(done, tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BETWEEN_RENAMES, "train", "--resume", "--output", str(out),
                             "--steps", "10"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    for line in proc.stdout:
        if line.strip() == "between":
            break
    kill(proc)
    assert not (out / run.ADAPTER).exists()  # the state a kill there leaves
    merged = RUNNER.invoke(app, ["merge", str(out), "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output  # the previous adapter is back
    result = RUNNER.invoke(app, ["train", "--resume", "--output", str(out), "--steps", "10"])
    assert result.exit_code == 0, result.output
    assert "written again from step-10" in " ".join(result.output.split())
    assert run.read_meta(out)["adapter_step"] == 10
    assert (out / run.ADAPTER / "adapter_model.safetensors").read_bytes() == \
        (out / run.CHECKPOINTS / "step-10" / run.ADAPTER / "adapter_model.safetensors").read_bytes()
    assert not [p for p in out.iterdir() if run.MARK in p.name]


def test_replacing_a_folder_swaps_it_in_one_step(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with run.writing(final), run.atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"] and list(tmp_path.iterdir()) == [final]


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_sigterm_is_one_line_and_exit_130(done, corpus, tmp_path, command):
    out = copy_run(done, tmp_path / "run")
    argv = ["merge", str(out)] if command == "merge" else ["eval", str(out), "--data", str(corpus), *EVAL_ARGS]
    target = out / (run.MERGED if command == "merge" else run.EVAL)
    proc = spawn(argv)
    wait_until(proc, lambda: run.lock_file(target).exists())
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted" in text and "Traceback" not in text, text
    assert not target.exists() or command == "eval"


@pytest.mark.parametrize("delay", [0.1, 0.25, 0.4, 0.6, 0.9])
def test_interrupt_while_starting_is_one_line(delay):
    """Ctrl-C at any moment of a short command (imports, typer's parsing, the command, its exit): the
    one line and 130, or the command's own output and 0 once it has ended; never a traceback or a
    death by the signal."""
    proc = spawn(["recipes", "validate", "demo"])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    last = text.strip().splitlines()[-1] if text.strip() else ""
    assert "Traceback" not in text, text
    assert (proc.returncode, last.split(" ")[0].rstrip(";.")) in ((130, "interrupted"), (0, "ok")), text


@pytest.mark.parametrize("how", ["exec", "typer"])
def test_a_handled_interrupt_exits_130_with_its_line(how):
    """A KeyboardInterrupt raised inside exec() of a string (dataclasses makes every class so, while
    the libraries import) makes CPython 3.11 kill the process with SIGINT after a clean exit 130; and
    typer turns one raised while it parses into a silent exit 130. Both end in the one line and 130."""
    raise_it = {"exec": "exec('raise KeyboardInterrupt')",
                "typer": "import typer\ntry:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt as e:\n"
                         "    try:\n        raise typer.Exit(130) from e\n    except typer.Exit as x:\n"
                         "        sys.exit(x.exit_code)"}[how]
    code = ("import sys\nimport pi_lora.cli\ndef fake():\n" + "\n".join("    " + line for line in raise_it.splitlines())
            + "\npi_lora.cli.main = fake\nfrom pi_lora.__main__ import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "interrupted.\n")


@pytest.fixture
def mount(tmp_path):
    """mount(folder, options): a real mount for this test (root only), unmounted after."""
    mounted = []

    def make(folder: Path, *options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or subprocess.run(["mount", *options, str(folder)], capture_output=True).returncode:
            pytest.skip("needs mount (root)")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_run_on_a_read_only_mount_is_merged_and_exported_elsewhere(done, tmp_path, mount):
    source = copy_run(done, tmp_path / "src" / "run")
    ro = mount(tmp_path / "ro", "--bind", "-o", "ro", str(source.parent))
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    for argv in (["merge", str(ro / "run"), "--output", str(tmp_path / "merged")],
                 ["export", str(ro / "run"), "--output", str(tmp_path / "peft")]):
        result = RUNNER.invoke(app, argv)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()


def test_a_full_disk_is_named_as_such(done, tmp_path, mount):
    out = copy_run(done, tmp_path / "run")
    small = mount(tmp_path / "small", "-t", "tmpfs", "-o", "size=200k", "tmpfs")  # the base's weights: 560 kB
    message = refused(["merge", str(out), "--output", str(small / "merged"), "--no-verify"])
    assert "not enough disk" in message and str(small) in message  # foreseen
    medium = mount(tmp_path / "medium", "-t", "tmpfs", "-o", "size=700k", "tmpfs")  # the merge fits, the GGUF not
    message = refused(["export", str(out), "--format", "gguf", "--output", str(medium / "m.gguf"), "--no-verify",
                       "--tokenizer-pre", "gpt-2"])
    assert f"the disk is full: cannot write '{medium / 'm.gguf'}'" in message  # met
    assert list(small.iterdir()) == [] and list(medium.iterdir()) == []


def test_a_run_folder_deleted_while_training_stops_the_run(tiny_base, corpus, tmp_path):
    out = tmp_path / "run"
    proc = spawn(args(tiny_base, corpus, out, "--steps", "400", "--set", "train.save_every=3"))
    wait_for_step(proc, out, 1)
    shutil.rmtree(out)
    text = " ".join(proc.communicate(timeout=240)[0].split())
    assert proc.returncode == 2 and "was deleted or moved while training" in text and "Traceback" not in text, text
    assert not out.exists()


def test_tensorboard_writing_into_a_deleted_run_folder_is_one_line(tmp_path, capfd):
    """TensorBoard's writer thread fails on the deleted folder: the run's one line, no thread traceback."""
    from pi_lora import tracking

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / run.META).write_text("{}")
    tracker = tracking.Tracker(folder, ["tensorboard"], 0, {})
    tracker.log({"step": 1, "loss": 1.0})
    shutil.rmtree(folder / tracking.TENSORBOARD)  # the folder goes part by part: pi_lora.json is still there
    with pytest.raises(PiLoraError, match="was deleted or moved while training"):
        tracker.log({"step": 2, "loss": 1.0})
    shutil.rmtree(folder)
    tracker.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("text, says", [
    (b"model:\n  base: demo\n  # caf\xe9\n", "is not UTF-8 text (byte 0xe9"),
    (b"train:\n  steps: 3\ntrain:\n  lr: 0.1\n", "key 'train' is given twice"),
    (b"a: " + b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'a: &a ["x","x"]\n' + b"".join(b"%c: &%c [*%c,*%c]\n" % (98 + i, 98 + i, 97 + i, 97 + i) for i in range(9)),
     "YAML aliases"),
    ("lora:\n  ŕank: 4\n".encode(), "lora.ŕank: unknown key"),
])
def test_hostile_recipes_are_one_line(tmp_path, text, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text)
    assert says in refused(["recipes", "validate", str(recipe)])


@pytest.mark.parametrize("setting, says", [
    (".=1", "'.' has an empty name"), ("train..steps=3", "'train..steps' has an empty name"),
    ("train.seed=18446744073709551616", "train.seed"), ("train.lr=1e30", "train.lr"),
    ("train.steps=99999999999999999999", "train.steps"), ("train.weight_decay=.inf", "train.weight_decay"),
])
def test_settings_out_of_range_are_named(tiny_base, corpus, tmp_path, setting, says):
    out = tmp_path / "out"
    assert says in refused(["train", "--base", str(tiny_base), "--data", str(corpus), "--output", str(out),
                            "--set", "rope.target_len=256", "--set", setting])
    assert not out.exists()


@pytest.mark.parametrize("content, says", [(b"", "is empty"), (b'{"text": "caf\xe9"}\n', "is not UTF-8 text")])
def test_bad_jsonl_is_one_line(tiny_base, tmp_path, content, says):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(content)
    assert says in refused(args(tiny_base, source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_tilde_in_output_is_the_home_folder(monkeypatch, tmp_path):
    from pi_lora import recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    resolved, _ = recipe.resolve({}, ["output=~/runs/x"], {"model.base": "demo", "rope.target_len": 256})
    assert resolved.output == str(tmp_path / "runs" / "x")


@pytest.mark.parametrize("make", ["atomic_dir", "scratch", "write_text"])
def test_a_signal_just_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, make):
    """Ctrl-C lands between the syscall that makes the temporary and the code that owns it."""
    final = tmp_path / "out"
    real_mkdir, real_open, fired = Path.mkdir, os.open, []

    def mkdir(self, *a, **k):
        real_mkdir(self, *a, **k)
        if run.MARK in self.name and not fired:
            fired.append(self)
            raise KeyboardInterrupt

    def open_(path, flags, *a, **k):  # the temporary file's creation only (rmtree opens folders too)
        fd = real_open(path, flags, *a, **k)
        if run.MARK in str(path) and flags & os.O_CREAT and not fired:
            fired.append(path)
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(KeyboardInterrupt):
        if make == "write_text":
            run.write_text(final, "x")
        else:
            with getattr(run, make)(final):
                pass
    assert fired and list(tmp_path.iterdir()) == []


def test_a_signal_a_library_turns_into_its_own_error_is_still_an_interruption(capsys):
    """safetensors' get_tensor, interrupted, raises ValueError: the command still ends as interrupted."""
    import typer
    from pi_lora.cli import handled

    @handled
    def reads_a_tensor():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                time.sleep(0.01)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    @handled
    def fails_by_itself():
        raise ValueError("a bug")

    with pytest.raises(typer.Exit) as stopped:
        reads_a_tensor()
    assert stopped.value.exit_code == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug"):  # no signal: a crash stays a crash
        fails_by_itself()


@pytest.mark.parametrize("make", ["atomic_dir", "write_text", "progress"])
def test_a_signal_python_ignores_in_a_destructor_still_keeps_the_old_output(tmp_path, make):
    """A SIGTERM raised inside a __del__ is printed as "Exception ignored" and the code goes on: the
    output the user asked to keep must not be replaced on the way out."""
    from pi_lora.errors import interrupts

    final = tmp_path / "out"
    run.write_text(final, "old") if make == "write_text" else final.mkdir()

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here and its KeyboardInterrupt is ignored

    printed = []  # what Python would print as "Exception ignored in ..." with its traceback
    with _unraisable_to(printed), interrupts(), pytest.raises(KeyboardInterrupt):
        if make == "write_text":
            Collected()
            run.write_text(final, "new")
        elif make == "atomic_dir":
            with run.atomic_dir(final) as tmp:
                (tmp / "new").write_text("new")
                Collected()
        else:  # a long loop stops at its next step, not when it is done
            with progress_bar(Console(file=io.StringIO())) as bar:
                task = bar.add_task("work", total=3)
                Collected()
                bar.advance(task)
                final.rmdir()  # not reached
    assert (final.read_text() == "old") if make == "write_text" else list(final.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert printed == []


@contextlib.contextmanager
def _unraisable_to(found: list):
    previous, sys.unraisablehook = sys.unraisablehook, found.append
    try:
        yield
    finally:
        sys.unraisablehook = previous


def test_an_ignored_error_in_a_destructor_is_still_printed_when_no_signal_came():
    from pi_lora.errors import interrupts

    class Broken:
        def __del__(self):
            raise KeyboardInterrupt  # not from a signal: Python's report is the user's only trace

    printed = []
    with _unraisable_to(printed), interrupts():
        Broken()
    assert [u.exc_type for u in printed] == [KeyboardInterrupt]


def test_library_progress_bars_stay_off_the_commands_output(done, tmp_path):
    """transformers' GGUF reader draws a tqdm bar no setting of its own turns off ("Converting and
    de-quantizing GGUF tensors"): `export --format gguf` reads its file back through it to verify."""
    out = tmp_path / "m.gguf"
    proc = spawn(["export", str(done), "--format", "gguf", "--output", str(out)])
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text
    assert out.stat().st_size > 0 and "logits" in text  # the verification read it back
    assert "de-quantizing" not in text and "it/s]" not in text
