"""Short-window training (PoSE): the position draw, the model it reaches, the loop and its resume."""

import json
import signal

import numpy as np
import pytest
import torch
from test_train import RUNNER, args, invoke, losses, spawn, wait_for_step

from pi_lora import loss, model, plan, pose, rope, run
from pi_lora.cli import app
from pi_lora.recipe import Recipe, RopeSection


def paper_positions(index, train_len, target_len, chunks, seed):
    """The draw written from the paper's formula: chunk i starts at position sum(l_j, j < i) + u_i."""
    rng = np.random.default_rng([pose.STREAM, seed, index])
    cuts = sorted(int(c) for c in rng.choice(range(1, train_len), chunks - 1, replace=False))
    lengths = np.diff([0, *cuts, train_len])
    skips = [0]
    for _ in range(1, chunks):
        skips.append(int(rng.integers(skips[-1], target_len - train_len + 1)))
    out = []
    for i, n in enumerate(lengths):
        start = int(sum(lengths[:i])) + skips[i]
        out += range(start, start + int(n))
    return out


@pytest.mark.parametrize("train_len,target_len,chunks", [(64, 256, 2), (100, 1000, 3), (5, 7, 5), (2048, 16384, 2)])
def test_positions_are_the_papers_draw(train_len, target_len, chunks):
    for index in range(50):
        got = pose.positions(index, train_len, target_len, chunks, seed=7)
        assert got.tolist() == paper_positions(index, train_len, target_len, chunks, 7)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_positions_stay_below_the_target_in_continuous_chunks(chunks):
    train_len, target_len = 64, 256
    tops = []
    for index in range(300):
        ids = pose.positions(index, train_len, target_len, chunks, seed=1)
        steps = np.diff(ids)
        assert ids[0] == 0 and ids.max() < target_len and len(ids) == train_len
        assert (steps >= 1).all(), "positions rise"
        assert (steps > 1).sum() <= chunks - 1, "at most one jump between chunks"
        tops.append(ids.max())
    if chunks > 1:  # the skips reach across the whole target, not just past the window
        assert max(tops) > 0.95 * target_len and min(tops) < 0.5 * target_len
    else:
        assert set(tops) == {train_len - 1}


def test_draw_depends_on_seed_and_index_only():
    a = pose.positions(5, 64, 256, 2, seed=1)
    assert np.array_equal(a, pose.positions(5, 64, 256, 2, seed=1))
    assert not np.array_equal(a, pose.positions(6, 64, 256, 2, seed=1))
    assert not np.array_equal(a, pose.positions(5, 64, 256, 2, seed=2))


def test_batches_number_sequences_globally():
    section = RopeSection(target_len=256, train_len=64)
    stream = iter([torch.zeros(3, 64, dtype=torch.long)] * 4)
    got = list(pose.batches(stream, 30, section, seed=9))
    for b, (ids, positions) in enumerate(got):
        for j in range(3):
            assert positions[j].tolist() == paper_positions(30 + 3 * b + j, 64, 256, 2, 9)
    same = RopeSection(target_len=256, train_len=256)
    plain = torch.ones(2, 256, dtype=torch.long)
    assert list(pose.batches(iter([plain]), 0, same, seed=9))[0] is plain  # full windows: untouched


def build(folder, scaling, **train_settings):
    config = model.load_config(str(folder))
    pi = rope.interpolation(config, 256, scaling)
    rope.apply(config, pi)
    recipe = Recipe.model_validate({"model": {"base": str(folder), "quant": "none", "compute_dtype": "fp32"},
                                    "lora": {"rank": 4, "target_modules": "all-linear", "trainable": ["embed", "norm"]},
                                    "train": {"mlp_tile": 0, "attention_tile": 0, **train_settings}})
    torch.manual_seed(0)
    net = model.build(recipe, config, torch.device("cpu"), torch.float32, plan.Settings.of(recipe, 4)).train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net


def causal_reference(net, ids, positions):
    """The model's own loss with an explicit 4-D causal mask over the whole window: nothing inferred."""
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(ids.shape[0], 1, n, n)
    value = net(input_ids=ids, position_ids=positions, attention_mask=mask, labels=ids).loss
    value.backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    return value.detach(), grads


@pytest.mark.parametrize("scaling,settings,chunk", [
    ("linear", {}, 16), ("linear", {}, 0), ("yarn", {}, 16), ("ntk", {}, 16),
    ("linear", {"mlp_tile": 8, "attention_tile": 8}, 16), ("linear", {"gradient_checkpointing": False}, 16),
])
def test_short_windows_attend_across_chunks(tiny_base, scaling, settings, chunk):
    """The loss step with PoSE positions equals a plain causal computation at those positions (every
    rope scaling, chunked loss or not, tiles, no checkpointing), values and gradients."""
    net = build(tiny_base, scaling, **settings)
    ids = torch.randint(0, 200, (2, 64))
    positions = torch.stack([torch.from_numpy(pose.positions(i, 64, 256, 2, 3)) for i in range(2)])
    want, want_grads = causal_reference(net, ids, positions)
    got = loss.backward(net, ids, chunk=chunk, position_ids=positions)
    assert got == pytest.approx(want.item(), rel=1e-5)
    for name, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6)


def test_without_a_mask_transformers_would_cut_the_window(tiny_base):
    """Why ChunkedLoss passes a mask of ones: position ids alone read as two packed documents."""
    net = build(tiny_base, "linear")
    ids = torch.randint(0, 200, (1, 64))
    positions = torch.from_numpy(pose.positions(0, 64, 256, 2, 3))[None]
    want, _ = causal_reference(net, ids, positions)
    with torch.no_grad():
        cut = net(input_ids=ids, position_ids=positions, labels=ids).loss
    assert abs(cut.item() - want.item()) > 1e-4


@pytest.fixture(scope="module")
def pose_run(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pose") / "run"
    seen = []
    original = loss.ChunkedLoss.forward

    def spy(self, ids, position_ids=None):
        seen.append((ids.shape[1], None if position_ids is None else position_ids.clone()))
        return original(self, ids, position_ids)

    loss.ChunkedLoss.forward = spy
    try:
        result = invoke(args(tiny_base, corpus, out, "--set", "rope.train_len=64", "--set", "data.eval_fraction=0.2",
                             "--set", "train.eval_every=4"))
    finally:
        loss.ChunkedLoss.forward = original
    assert result.exit_code == 0, result.output
    return out, seen, result.output


def test_the_loop_trains_on_the_drawn_positions_and_validates_at_the_target(pose_run):
    out, seen, output = pose_run
    trained = [p for n, p in seen if p is not None]
    assert len(trained) == 8 and all(p.shape == (2, 64) for p in trained)  # 8 steps of batch 2
    for step, p in enumerate(trained):
        for j in range(2):
            assert p[j].tolist() == paper_positions(2 * step + j, 64, 256, 2, 42)
    assert {n for n, p in seen if p is None} == {256}, "validation runs whole windows of the target length"
    assert "short windows (PoSE): 64 tokens each" in output
    rows = run.read_metrics(out)
    assert rows[-1]["tokens"] == 8 * 2 * 64
    assert json.loads((out / run.META).read_text())["recipe"]["rope"]["train_len"] == 64
    assert "short windows (PoSE) | 64 tokens" in (out / run.ADAPTER / "README.md").read_text()


def test_kill_9_then_resume_gives_the_same_losses(pose_run, tiny_base, corpus, tmp_path):
    out = tmp_path / "killed"
    proc = spawn(args(tiny_base, corpus, out, "--set", "rope.train_len=64", "--set", "data.eval_fraction=0.2",
                      "--set", "train.eval_every=4"))
    wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(run.read_metrics(out)) < 8, "the kill came too late to test anything"
    result = invoke(["train", "--resume", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert losses(out) == pytest.approx(losses(pose_run[0]), rel=1e-6)


def test_train_len_equal_to_the_target_is_the_full_window_run(tiny_base, corpus, tmp_path):
    full, same = tmp_path / "full", tmp_path / "same"
    for out, extra in ((full, []), (same, ["--set", "rope.train_len=256"])):
        result = invoke(args(tiny_base, corpus, out, "--steps", "3", *extra))
        assert result.exit_code == 0, result.output
    assert losses(same) == losses(full)  # bit for bit


@pytest.mark.parametrize("extra,message", [
    (["--set", "rope.train_len=300"], "rope.train_len (300) is longer than rope.target_len (256)"),
    (["--set", "rope.train_len=2", "--set", "rope.pose_chunks=3"], "shorter than rope.pose_chunks (3)"),
    (["--target-len", "64", "--set", "rope.scaling=none", "--set", "rope.train_len=32"], "extends nothing"),
    (["--set", "rope.train_len=0"], "rope.train_len"),
])
def test_bad_short_window_settings_exit_2_in_one_line(tiny_base, corpus, tmp_path, extra, message):
    out = tmp_path / "bad"
    result = RUNNER.invoke(app, args(tiny_base, corpus, out, *extra))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_plan_counts_the_short_window():
    def estimate(**rope_keys):
        r = Recipe.model_validate({"model": {"base": "llama-7b"}, "rope": {"target_len": 32768, **rope_keys}})
        return plan.Settings.of(r, 2)

    assert estimate(train_len=4096) == estimate(target_len=4096)
    assert estimate().train_len == 32768


def test_no_scaling_trains_plain_rope_at_any_length(tiny_base, corpus, tmp_path):
    """The control of a study: no position scaling, at the base's length or past it."""
    for target in (64, 128):
        out = tmp_path / f"none-{target}"
        result = invoke(args(tiny_base, corpus, out, "--target-len", str(target), "--steps", "2",
                             "--set", "rope.scaling=none"))
        assert result.exit_code == 0, result.output
        meta = json.loads((out / run.META).read_text())
        assert meta["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
        assert meta["factor"] == 1.0 and meta["rope_type"] == "none"
        assert rope.from_meta(meta).max_position_embeddings() == max(target, 64)


def test_plan_and_train_take_the_same_flag():
    shown = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--train-len", "4096"])
    assert shown.exit_code == 0, shown.output
    assert "4,096-token short windows (rope.train_len)" in " ".join(shown.output.split())
    bad = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--train-len", "40000"])
    assert bad.exit_code == 2 and "rope.train_len (40,000) is longer" in " ".join(bad.output.split())
    dry = RUNNER.invoke(app, ["train", "--base", "llama-7b", "--target-len", "32768", "--train-len", "4096",
                              "--dry-run"])
    assert dry.exit_code == 0 and "train_len: 4096" in dry.output, dry.output
