"""`pi-lora eval`: perplexity with L context against direct computations, passkey k_max against an
oracle model, run == merged (deployed) and run --quant nf4 == the 4-bit base + adapter."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from pi_lora import evaluate as ev
from pi_lora import merge as merge_mod
from pi_lora import run
from pi_lora.cli import app
from pi_lora.errors import PiLoraError
from pi_lora.recipe import DataSection

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


# --- perplexity -------------------------------------------------------------------------------------

def test_chunked_nll_equals_full_logits(tiny):
    ids = torch.randint(0, 500, (60,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny(input_ids=ids[None]).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(ev.token_nll(tiny, ids, chunk=7), want, rtol=1e-5, atol=1e-5)


def test_perplexity_windows_build_no_kv_cache(tiny):
    """eval loads its models with use_cache on, for the passkey's generation; a perplexity window's
    forward must not build a cache (at 32k on a 7B model it is 16 GiB for nothing)."""
    tiny.config.use_cache = True
    caches = []
    hook = tiny.model.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values))
    try:
        ev.token_nll(tiny, torch.arange(1, 40))
    finally:
        hook.remove()
    assert caches == [None]


def context_stub(f, h):
    """nll(begin, end) of a stub model: a token's NLL is f(its context inside the window) + h(the token)."""
    calls = []

    def nll(begin, end):
        calls.append((begin, end))
        return torch.tensor([f(j) + h(begin + j) for j in range(1, end - begin)], dtype=torch.float64)

    return nll, calls


@pytest.mark.parametrize("lengths, stride, windows", [([64, 128, 256], 32, 3), ([100, 300], 64, 2), ([50, 200], 16, 5)])
def test_perplexity_at_L_is_the_same_tokens_with_at_least_L_minus_S_context(lengths, stride, windows):
    f = lambda c: 5.0 / (1 + c)  # noqa: E731  context matters: less context, higher NLL
    h = lambda p: (p % 7) / 10  # noqa: E731  and each token has its own difficulty
    first, end = ev.scored_span(max(lengths), stride, windows)
    assert (first, end) == (max(lengths) - stride, max(lengths) - stride + stride * windows)
    nll, calls = context_stub(f, h)
    got = ev.perplexities(nll, lengths, stride, first, end)
    scored = range(max(lengths) - stride, end)  # only tokens with longest - S context at the longest length
    for n in lengths:
        # every chunk of S scored tokens sees contexts n - S .. n - 1 once each
        want = math.exp(sum(f(c) for c in range(n - stride, n)) / stride + sum(h(p) for p in scored) / len(scored))
        assert got[n].perplexity == pytest.approx(want, rel=1e-12)
        assert got[n].tokens == stride * windows and got[n].min_context == n - stride
    assert all(e - b in lengths for b, e in calls) and min(b for b, _ in calls) == 0


def test_stride_one_is_each_token_predicted_by_a_window_ending_at_it(tiny):
    """A direct computation with the model: every scored token predicted from exactly L - 1 tokens."""
    ids = torch.randint(0, 500, (80,), generator=torch.Generator().manual_seed(4))
    lengths, longest = [16, 48], 48
    first, end = ev.scored_span(longest, 1, 32)
    got = ev.perplexities(ev.window_nll(tiny, ids), lengths, 1, first, end)
    for n in lengths:
        nlls = []
        for p in range(first, end):
            with torch.no_grad():
                logits = tiny(input_ids=ids[p - n + 1 : p][None]).logits[0, -1]
            nlls.append(torch.nn.functional.cross_entropy(logits[None], ids[p : p + 1]).item())
        assert got[n].tokens == 32 and got[n].min_context == n - 1
        assert got[n].perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_stride_longer_than_a_length_still_scores_every_token_once():
    nll, _ = context_stub(lambda c: 1.0 / (1 + c), lambda p: 0.0)
    first, end = ev.scored_span(256, 128, 2)
    got = ev.perplexities(nll, [32, 256], 128, first, end)
    assert got[32].tokens == got[256].tokens == 256 and got[32].min_context == 1 and got[256].min_context == 128


def test_position_bins_cover_full_windows(tiny):
    ids = torch.randint(0, 500, (130,), generator=torch.Generator().manual_seed(3))
    bins = ev.position_perplexity(tiny, ids, 64, 4)
    nll = torch.cat([ev.token_nll(tiny, ids[s : s + 64]) for s in (0, 64)])
    assert math.exp(sum(math.log(b) for b in bins) / 4) == pytest.approx(math.exp(nll.mean().item()), rel=0.05)
    with pytest.raises(PiLoraError, match="fewer than 256"):
        ev.position_perplexity(tiny, ids, 256, 4)


# --- passkey ----------------------------------------------------------------------------------------

def key_start(tokenizer, prompt):
    """Where the key's sentence starts: the first ' The pass key is' (the question has the second)."""
    info = tokenizer(" The pass key is", add_special_tokens=False)["input_ids"]
    return next(i for i in range(len(prompt)) if prompt[i : i + len(info)] == info)


@pytest.mark.parametrize("length, distance", [(300, 40), (300, 150), (500, 400), (256, 256), (256, 1)])
def test_passkey_prompt_puts_the_key_at_its_distance_from_the_end(tokenizer, length, distance):
    prompt, answer = ev.passkey_prompt(tokenizer, length, distance, 48213)
    assert len(prompt) == length and answer == "48213"
    info = tokenizer(" The pass key is 48213. Remember it. 48213 is the pass key. ", add_special_tokens=False)["input_ids"]
    question = tokenizer(" " + ev.QUESTION, add_special_tokens=False)["input_ids"]
    head = len(tokenizer(ev.TASK + " ", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    start = key_start(tokenizer, prompt)
    assert prompt[start : start + len(info)] == info
    # distance from the end, within what the task text and the question leave
    assert length - start == min(max(distance, len(info) + len(question)), length - head)
    assert tokenizer.decode(prompt).rstrip().endswith(ev.QUESTION)


def test_passkey_prompt_too_short():
    tok = type("T", (), {"bos_token_id": None, "__call__": lambda self, t, **k: {"input_ids": list(t)}})()
    with pytest.raises(PiLoraError, match="too short"):
        ev.passkey_prompt(tok, 20, 5, 12345)


def test_passkey_scorer_takes_the_first_five_digit_number():
    assert ev.passkey_found(" 48213. Remember", "48213")
    assert ev.passkey_found("48213", "48213")
    assert ev.passkey_found(" the pass key. 48213 is the pass key", "48213")
    assert ev.passkey_found(" 3. The key: 48213", "48213")
    assert not ev.passkey_found(" 482134", "48213")
    assert not ev.passkey_found(" 4821", "48213")
    assert not ev.passkey_found(" the key", "48213")
    assert not ev.passkey_found(" 11111 48213", "48213")


class Oracle(torch.nn.Module):
    """Answers the key only when it lies within `reach` tokens of the end of the prompt."""

    def __init__(self, tokenizer, reach):
        super().__init__()
        self.tokenizer, self.reach = tokenizer, reach
        self.seen = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, **kwargs):
        prompt = input_ids[0].tolist()
        distance = len(prompt) - key_start(self.tokenizer, prompt)
        key = re.search(r"The pass key is (\d{5})", self.tokenizer.decode(prompt)).group(1)
        answer = f" the pass key. {key if distance <= self.reach else '12345'} is it."
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) <= kwargs["max_new_tokens"]
        return torch.tensor([prompt + ids])


@pytest.mark.parametrize("reach, want", [(300, 256), (64, 64), (63, 0), (10, 0), (10_000, 512)])
def test_k_max_grows_outward_from_the_question(tokenizer, reach, want):
    distances = ev.distances_for(512, 8)
    assert distances == [64, 128, 192, 256, 320, 384, 448, 512]
    accuracy = ev.passkey_accuracy(Oracle(tokenizer, reach), tokenizer, 512, distances, trials=2)
    assert ev.effective_window(accuracy) == want  # the largest tested distance <= reach; a perfect model: L


def test_effective_window_stops_at_the_first_failure_from_the_question():
    assert ev.effective_window({100: 1.0, 200: 0.4, 300: 0.2, 400: 0.0, 500: 1.0}) == 300
    assert ev.effective_window({100: 0.1, 200: 1.0}) == 0


def test_table_and_plot_show_accuracy_by_distance(tokenizer):
    results = {"m": {"perplexity": {"64": 3.0}, "scored_tokens": {"64": 32}, "min_context": {"64": 48},
                     "passkey": {"512": {"trials": 2, "accuracy": {"64": 1.0, "256": 0.5, "512": 0.0}, "k_max": 256}}}}
    fig = ev.figure(results)
    right = fig.axes[1]
    assert right.get_xlabel() == "distance from the question (tokens)"
    assert list(right.lines[0].get_xdata()) == [64, 256, 512] and list(right.lines[0].get_ydata()) == [1.0, 0.5, 0.0]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(ev.tables(results))
    text = console.export_text()
    assert "accuracy by distance from the question" in text and "64:100% 256:50% 512:0%" in text
    assert "ctx >= 48" in text and "| 256" not in text


def test_rope_settings():
    assert ev.parse_ropes(None) == [None]
    none, linear = ev.parse_ropes("none, linear:4")
    assert (none.kind, none.factor, linear.kind, linear.factor, linear.text) == ("none", 1.0, "linear", 4.0, "linear:4")
    for bad in ("linear", "cubic:2", "linear:0.5", "none:2", "none,"):
        with pytest.raises(PiLoraError, match="--scaling"):
            ev.parse_ropes(bad)


# --- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    trained = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                  "--output", str(out), "--steps", "2", "--grad-accum", "1", "--lr", "1e-2",
                                  "--set", "lora.trainable=[embed,norm]"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    return out


def test_eval_of_run_equals_eval_of_merged_and_writes_outputs(trained_run, tiny_base, corpus, tmp_path):
    merged = tmp_path / "merged"
    merge_mod.merge(trained_run, merged, check=False)
    result = RUNNER.invoke(app, ["eval", str(trained_run), str(merged), str(tiny_base), "--lengths", "64,128,256",
                                 "--stride", "32", "--data", str(corpus), "--quick", "--passkey-lengths", "192,256",
                                 "--no-passkey-check",
                                 "--output", str(tmp_path / "ev")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    run_r, merged_r, base_r = data[str(trained_run)], data[str(merged)], data[str(tiny_base)]
    for n in ("64", "128", "256"):
        assert run_r["perplexity"][n] == pytest.approx(merged_r["perplexity"][n], rel=1e-4)
        assert run_r["scored_tokens"][n] == 512 and run_r["min_context"][n] == int(n) - 32
    assert set(run_r["passkey"]) == {"192", "256"}
    assert run_r["passkey"]["256"]["accuracy"] == merged_r["passkey"]["256"]["accuracy"]
    assert list(run_r["passkey"]["256"]["accuracy"]) == [str(d) for d in ev.distances_for(256, 8)]
    assert base_r["perplexity"]["64"] != pytest.approx(run_r["perplexity"]["64"], rel=1e-4)
    assert (tmp_path / "ev" / "plot.png").stat().st_size > 10_000
    assert "perplexity with L tokens of context" in result.output


def test_eval_of_run_in_nf4_is_the_4bit_base_plus_adapter(trained_run, corpus, tmp_path):
    """--quant nf4: the numbers of the model as trained, against merge's peft reference of it."""
    result = RUNNER.invoke(app, ["eval", str(trained_run), "--quant", "nf4", "--lengths", "64,256", "--stride", "64",
                                 "--windows", "2", "--no-passkey", "--data", str(corpus), "--output", str(tmp_path / "q")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "q" / "results.json").read_text())["results"][f"{trained_run} [nf4]"]
    meta = run.read_meta(trained_run)
    reference = merge_mod.reference(Path(meta["base_path"]), trained_run / run.ADAPTER, meta, "dequantized")
    first, end = ev.scored_span(256, 64, 2)
    tokens = ev.eval_tokens(DataSection(source=str(corpus), split="test"),
                            AutoTokenizer.from_pretrained(meta["base_path"]), end)
    want = ev.perplexities(ev.window_nll(reference, tokens), [64, 256], 64, first, end)
    for n in (64, 256):
        assert got["perplexity"][str(n)] == pytest.approx(want[n].perplexity, rel=1e-4)
    deployed = RUNNER.invoke(app, ["eval", str(trained_run), "--lengths", "64,256", "--stride", "64", "--windows", "2",
                                   "--no-passkey", "--data", str(corpus), "--output", str(tmp_path / "d")])
    assert deployed.exit_code == 0, deployed.output
    full = json.loads((tmp_path / "d" / "results.json").read_text())["results"][str(trained_run)]
    assert full["perplexity"]["256"] != pytest.approx(got["perplexity"]["256"], rel=1e-4)  # NF4 is not the deployed model


def test_a_run_is_loaded_at_its_revision_and_asks_for_trust_remote_code_again(tmp_path):
    folder = tmp_path / "run"
    (folder / run.ADAPTER).mkdir(parents=True)
    (folder / run.ADAPTER / "adapter_config.json").write_text("{}")
    (folder / run.RECIPE).write_text("model:\n  base: org/model\n  revision: v2\n  trust_remote_code: true\n")
    run.write_json(folder / run.META, {"base": "org/model", "base_path": "org/model", "revision": "0123abc",
                                       "quant": "nf4", "double_quant": False, "compute_dtype": "bfloat16",
                                       "original_len": 64, "target_len": 256, "factor": 4.0, "rope_type": "linear",
                                       "rope_theta": 1e4, "trust_remote_code": True})
    with pytest.raises(PiLoraError, match="--trust-remote-code"):
        ev.section_for(str(folder), "none")  # a shared run folder never grants it by itself
    deployed, _ = ev.section_for(str(folder), "none", trust_remote_code=True)
    assert (deployed.base, deployed.revision, deployed.trust_remote_code, deployed.quant) == ("org/model", "v2", True, "none")
    trained, meta = ev.section_for(str(folder), "nf4", trust_remote_code=True)
    assert (trained.quant, trained.double_quant, trained.compute_dtype) == ("nf4", False, "bf16")
    (folder / run.RECIPE).write_text("model:\n  base: org/model\n")
    assert ev.section_for(str(folder), "none", True)[0].revision == "0123abc"  # the commit training resolved


def test_eval_compares_rope_settings_side_by_side(tiny_base, corpus, tmp_path):
    args = ["--lengths", "64,256", "--stride", "64", "--windows", "1", "--no-passkey", "--data", str(corpus)]
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--scaling", "none,linear:4", *args, "--output", str(tmp_path / "r")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    own = RUNNER.invoke(app, ["eval", str(tiny_base), *args, "--output", str(tmp_path / "own")], catch_exceptions=False)
    assert own.exit_code == 0, own.output
    data = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    plain, pi = data[f"{tiny_base} (scaling none)"], data[f"{tiny_base} (scaling linear:4)"]
    as_is = json.loads((tmp_path / "own" / "results.json").read_text())["results"][str(tiny_base)]
    assert (plain["max_len"], pi["max_len"], as_is["max_len"]) == (64, 256, 64)
    assert plain["perplexity"] == as_is["perplexity"]  # the tiny base has plain RoPE: 'none' changes nothing
    assert pi["perplexity"]["64"] != pytest.approx(plain["perplexity"]["64"], rel=1e-6)  # positions compressed 4x (random weights: a small change)
    assert "(scaling none)" in result.output and "(scaling linear:4)" in result.output
    assert (tmp_path / "r" / "plot.png").is_file()


def test_eval_passkey_alone(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--no-perplexity", "--passkey-lengths", "192", "--distances", "2",
                                 "--trials", "1", "--no-passkey-check", "--data", str(corpus), "--output", str(tmp_path / "k")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "k" / "results.json").read_text())["results"].values()
    assert "perplexity" not in r and list(r["passkey"]["192"]["accuracy"]) == ["96", "192"]
    assert "passkey retrieval" in result.output and "perplexity with" not in result.output


def test_eval_output_is_refused_or_replaced_before_anything_is_measured(tiny_base, tmp_path, monkeypatch):
    """An output holding anything: refused without --overwrite (kept as it was), emptied with it; a
    file, or a folder holding a model being evaluated, refused either way. Nothing loads first."""
    monkeypatch.setattr(ev, "load_subject", lambda *a, **k: pytest.fail("a model was loaded"))
    section = DataSection(source="demo")
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(PiLoraError, match="add --overwrite"):
        ev.evaluate([str(tiny_base)], ev.Settings(lengths=[32]), section, out)
    assert (out / "results.json").read_text() == "{}"
    monkeypatch.setattr(ev, "subjects", lambda specs, s: iter(()))  # measures nothing
    results, where = ev.evaluate([str(tiny_base)], ev.Settings(lengths=[32]), section, out, overwrite=True)
    assert where == out and results == {} and out.is_dir() and not list(out.iterdir())  # the old results are gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(PiLoraError, match="is a file"):
        ev.evaluate([str(tiny_base)], ev.Settings(lengths=[32]), section, tmp_path / "file", overwrite=True)
    held = tmp_path / "models" / "m"  # only its path is used: nothing loads
    held.mkdir(parents=True)
    (held / "config.json").write_text("{}")
    with pytest.raises(PiLoraError, match="which this command reads"):
        ev.evaluate([str(held)], ev.Settings(lengths=[32]), section, held.parent, overwrite=True)
    assert (held / "config.json").is_file()


def test_out_of_memory_outside_training_is_exit_3_in_one_line(tiny_base, corpus, tmp_path, monkeypatch):
    def full(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ev, "evaluate", full)
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--data", str(corpus), "--output", str(tmp_path / "e")])
    assert result.exit_code == 3, result.output
    assert "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_eval_bad_input(tiny_base, corpus, tmp_path):
    too_long = RUNNER.invoke(app, ["eval", str(tiny_base), "--lengths", "100000", "--data", str(corpus),
                                   "--output", str(tmp_path / "e")])
    assert too_long.exit_code == 2 and "the data holds" in too_long.output
    unknown = RUNNER.invoke(app, ["eval", "./no/such/model", "--data", str(corpus)])
    assert unknown.exit_code == 2 and "does not exist" in unknown.output
    for flag, value, says in (("--lengths", "a,b", "--lengths must be"), ("--scaling", "cubic:2", "--scaling takes"),
                              ("--quant", "q3", "'q3' is not one of"), ("--passkey-lengths", "1", "at least 2"),
                              ("--no-passkey", "--no-perplexity", "nothing to measure"),
                              *((option, "0", "greater than or equal to 1") for option in ("--windows", "--stride", "--trials"))):
        bad = RUNNER.invoke(app, ["eval", str(tiny_base), flag, value, "--data", str(corpus)])
        assert bad.exit_code == 2 and says in bad.output, bad.output


# --- the real model (SmolLM2-135M, trained to 8,192 tokens) -----------------------------------------

from test_real_model import KJV, missing, smollm2, smollm2_folder  # noqa: E402,F401  (shared fixtures)


@pytest.fixture(scope="module")
def new_testament(tmp_path_factory):
    if not KJV.is_file():
        missing(str(KJV))
    books = KJV.read_text().splitlines()[39:]  # the 27 New Testament books, after the 39 of the Old
    out = tmp_path_factory.mktemp("nt") / "kjv-nt.jsonl"
    out.write_text("\n".join(books) + "\n")
    return out


@pytest.mark.slow
def test_smollm2_retrieves_the_passkey_at_every_distance_of_2048_token_prompts(smollm2_folder, new_testament, tmp_path):
    result = RUNNER.invoke(app, ["eval", str(smollm2_folder), "--lengths", "2048", "--stride", "1024", "--windows", "1",
                                 "--distances", "4", "--trials", "2", "--data", str(new_testament),
                                 "--output", str(tmp_path / "e")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    keys = json.loads((tmp_path / "e" / "results.json").read_text())["results"][str(smollm2_folder)]["passkey"]["2048"]
    assert list(keys["accuracy"]) == ["512", "1024", "1536", "2048"]
    assert keys["k_max"] >= 1536, keys


@pytest.mark.slow
def test_smollm2_extrapolation_breaks_at_16k_and_pi_x2_holds(smollm2_folder, new_testament, tmp_path):
    """The same 2,048 tokens, with at least 6,144 and 14,336 tokens of context."""
    result = RUNNER.invoke(app, ["eval", str(smollm2_folder), "--scaling", "none,linear:2", "--lengths", "8192,16384",
                                 "--stride", "2048", "--windows", "1", "--no-passkey", "--data", str(new_testament),
                                 "--output", str(tmp_path / "e")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    plain, pi = data[f"{smollm2_folder} (scaling none)"], data[f"{smollm2_folder} (scaling linear:2)"]
    assert plain["scored_tokens"] == pi["scored_tokens"] == {"8192": 2048, "16384": 2048}
    assert plain["min_context"] == {"8192": 6144, "16384": 14336}
    assert plain["perplexity"]["16384"] > 3 * plain["perplexity"]["8192"], plain["perplexity"]
    assert pi["perplexity"]["16384"] < 1.2 * pi["perplexity"]["8192"], pi["perplexity"]


def test_lengths_shorter_than_four_positions_still_bin(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--lengths", "2,3", "--no-passkey", "--data", str(corpus),
                                 "--output", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "e" / "results.json").read_text())["results"][str(tiny_base)]
    assert len(saved["by_position"]) == 3 and set(saved["perplexity"]) == {"2", "3"}


# --- what the table and the plot say -----------------------------------------------------------------

def rendered(results: dict) -> str:
    from rich.console import Console

    console = Console(record=True, width=250, force_terminal=True)
    console.print(ev.tables(results))
    return " ".join(console.export_text().split())


def test_every_dash_says_why_and_the_scored_token_rule_is_printed():
    short = {"perplexity": {"64": 3.0}, "scored_tokens": {"64": 32}, "min_context": {"64": 32}, "max_len": 64}
    long = {"perplexity": {"64": 3.5, "256": 2.5}, "scored_tokens": {"64": 32, "256": 32},
            "min_context": {"64": 32, "256": 224}, "max_len": 256}
    text = rendered({"base": short, "extended": long})
    assert text.count("│ - ") == 1
    assert "- base: not measured past its own length, 64" in text and "- extended:" not in text
    assert "Scored tokens: each model's perplexities at every L are of the same tokens" in text


def test_a_model_unable_to_retrieve_is_listed_with_the_reason():
    unable = {"perplexity": {"64": 3.0}, "scored_tokens": {"64": 32}, "min_context": {"64": 32}, "max_len": 64,
              "passkey_unable": "0 of 2 keys retrieved right before the question"}
    text = rendered({"tiny": unable})
    assert "│ tiny │ - │ 0 │ not measured* │" in text and "* tiny: 0 of 2 keys retrieved right before the question" in text
    assert len(ev.figure({"tiny": unable}).axes) == 1  # no empty passkey panel


def test_plot_is_ticked_at_the_evaluated_lengths_and_marks_trained_and_target():
    results = {"base": {"perplexity": {"256": 9.0, "512": 80.0, "1024": 400.0}, "max_len": 256, "trained_len": 256},
               "run": {"perplexity": {"256": 9.5, "512": 9.0, "1024": 8.8}, "max_len": 1024, "trained_len": 256}}
    left = ev.figure(results).axes[0]
    assert list(left.get_xticks()) == [256, 512, 1024]
    assert [t.get_text() for t in left.get_xticklabels()] == ["256", "512", "1,024"]
    assert not left.xaxis.get_minor_locator()()  # no 3x10^2 between them
    assert sorted(line.get_xdata()[0] for line in left.lines if line.get_linestyle() == "--") == [256, 1024]
    assert {t.get_text() for t in left.texts} == {"trained length 256", "target 1,024"}


def test_the_passkey_check_skips_a_model_that_cannot_retrieve(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--no-perplexity", "--passkey-lengths", "192", "--distances", "4",
                                 "--trials", "1", "--data", str(corpus), "--output", str(tmp_path / "k")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "k" / "results.json").read_text())["results"].values()
    assert "passkey" not in r and r["passkey_unable"].startswith("0 of 1 keys retrieved right before the question in")
    assert "not measured*" in result.output


def test_scaling_on_a_run_keeps_the_baselines_and_says_what_the_adapter_was_trained_with(trained_run, corpus, tmp_path):
    result = RUNNER.invoke(app, ["eval", str(trained_run), "--scaling", "linear:4", "--lengths", "64,256", "--stride", "64",
                                 "--windows", "1", "--no-passkey", "--data", str(corpus), "--output", str(tmp_path / "s")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    labels = list(json.loads((tmp_path / "s" / "results.json").read_text())["results"])
    name = trained_run.name
    assert labels == [f"{name}: base, no scaling", f"{name}: base, yarn:4 untrained",
                      f"{trained_run}: adapter trained with yarn:4, evaluated with linear:4"]


def test_default_stride_keeps_three_quarters_of_the_shortest_window_as_context():
    """The paper's stride 256 at L = 256 would score tokens with 1 to 256 tokens of context."""
    assert ev.stride_and_windows(ev.Settings(lengths=None), [2048, 8192]) == (256, 8)
    assert ev.stride_and_windows(ev.Settings(lengths=None), [256, 512, 1024]) == (64, 32)
    assert ev.stride_and_windows(ev.Settings(lengths=None, scored=512), [256, 1024]) == (64, 8)
    assert ev.stride_and_windows(ev.Settings(lengths=None, stride=100, windows=3), [256]) == (100, 3)


def test_the_passkey_check_also_tries_a_key_half_the_prompt_away(tiny_base, monkeypatch):
    """A model that misses the key right before the question but finds it farther (YaRN x2 on SmolLM2)
    is measured; one that finds neither is not."""
    from transformers import AutoTokenizer

    subject = ev.Subject("m", None, AutoTokenizer.from_pretrained(tiny_base), 1024, {}, 512)
    asked = []

    def only_far(net, tokenizer, length, distances, trials, **kwargs):
        asked.append((length, distances))
        return {d: (0.0 if d == 1 else 1.0) for d in distances}

    monkeypatch.setattr(ev, "passkey_accuracy", only_far)
    assert ev.able_to_retrieve(subject, ev.Settings(lengths=None, trials=2), 1024) is None
    assert asked == [(512, [1]), (512, [256])]
    monkeypatch.setattr(ev, "passkey_accuracy", lambda net, tok, length, distances, trials, **k: {d: 0.0 for d in distances})
    why = ev.able_to_retrieve(subject, ev.Settings(lengths=None, trials=2), 1024)
    assert why.startswith("0 of 2 keys retrieved right before the question in 512-token prompts, nor 256 tokens from it")
