"""`pi-lora eval --tasks`: lm-evaluation-harness tasks (RULER) on the model eval builds, offline.

The oracle: a tiny model whose generation is replaced by one that reads the needle out of the prompt
and answers it when the prompt is under 700 tokens, nothing otherwise. RULER's niah_single_1 must
then score 100% at 512 tokens and 0% at 1,024 in pi-lora's table, as the harness itself scores the
same model when called directly.
"""

import json
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from pi_lora import evaluate as ev
from pi_lora import tasks
from pi_lora.cli import app

RUNNER = CliRunner()
NEEDLE = re.compile(r"special magic numbers? for (\S+) is: (\d+)")
ANSWERED_BELOW = 700  # prompt tokens


def needle_reader(net, tokenizer):
    """net.generate answering from the prompt's needle when the prompt is short: an oracle of known score."""

    def generate(input_ids, **kwargs):
        text = tokenizer.decode(input_ids[0])
        found = NEEDLE.search(text)
        answer = f" {found.group(2)}." if found and input_ids.shape[1] < ANSWERED_BELOW else " I do not know."
        ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)

    net.generate = generate
    return net


@pytest.fixture
def oracle_subjects(monkeypatch):
    load = ev.load_subject

    def loaded(*args, **kwargs):
        subject = load(*args, **kwargs)
        needle_reader(subject.net, subject.tokenizer)
        return subject

    monkeypatch.setattr(ev, "load_subject", loaded)


def test_ruler_task_at_two_lengths_is_the_harness_score(tiny_base, tmp_path, oracle_subjects, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval"
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--scaling", "linear:16", "--lengths", "512,1024",
                                 "--tasks", "niah_single_1", "--task-limit", "3", "--no-perplexity", "--no-passkey",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["tasks"] == ["niah_single_1"] and saved["settings"]["task_limit"] == 3
    (entry,) = [r["tasks"]["niah_single_1"] for r in saved["results"].values()]
    assert entry == {"metric": "L", "samples": {"512": 3, "1024": 3}, "score": {"512": 1.0, "1024": 0.0}}
    assert "niah_single_1" in result.output and "100%" in result.output
    # progress on pi-lora's own display, one line per length; the harness's bars and prints dropped
    assert "tasks at 512: 3/3 (100%)" in result.output and "tasks at 1,024: 3/3 (100%)" in result.output
    assert "generate_until" not in result.output and "Generating synthetic samples" not in result.output
    assert (out / "plot.png").stat().st_size > 0

    # the harness on its own, one length per call (its limit counts samples per task, not per length)
    subject = ev.load_subject(str(tiny_base), ev.parse_rope("linear:16"))
    direct = {}
    for length in (512, 1024):
        lm = HFLM(pretrained=subject.net, tokenizer=subject.tokenizer, batch_size=1, max_length=length + 256)
        got = lm_eval.simple_evaluate(model=lm, tasks=["niah_single_1"], limit=3, bootstrap_iters=0,
                                      metadata={"max_seq_lengths": [length], "tokenizer": str(tiny_base)})
        direct[str(length)] = got["results"]["niah_single_1"][f"{length},none"]
    assert direct == entry["score"]


def test_a_task_that_downloads_says_so_offline(tiny_base, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--scaling", "linear:16", "--lengths", "1024",
                                 "--tasks", "niah_single_2", "--task-limit", "1", "--no-perplexity", "--no-passkey",
                                 "-o", str(tmp_path / "eval")])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error")]
    assert "niah_single_2 downloads Paul Graham's essays" in line and "niah_single_1" in line
    assert not (tmp_path / "eval").exists()


def test_an_unknown_task_fails_before_any_model_loads(tmp_path):
    pytest.importorskip("lm_eval")
    result = RUNNER.invoke(app, ["eval", str(tmp_path / "no-such-model"), "--tasks", "niah_single_9"])
    assert result.exit_code == 2 and "no lm-evaluation-harness task named niah_single_9" in result.output


def test_tasks_without_the_harness_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    result = RUNNER.invoke(app, ["eval", str(tmp_path / "model"), "--tasks", "niah_single_1"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line == f"error: --tasks runs lm-evaluation-harness, which is not installed: {tasks.EXTRA}"


def test_a_run_that_trained_a_tied_embedding_runs_tasks(corpus, tmp_path, oracle_subjects, monkeypatch):
    """SmolLM2 ties its head to its embedding; a run that trains the embedding wraps both in peft's
    ModulesToSaveWrapper, which the harness's re-tie of the weights used to fail on."""
    pytest.importorskip("lm_eval")
    from pi_lora.demo import build_tiny_llama

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = build_tiny_llama(tmp_path / "tied", tie_word_embeddings=True, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    out = tmp_path / "run"
    trained = RUNNER.invoke(app, ["train", "--base", str(base), "--target-len", "1024", "--data", str(corpus),
                                  "--output", str(out), "--steps", "1", "--grad-accum", "1",
                                  "--set", "rope.train_len=64", "--set", "lora.trainable=[embed, norm]"])
    assert trained.exit_code == 0, trained.output
    result = RUNNER.invoke(app, ["eval", str(out), "--no-baselines", "--lengths", "512", "--tasks", "niah_single_1",
                                 "--task-limit", "2", "--no-perplexity", "--no-passkey", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    (entry,) = [r["tasks"]["niah_single_1"] for r in json.loads((tmp_path / "e" / "results.json").read_text())["results"].values()]
    assert entry["score"] == {"512": 1.0}  # the oracle's answer, scored by the harness
