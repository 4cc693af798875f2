"""`pi-lora eval`: perplexity against a direct computation, passkey prompt and scorer, run == merged."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from pi_lora import evaluate as ev
from pi_lora import merge as merge_mod
from pi_lora.cli import app
from pi_lora.errors import PiLoraError

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def direct_sliding(net, ids, length, stride):
    """Oracle: full logits and -100 labels. Window ends at length, length + stride, ..., the data's end;
    each window scores the tokens after the previous window's end."""
    stride = min(stride, length - 1)
    ends = list(range(min(length, len(ids)), len(ids), stride)) + [len(ids)]
    total, counted, prev_end = 0.0, 0, 1
    for end in dict.fromkeys(ends):
        begin = max(0, end - length)
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : prev_end - begin] = -100
        with torch.no_grad():
            logits = net(input_ids=x).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        total += loss.item()
        counted += (labels[0, 1:] != -100).sum().item()
        prev_end = end
    return math.exp(total / counted)


def test_chunked_nll_equals_full_logits(tiny):
    ids = torch.randint(0, 500, (60,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny(input_ids=ids[None]).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(ev.token_nll(tiny, ids, chunk=7), want, rtol=1e-5, atol=1e-5)


def test_one_window_is_plain_perplexity(tiny):
    ids = torch.randint(0, 500, (50,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = tiny(input_ids=ids[None], labels=ids[None]).loss
    ppl, n = ev.sliding_perplexity(tiny, ids, length=64, stride=256)
    assert n == 49 and ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)


@pytest.mark.parametrize("n, length, stride", [(100, 40, 16), (97, 32, 32), (64, 64, 10), (81, 20, 7)])
def test_sliding_window_matches_direct_computation(tiny, n, length, stride):
    ids = torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n))
    ppl, counted = ev.sliding_perplexity(tiny, ids, length, stride)
    assert counted == n - 1  # every token but the first scored once, edges included
    assert ppl == pytest.approx(direct_sliding(tiny, ids, length, stride), rel=1e-5)


def test_position_bins_cover_full_windows(tiny):
    ids = torch.randint(0, 500, (130,), generator=torch.Generator().manual_seed(3))
    bins = ev.position_perplexity(tiny, ids, 64, 4)
    nll = torch.cat([ev.token_nll(tiny, ids[s : s + 64]) for s in (0, 64)])
    assert math.exp(sum(math.log(b) for b in bins) / 4) == pytest.approx(math.exp(nll.mean().item()), rel=0.05)
    with pytest.raises(PiLoraError, match="fewer than 256"):
        ev.position_perplexity(tiny, ids, 256, 4)


@pytest.mark.parametrize("length, depth", [(300, 40), (300, 150), (500, 400), (256, 0)])
def test_passkey_prompt_places_the_key_and_has_the_length(tokenizer, length, depth):
    prompt, answer = ev.passkey_prompt(tokenizer, length, depth, 48213)
    assert len(prompt) == length and answer == "48213"
    info = tokenizer(" The pass key is 48213.", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(prompt)) if prompt[i : i + len(info)] == info]
    head = len(tokenizer(ev.TASK + " ", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert starts == [max(depth, head)]  # once, at the requested depth (never inside the task text)
    assert tokenizer.decode(prompt).rstrip().endswith(ev.QUESTION)


def test_passkey_prompt_too_short():
    tok = type("T", (), {"bos_token_id": None, "__call__": lambda self, t, **k: {"input_ids": list(t)}})()
    with pytest.raises(PiLoraError, match="too short"):
        ev.passkey_prompt(tok, 20, 5, 12345)


def test_passkey_scorer_accepts_exactly_the_key():
    assert ev.passkey_found(" 48213. Remember", "48213")
    assert ev.passkey_found("48213", "48213")
    assert not ev.passkey_found(" 482134", "48213")
    assert not ev.passkey_found(" 4821", "48213")
    assert not ev.passkey_found(" the key", "48213")
    assert not ev.passkey_found(" 11111 48213", "48213")


def test_effective_window():
    assert ev.effective_window({100: 1.0, 200: 0.4, 300: 0.2, 400: 0.0, 500: 1.0}) == 300
    assert ev.effective_window({100: 0.1, 200: 1.0}) == 0


def test_rope_option():
    assert ev.parse_rope("none") == 1.0 and ev.parse_rope("linear:4") == 4.0 and ev.parse_rope(None) is None
    for bad in ("linear", "yarn:2", "linear:0.5"):
        with pytest.raises(PiLoraError):
            ev.parse_rope(bad)


def test_eval_of_run_equals_eval_of_merged_and_writes_outputs(tiny_base, corpus, tmp_path):
    out = tmp_path / "run"
    trained = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                  "--output", str(out), "--steps", "2", "--grad-accum", "1", "--lr", "1e-2",
                                  "--set", "lora.trainable=[norm]"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    merged = tmp_path / "merged"
    merge_mod.merge(out, merged, check=False)
    result = RUNNER.invoke(app, ["eval", str(out), str(merged), str(tiny_base), "--lengths", "64,128,256",
                                 "--data", str(corpus), "--quick", "--output", str(tmp_path / "ev")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    run_r, merged_r, base_r = data[str(out)], data[str(merged)], data[str(tiny_base)]
    for n in ("64", "128", "256"):
        assert run_r["perplexity"][n] == pytest.approx(merged_r["perplexity"][n], rel=1e-4)
    assert run_r["passkey"]["accuracy"] == merged_r["passkey"]["accuracy"]
    assert base_r["perplexity"]["64"] != pytest.approx(run_r["perplexity"]["64"], rel=1e-4)
    assert (tmp_path / "ev" / "plot.png").stat().st_size > 10_000
    assert "perplexity by length" in result.output


def test_eval_bad_input(tiny_base, corpus, tmp_path):
    too_long = RUNNER.invoke(app, ["eval", str(tiny_base), "--lengths", "100000", "--data", str(corpus),
                                   "--output", str(tmp_path / "e")])
    assert too_long.exit_code == 2 and "the data holds" in too_long.output
    unknown = RUNNER.invoke(app, ["eval", "./no/such/model", "--data", str(corpus)])
    assert unknown.exit_code == 2 and "does not exist" in unknown.output
    bad = RUNNER.invoke(app, ["eval", str(tiny_base), "--lengths", "a,b", "--data", str(corpus)])
    assert bad.exit_code == 2
