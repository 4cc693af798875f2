"""Data parallel training with torchrun over gloo (CPU): equal to one process with accumulation."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pi_lora import checkpoint, run

STEPS = 6  # a killed run must stop before this; steps are cheap next to a launch


def train_argv(tiny_base, corpus, out, *extra):
    return ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus), "--output", str(out),
            "--lr", "5e-3", "--batch-size", "1", "--rank", "4", "--set", "lora.trainable=[embed, norm]",
            "--set", "train.warmup_steps=0", "--set", "train.save_every=1", *extra]


def launch(processes: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command(processes, argv), capture_output=True, text=True, env=env, timeout=600)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / run.ADAPTER / "adapter_model.safetensors")


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in run.read_metrics(folder)]


def assert_same_training(out: Path, reference: Path, rtol: float = 1e-5, atol: float = 1e-7) -> dict:
    """The same loss at every step and the same adapter tensors; returns `out`'s adapter."""
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(reference)), rtol=1e-5, atol=1e-6)
    a, b = adapter(out), adapter(reference)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)
    return a


@pytest.fixture(scope="module")
def two_ranks(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    result = launch(2, train_argv(tiny_base, corpus, out, "--steps", str(STEPS), "--grad-accum", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_processes_equal_one_with_accumulation(two_ranks, tiny_base, corpus, tmp_path):
    two, result = two_ranks
    one = tmp_path / "one"
    single = launch(1, train_argv(tiny_base, corpus, one, "--steps", str(STEPS), "--grad-accum", "2"))
    assert single.returncode == 0, single.stderr[-3000:]
    a = assert_same_training(two, one, rtol=1e-4, atol=1e-6)
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))  # it did train
    # sequences_seen counts both ranks' sequences; rank 0 alone wrote: one metrics row per step
    state = checkpoint.read(run.checkpoints(two)[-1])
    assert state["sequences_seen"] == 2 * STEPS and len(state["rng"]) == 2
    assert [r["step"] for r in run.read_metrics(two)] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert "data parallel: 2 processes" in result.stdout and result.stdout.count("trainable parameters") == 1


def command(processes: int, argv: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "pi_lora", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "pi_lora", *argv]


def test_accelerate_launch_equals_torchrun(two_ranks, tiny_base, corpus, tmp_path):
    """The README's accelerate command; --multi_gpu is what makes it start N processes on a CPU too."""
    two, _ = two_ranks
    out = tmp_path / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "pi_lora", *train_argv(tiny_base, corpus, out, "--steps", str(STEPS), "--grad-accum", "1")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel: 2 processes" in result.stdout
    assert_same_training(out, two)


def test_kill_9_then_resume_with_two_processes_continues_exactly(two_ranks, tiny_base, corpus, tmp_path):
    two, _ = two_ranks
    out = tmp_path / "killed"
    # a long run, killed (torchrun and both workers, no chance to save) once it has a checkpoint
    proc = subprocess.Popen(command(2, train_argv(tiny_base, corpus, out, "--steps", "1000", "--grad-accum", "1")),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while not run.checkpoints(out) and proc.poll() is None and time.time() - start < 300:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)  # torchrun gives each its own session
    for p in [launcher, *workers]:
        p.kill()
    psutil.wait_procs(workers, timeout=30)
    proc.wait()
    saved = run.checkpoints(out)
    assert saved and int(saved[-1].name.split("-")[1]) < STEPS, f"killed too late to test a resume: {saved}"
    wrong = launch(1, ["train", "--resume", "--output", str(out), "--steps", str(STEPS)])
    assert wrong.returncode == 2 and "same number" in wrong.stderr, wrong.stderr[-3000:]
    again = launch(2, ["train", "--resume", "--output", str(out), "--steps", str(STEPS)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(out, two)


@pytest.fixture(scope="module")
def sharded(tiny_base, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "sharded"
    result = launch(2, train_argv(tiny_base, corpus, out, "--steps", str(STEPS), "--grad-accum", "1", "--shard"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_sharded_two_processes_equal_one_with_accumulation(sharded, two_ranks):
    """FSDP2 over the 4-bit base: the same losses and adapter as data parallel (itself equal to one process)."""
    out, result = sharded
    two, _ = two_ranks
    assert "sharded (FSDP2) across 2 processes" in result.stdout
    a = assert_same_training(out, two, rtol=1e-4, atol=1e-6)
    assert any("embed" in k for k in a)
    state = checkpoint.read(run.checkpoints(out)[-1])
    assert state["sharded"] and all(type(t) is torch.Tensor for t in state["weights"].values())


def test_sharded_resume_continues_exactly(sharded, tiny_base, corpus, tmp_path):
    full, _ = sharded
    out = tmp_path / "resumed"
    first = launch(2, train_argv(tiny_base, corpus, out, "--steps", "2", "--grad-accum", "1", "--shard"))
    assert first.returncode == 0, first.stderr[-3000:]
    unsharded = launch(2, ["train", "--resume", "--output", str(out), "--steps", str(STEPS), "--no-shard"])
    # each worker exits 2 with the message; torchrun itself reports 1
    assert unsharded.returncode != 0 and "model.shard: True -> False" in unsharded.stderr, unsharded.stderr[-3000:]
    again = launch(2, ["train", "--resume", "--output", str(out), "--steps", str(STEPS)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(out, full)


def test_shard_needs_several_processes(tiny_base, corpus, tmp_path):
    result = launch(1, train_argv(tiny_base, corpus, tmp_path / "one", "--steps", "1", "--shard"))
    assert result.returncode == 2 and "torchrun" in result.stderr and not (tmp_path / "one").exists()


@pytest.mark.slow
def test_short_windows_two_processes_and_sharded_equal_one_process(tiny_base, corpus, tmp_path):
    """PoSE draws by global sequence index: ranks, and FSDP2's shards, train what one process trains."""
    short = ["--set", "rope.train_len=64", "--steps", "3"]
    one = launch(1, train_argv(tiny_base, corpus, tmp_path / "one", *short, "--grad-accum", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    for name, extra in (("ddp", []), ("fsdp", ["--shard"])):
        two = launch(2, train_argv(tiny_base, corpus, tmp_path / name, *short, "--grad-accum", "1", *extra))
        assert two.returncode == 0, two.stderr[-3000:]
        assert_same_training(tmp_path / name, tmp_path / "one", rtol=1e-4, atol=1e-6)


ZERO_GRAD_PROBE = '''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from pi_lora import distributed

def work(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    finals = []
    for keep in (True, False):  # distributed.zero_grad (in place), and gradients set to None each step
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
        ddp = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, init_sync=False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        where = set()
        gen = torch.Generator().manual_seed(rank)
        for step in range(4):
            distributed.zero_grad(ddp, opt) if keep else opt.zero_grad(set_to_none=True)
            with ddp.no_sync():
                ddp(torch.randn(4, 64, generator=gen)).sum().backward()
            if step:
                where.add(net[0].weight.grad.data_ptr())
            ddp(torch.randn(4, 64, generator=gen)).sum().backward()
            if step:
                where.add(net[0].weight.grad.data_ptr())
            opt.step()
        finals.append([p.detach().clone() for p in net.parameters()])
        if keep and rank == 0:
            print("bucket views kept:", len(where) == 1)
    if rank == 0:
        print("same weights:", all(torch.equal(a, b) for a, b in zip(*finals)))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]),), nprocs=2)
'''


def test_data_parallel_gradients_stay_bucket_views(tmp_path):
    """distributed.zero_grad keeps DDP's gradients the views into its buckets through accumulation
    (no second copy of them), with the same weights as gradients set to None every step."""
    import socket

    script = tmp_path / "probe.py"
    script.write_text(ZERO_GRAD_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bucket views kept: True" in result.stdout and "same weights: True" in result.stdout, result.stdout
