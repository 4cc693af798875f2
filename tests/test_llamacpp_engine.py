"""`pi-lora eval --engine llama.cpp` and `export --llamacpp-check`: a GGUF measured by llama.cpp itself.

The slow tests run llama.cpp's llama-perplexity and llama-completion (tests/llamacpp.py builds them)
on a tiny PI run (trained length 64, extended to 256): llama.cpp's perplexity past 64 tokens equals
transformers' on the merged model, and a GGUF written without its rope scaling fails the export's check
by name, leaving no file.
"""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llamacpp as build  # tests/llamacpp.py
from pi_lora import export, llamacpp
from pi_lora.cli import app
from pi_lora.errors import PiLoraError
from test_gguf import train
from test_real_model import missing

RUNNER = CliRunner()
TOLERANCE = 1e-3  # relative, fp32 GGUF and fp32 KV cache against fp32 transformers: summation order only


# --- quick ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, scored", [(64, 100), (256, 127), (17, 1), (1000, 5000)])
def test_windows_score_contiguous_tokens_ending_together(length, scored):
    end = 10_000
    spans = llamacpp.windows(length, scored, end)
    scored_tokens = [t for b, e in spans for t in range(b + length // 2 + 1, e)]  # what llama-perplexity scores
    assert scored_tokens == list(range(end - len(scored_tokens), end)) and len(scored_tokens) >= scored
    assert all(e - b == length for b, e in spans) and len(scored_tokens) - scored < length // 2
    assert llamacpp.span([length], scored) == end - spans[0][0]


def test_tokens_file_is_what_llama_perplexity_reads(tmp_path):
    """Header, tokens, then a hole of the log-probability rows llama.cpp's kl_divergence reads per chunk."""
    path = tmp_path / "t.kld"
    llamacpp.tokens_file(path, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], n_vocab=7)
    data = path.read_bytes()
    assert data[:8] == b"_logits_" and int.from_bytes(data[8:12], "little") == 6
    assert [int.from_bytes(data[i:i + 4], "little") for i in range(12, 20, 4)] == [7, 2]
    assert [int.from_bytes(data[i:i + 4], "little") for i in range(20, 68, 4)] == list(range(1, 13))
    rows, width = 6 - 1 - 3, 2 * 4 + 4
    assert len(data) == 68 + 2 * rows * width * 2 and not any(data[68:])


def test_engine_without_llamacpp_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PI_LORA_LLAMA_CPP", str(tmp_path))
    result = RUNNER.invoke(app, ["eval", str(tmp_path / "m.gguf"), "--engine", "llama.cpp"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "llama-perplexity and llama-completion" in line and "PI_LORA_LLAMA_CPP" in line


# --- llama.cpp itself ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools():
    archive = build.sdist()
    if archive is None:
        missing("the llama-cpp-python sdist")
    bin_dir = build.build(archive, jobs=int(os.environ.get("LLAMACPP_JOBS", os.cpu_count() or 2)))
    build.extra(bin_dir, "llama-completion")
    os.environ["PI_LORA_LLAMA_CPP"] = str(bin_dir)
    yield bin_dir
    os.environ.pop("PI_LORA_LLAMA_CPP", None)


@pytest.fixture(scope="module")
def pi_run(tiny_base, corpus, tmp_path_factory):
    return train(tiny_base, corpus, tmp_path_factory.mktemp("pi") / "run", target_len=256)


@pytest.fixture(scope="module")
def yarn_run(tiny_base, corpus, tmp_path_factory):
    return train(tiny_base, corpus, tmp_path_factory.mktemp("yarn") / "run", target_len=256, scaling="yarn")


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["linear", "yarn"])  # PI, and the default
def test_gguf_perplexity_in_llamacpp_equals_transformers_past_the_base_length(tools, request, scaling, corpus,
                                                                             tmp_path):
    pi_run = request.getfixturevalue("pi_run" if scaling == "linear" else "yarn_run")
    assert json.loads((pi_run / "pi_lora.json").read_text())["rope_type"] == scaling
    gguf = tmp_path / "pi.gguf"
    export.export_gguf(pi_run, gguf, "fp32")
    merged = tmp_path / "merged"
    assert RUNNER.invoke(app, ["merge", str(pi_run), "-o", str(merged)]).exit_code == 0
    out = tmp_path / "eval"
    result = RUNNER.invoke(app, ["eval", str(merged), str(gguf), "--engine", "llama.cpp", "--lengths", "64,256",
                                 "--source", str(corpus), "--trials", "1", "--distances", "2", "--no-passkey-check",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())["results"]
    ours, theirs = saved[str(merged)], saved[f"{gguf} (llama.cpp)"]
    assert theirs["engine"] == "llama.cpp" and theirs["max_len"] == 256 and theirs["trained_len"] == 64
    for length in ("64", "256"):  # 256: four times the base's length, under the run's x4
        assert theirs["perplexity"][length] == pytest.approx(ours["perplexity"][length], rel=TOLERANCE)
        assert theirs["scored_tokens"][length] == ours["scored_tokens"][length] >= 2048
    assert theirs["perplexity"]["256"] < 1e4  # a real figure, not a broken model's
    assert set(theirs["passkey"]["256"]["accuracy"]) == set(ours["passkey"]["256"]["accuracy"])


@pytest.mark.slow
def test_gguf_without_its_rope_scaling_fails_the_llamacpp_check_by_name(tools, pi_run, tmp_path, monkeypatch):
    """An exporter that forgot the scaling: llama.cpp runs plain RoPE, the check says so, no file is left."""
    plain = lambda writer, pi: writer.add_rope_freq_base(pi.rope_parameters()["rope_theta"])  # noqa: E731
    monkeypatch.setattr(export, "add_rope", plain)
    out = tmp_path / "broken.gguf"
    result = RUNNER.invoke(app, ["export", str(pi_run), "--format", "gguf", "--dtype", "fp32", "--no-verify",
                                 "--llamacpp-check", "-o", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error")]
    assert "llama.cpp check failed: perplexity at 256 tokens" in line
    assert "the GGUF has no rope scaling, the run was trained with linear x4" in line
    assert not out.exists() and not list(tmp_path.glob(".*pi-lora*"))


@pytest.mark.slow
def test_llamacpp_check_passes_a_good_export_and_says_what_it_measured(tools, pi_run, tmp_path):
    out = tmp_path / "good.gguf"
    checked = export.export_gguf(pi_run, out, "fp16", llamacpp_check=True)
    assert out.is_file() and "perplexity" in checked.llamacpp and "passkey answered alike in 2 prompts" in checked.llamacpp


def test_check_names_a_rope_that_is_not_the_runs(tmp_path, monkeypatch):
    meta = {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, "original_len": 64}
    monkeypatch.setattr(llamacpp, "describe_rope", lambda path: ({"rope_type": "default", "rope_theta": 1e4}, 256, 256))
    assert llamacpp.rope_mismatch(Path("x.gguf"), meta).startswith("the GGUF has no rope scaling, the run was trained "
                                                                   "with linear x4")
    monkeypatch.setattr(llamacpp, "describe_rope", lambda path: (meta["rope_parameters"], 256, 64))
    assert llamacpp.rope_mismatch(Path("x.gguf"), meta) is None
    with pytest.raises(PiLoraError, match="too short"):
        llamacpp.windows(2, 10, 100)
