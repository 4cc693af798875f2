"""The GPU scripts' plumbing on the CPU: steps end by their caps, outputs fit what travels back
(at most 8 files, 2 folders deep), a bundle splits into copies and joins back, and each script's
dry run on a tiny model."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path[:0] = [str(BENCH)]

import bundle  # noqa: E402
import timebox  # noqa: E402


def test_a_slow_step_ends_by_its_cap():
    began = time.monotonic()
    ended = timebox.run([sys.executable, "-c", "import time; time.sleep(60)"], cap=3, grace=1)
    assert ended.capped and ended.rc is not None and ended.rc < 0
    assert time.monotonic() - began < 3.5


def test_a_step_that_ignores_sigterm_and_its_children_are_killed_at_the_cap(tmp_path):
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)")
    began = time.monotonic()
    ended = timebox.run([sys.executable, "-c", code], cap=3, log=tmp_path / "step.log", grace=1)
    assert ended.capped and time.monotonic() - began < 3.5
    child = int((tmp_path / "step.log").read_text().split()[-1])
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_an_interrupted_script_stops_its_step(tmp_path):
    """SIGTERM to a script waiting on a step: the step's process group ends with it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import timebox; timebox.stop_cleanly_on_sigterm(); "
            "timebox.run(['sleep', '60'], cap=60, log=__import__('pathlib').Path(sys.argv[2]), grace=1)")
    script = subprocess.Popen([sys.executable, "-c", code, str(BENCH), str(tmp_path / "step.log")])
    time.sleep(3)
    sleeper = [p for p in Path("/proc").glob("[0-9]*") if (p / "cmdline").is_file()
               and (p / "cmdline").read_bytes() == b"sleep\x0060\x00" and os.getsid(int(p.name)) != os.getsid(0)]
    script.terminate()
    script.wait(10)
    time.sleep(0.3)
    assert sleeper and not any(p.exists() and "Z" not in (p / "stat").read_text().split()[2] for p in sleeper)


def test_a_step_within_its_cap_is_not_capped():
    ended = timebox.run([sys.executable, "-c", "print('done')"], cap=30)
    assert not ended.capped and ended.rc == 0 and ended.output.strip() == "done"


def test_the_box_caps_a_step_by_what_is_left():
    box = timebox.Box(10, reserve=4)
    assert 5.5 < box.cap(100) <= 6 and box.cap(2) == 2


def test_outputs_that_would_not_travel(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}").write_text("x")
    assert timebox.outputs_problems(tmp_path) == []
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "ok").write_text("x")
    assert timebox.outputs_problems(tmp_path) == ["9 files (at most 8)"]
    (tmp_path / "a" / "b" / "c").mkdir()
    (tmp_path / "a" / "b" / "c" / "deep").write_text("x")
    assert timebox.outputs_problems(tmp_path, files=20) == ["too deep (at most 2 folders): a/b/c/deep"]
    (tmp_path / "big.tar.gz").write_bytes(b"x" * (3 * 2**20))
    assert timebox.outputs_problems(tmp_path, files=20, depth=5, file_mib=2, total_mib=2.5) == [
        "over 2 MiB: big.tar.gz (3.0 MiB)", "3.0 MiB in all (at most 2.5)"]


def test_a_split_file_is_joined_back(tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "model.gguf").write_bytes(data)
    parts = bundle.split(tmp_path / "model.gguf", 50_000, 100_000)
    assert [p.name for p in parts] == ["model.gguf.aa", "model.gguf.ab", "model.gguf.ac", "model.gguf.ad"]
    assert [p.stat().st_size for p in parts] == [50_000, 100_000, 100_000, 50_000]
    assert bundle.joined(list(reversed(parts)), tmp_path / "joined.gguf").read_bytes() == data
    with pytest.raises(ValueError, match="more than 26 parts"):
        bundle.split(tmp_path / "model.gguf", 10_000, 10_000)


def test_the_first_copy_holds_all_the_smoke_reads():
    """The smoke call gets the first copy, so the wheels travel beside the GGUF's first part even when
    a larger item (the GGUF's rest) would go first; the rest fills copies by size."""
    mib = 2**20
    sizes = {"wheels": 12 * mib, "SHA256SUMS": 2000, "gguf.aa": 50 * mib, "gguf.ab": 44 * mib,
             "corpus": 14 * mib, "kjv": mib}
    copies = bundle.plan(sizes, 63 * mib, {"wheels", "SHA256SUMS", "gguf.aa"})
    assert copies == [["gguf.aa", "wheels", "SHA256SUMS"], ["gguf.ab", "corpus", "kjv"]]
    # a long-suite bundle: all in one copy, the smoke's wheels among it
    assert bundle.plan({"wheels": 12 * mib, "unsloth-wheels": 29 * mib, "SHA256SUMS": 2000}, 63 * mib,
                       {"wheels", "SHA256SUMS"}) == [["wheels", "SHA256SUMS", "unsloth-wheels"]]
    with pytest.raises(ValueError, match="what the smoke reads is 64.0 MiB"):
        bundle.plan({"wheels": 14 * mib, "gguf.aa": 50 * mib}, 63 * mib, {"wheels", "gguf.aa"})
    with pytest.raises(ValueError, match="corpus is 70.0 MiB, over one copy"):
        bundle.plan({"corpus": 70 * mib}, 63 * mib, set())


def test_the_smoke_converts_the_gguf_only_when_every_part_is_there(tmp_path):
    """gpu.sh's gguf_parts: the whole file, or every part SHA256SUMS names; a missing part is said."""
    (tmp_path / "smollm2.gguf.aa").write_bytes(b"a")
    (tmp_path / "SHA256SUMS").write_text("x  smollm2.gguf.aa\ny  smollm2.gguf.ab\nz  wheels/w.whl\n")
    functions = f"source <(sed -n '/^say()/,/^}}/p;/^gguf_parts()/,/^}}/p' {BENCH / 'gpu.sh'})"
    script = f"{functions}; BUNDLE={tmp_path}; gguf_parts"
    missing = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "parts smollm2.gguf.ab are not in" in missing.stderr
    (tmp_path / "smollm2.gguf.ab").write_bytes(b"b")
    found = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert found.returncode == 0
    assert found.stdout.split() == [str(tmp_path / "smollm2.gguf.aa"), str(tmp_path / "smollm2.gguf.ab")]


def test_a_capped_point_is_a_record_not_a_hang():
    from point import measure

    began = time.monotonic()
    r = measure({"base": "/nonexistent", "device": "cpu", "length": 64, "method": "usual"}, cap=1)
    assert r["status"] == "capped" and time.monotonic() - began < 2


def test_missing_study_data_is_an_error_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "study.py"), "--dry-run", "--corpus", str(tmp_path),
                          "--kjv", str(tmp_path / "kjv.jsonl"), "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no austen-heldout.jsonl" in out.stderr
    assert not (tmp_path / "out").exists()


def test_study_joins_a_gguf_carried_in_parts_before_converting_it(tmp_path):
    """--gguf PART.aa PART.ab: joined in --work, then converted by the prepare step (here it is not a
    GGUF, so the study stops with its one line naming the prepare log, not a traceback)."""
    corpus, kjv = tiny_data(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"not a gguf" * 1000)
    parts = bundle.split(tmp_path / "model.gguf", 6000, 6000)
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, str(BENCH / "study.py"), "--dry-run", "--corpus", str(corpus),
                          "--kjv", str(kjv), "--gguf", *map(str, parts), "--out", str(tmp_path / "out"),
                          "--work", str(work)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"study: no base model (see {work / 'logs' / 'prepare.log'})" in out.stderr
    assert (work / "folders" / "model.gguf").read_bytes() == b"not a gguf" * 1000  # not packed for OUT
    assert "GGUF" in (work / "logs" / "prepare.log").read_text()


def test_the_study_names_the_model_the_prepare_step_printed_not_its_command():
    from study import model_name

    log = ["/usr/bin/python -c import sys; print('model:', f['general.name'].contents(), '(GGUF', x)", "",
           "model: SmolLM2 135M Instruct (GGUF Q4_1)", "/tmp/work/folders/smollm2-1ab5"]
    assert model_name(log) == "SmolLM2 135M Instruct (GGUF Q4_1)"
    assert model_name(log[:2]) == "the GGUF"


@pytest.mark.parametrize("shape", ["LLAMA_7B", "LLAMA3_8B"])
def test_the_liger_check_s_recipe_resolves_for_both_shapes_at_its_length(shape, tmp_path):
    """kernels_check.py compares kernels at 4,096 tokens on the 7B (trained to 2k) and the 8B shape
    (trained to 8k): plain RoPE, so the shorter length is no error (it runs only on CUDA)."""
    import kernels_check
    import llama
    from pi_lora import preflight

    (tmp_path / "config.json").write_text(json.dumps({**getattr(llama, shape), "model_type": "llama"}))
    config, pi = preflight.config_for(kernels_check.recipe_for(tmp_path, 4096, "liger"))
    assert pi.rope_type == "none" and pi.factor == 1.0
    assert config.rope_parameters["rope_type"] == "default"


def tiny_data(folder: Path) -> tuple[Path, Path]:
    words = "the lord said unto moses and aaron go forth into the land which i shall give".split()
    text = lambda seed, n: " ".join(words[(i * seed) % len(words)] for i in range(n))  # noqa: E731
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps({"title": f"d{i}", "text": text(i + 1, 3000)}) + "\n"
                                                for i in range(6)))
    (corpus / "austen-heldout.jsonl").write_text(json.dumps({"title": "held", "text": text(7, 4000)}) + "\n")
    kjv = folder / "kjv.jsonl"
    kjv.write_text("".join(json.dumps({"title": f"b{i}", "text": text(i + 3, 400)}) + "\n" for i in range(66)))
    return corpus, kjv


@pytest.mark.slow
def test_study_dry_run_fits_and_a_step_stops_by_its_cap(tmp_path):
    """The whole study on a tiny model; row A is given far too many steps, so its training is stopped
    by its cap, its last step still evaluated, and the table written with every row."""
    corpus, kjv = tiny_data(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "study.py"), "--dry-run", "--corpus", str(corpus), "--kjv", str(kjv),
           "--out", str(out), "--work", str(tmp_path / "work"), "--rows", "A", "--steps", "100000",
           "--cap", "train=40", "--cap", "eval=120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PI_LORA_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert timebox.outputs_problems(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["study.json", "study.md", "study.tar.gz"]
    records = {r["row"]: r for r in json.loads((out / "study.json").read_text())["records"]}
    assert set(records) == {"base", "base PI x4", "base YaRN x4", "A"}
    assert records["A"]["tokens"] > 0 and records["A"]["perplexity"]["NT"]  # the last step, evaluated
    log = (tmp_path / "work" / "logs" / "train-A.log").read_text()
    assert "interrupted" in log
    notes = json.loads((out / "study.json").read_text())["notes"]
    assert any(n.startswith("train-A: stopped at its cap") for n in notes)
    assert "| A | PI x4" in (out / "study.md").read_text()


@pytest.mark.slow
def test_long_suite_dry_run_always_writes_its_table(tmp_path):
    """bash bench/gpu.sh long on a CPU with a short budget: points end by their caps, long.md is
    written, and no random base is left behind."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "LONG_BUDGET": "45",
           "PYTHON": sys.executable, "BUNDLE": str(tmp_path / "no-bundle")}
    began = time.monotonic()
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "long"], capture_output=True, text=True, env=env,
                          timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert time.monotonic() - began < 45 + 120  # setup, imports and the table, past the points' budget
    assert "## Long sequences" in (tmp_path / "out" / "long.md").read_text()
    assert timebox.outputs_problems(tmp_path / "out") == []
    assert not list(Path("/dev/shm").glob("pi-lora-bench-base/pi-lora-long-*"))
