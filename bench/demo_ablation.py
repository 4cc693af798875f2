"""What it takes for a PI fine-tune to beat its base: an ablation on the demo (256 -> 1,024, 2 CPU cores).

Every row starts from the demo base and trains on the same tokens, in the same number of steps, as
`pi-lora train` does (rows that train at 256 tokens take 4 sequences where the others take one). Each
trained model is scored by `pi-lora eval` on the demo's held-out tenth, with 256 and 1,024 tokens of
context at stride 64 (every token scored at 256 has at least 192 tokens of context). The full
fine-tune (no LoRA, fp32), which pi-lora does not offer, is the ceiling: it runs here through
pi-lora's own model, data, schedule and loss, with every weight trained.

    python bench/demo_ablation.py                      # every row; a row already measured is kept
    python bench/demo_ablation.py --rows pi-lora,pose  # some rows
    python bench/demo_ablation.py --steps 60 --out eval/demo-ablation-60

Writes OUT/<row>/ (the run and its eval) and OUT/table.md; with --docs, the table into docs/results.md
(replacing its section 3, prose included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"
HEADING = "## 3. The demo: what closes the gap"
# every row spells what it trains, whatever the demo recipe says: PI and LoRA on q/k/v/o unless it says otherwise
PI = ["--set", "rope.scaling=linear"]
QKVO = [*PI, "--set", "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"]
EMBED_NORM = [*QKVO, "--set", "lora.trainable=[embed, norm]"]
QKVO_ONLY = [*QKVO, "--set", "lora.trainable=[]"]
SHORT = [*EMBED_NORM, "--target-len", "256", "--set", "rope.scaling=none", "--batch-size", "4"]  # 4 x 256 tokens
# name: (what it is, `pi-lora train` arguments over the demo recipe, eval --quant)
ROWS = {
    "continued-256": ("no PI, continued training at 256 (the control for more training)", SHORT, "none"),
    "direct-1024": ("no PI, fine-tuned at 1,024 (direct extension)", [*EMBED_NORM, "--set", "rope.scaling=none"],
                    "none"),
    "lora-qkvo": ("PI, LoRA on q/k/v/o only", QKVO_ONLY, "none"),
    "pi-lora": ("PI, LoRA + embeddings and norms", EMBED_NORM, "none"),
    "pi-lora-as-trained": ("the same run, evaluated on its NF4 base (as trained)", None, "nf4"),
    "pi-lora-quant-none": ("PI, LoRA + embeddings and norms, trained on the fp32 base", EMBED_NORM
                           + ["--set", "model.quant=none"], "none"),
    "full": ("PI, full fine-tune, fp32, no LoRA", "full", "none"),
    "lr-5e-4": ("PI, LoRA + embeddings and norms, lr 5e-4", EMBED_NORM + ["--lr", "5e-4"], "none"),
    "lr-5e-3": ("PI, LoRA + embeddings and norms, lr 5e-3", EMBED_NORM + ["--lr", "5e-3"], "none"),
    "lr-1e-2": ("PI, LoRA + embeddings and norms, lr 1e-2", EMBED_NORM + ["--lr", "1e-2"], "none"),
    "embed-lr-2e-4": ("PI, LoRA + embeddings and norms, embeddings at lr 2e-4", EMBED_NORM
                      + ["--set", "lora.embed_lr=2e-4"], "none"),
    "all-linear": ("PI, LoRA on every linear + embeddings and norms",
                   [*PI, "--set", "lora.trainable=[embed, norm]", "--set", "lora.target_modules=all-linear"], "none"),
    "pose": ("PI, LoRA + embeddings and norms, short windows of 256 spread over 1,024 (PoSE)", EMBED_NORM
             + ["--set", "rope.train_len=256", "--batch-size", "4"], "none"),
    "yarn": ("YaRN, LoRA on every linear + embeddings and norms (the demo recipe at 90 steps)",
             ["--set", "lora.trainable=[embed, norm]", "--set", "lora.target_modules=all-linear",
              "--set", "rope.scaling=yarn"], "none"),
}
EXTRA: list[str] = []  # --set options for every trained row (--set on the command line)
WINDOWS = 96  # strides of 64 scored: 6,144 tokens
EVAL = ["--lengths", "256,1024", "--stride", "64", "--windows", str(WINDOWS), "--no-passkey"]


def pi_lora(*argv: str, log: Path) -> float:
    """Run one pi-lora command (its output to `log`); its wall time, or exit with its last lines."""
    began = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "pi_lora", *argv], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"pi-lora {argv[0]} failed ({done.returncode}); see {log}:\n" + "".join(open(log).readlines()[-5:]))
    return time.perf_counter() - began


def train_row(name: str, extra, steps: int, out: Path) -> dict:
    """The row's run (trained unless it exists), and its tokens and training seconds."""
    folder = out / name
    if not (folder / "pi_lora.json").is_file() or not (folder / "adapter").is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        argv = ["train", "--recipe", "demo", "--output", str(folder), "--steps", str(steps), *EXTRA, *extra]
        seconds = pi_lora(*argv, log=out / f"{name}.log")
        (folder / "wall.json").write_text(json.dumps({"seconds": seconds}))
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"tokens": metrics[-1]["tokens"], "seconds": json.loads((folder / "wall.json").read_text())["seconds"]}


def full_row(steps: int, out: Path) -> tuple[dict, dict]:
    """Every weight trained, fp32: the demo recipe's model (without LoRA), data, schedule and loss; then
    scored in this process by eval's own perplexity on the held-out data of the pi-lora row's run."""
    folder = out / "full"
    if (folder / "results.json").is_file():
        saved = json.loads((folder / "results.json").read_text())
        return saved["cost"], saved["results"]
    import torch

    from pi_lora import evaluate as ev
    from pi_lora import loss, model, preflight, train
    from pi_lora import recipe as recipes

    began = time.perf_counter()
    sets = [f"train.steps={steps}", "rope.scaling=linear", "model.quant=none", "model.compute_dtype=fp32", *EXTRA[1::2]]
    recipe, _ = recipes.resolve(recipes.read(recipes.find("demo")), sets, {})
    p = preflight.prepare(recipe)
    train.seed_everything(recipe.train.seed)
    on = torch.device("cpu")
    net = model.load_base(recipe.model, p.config, on).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.train.lr, betas=tuple(recipe.train.betas))
    schedule = train.scheduler(optimizer, recipe.train)
    batches = p.data.batches(0, recipe.train.batch_size)
    for _ in range(steps):
        train.step_loss(loss.ChunkedLoss(net, recipe.train.loss_chunk), batches, recipe.train, on, torch.float32)
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.train.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    cost = {"tokens": steps * recipe.train.batch_size * recipe.train.grad_accum * p.pi.target_len,
            "seconds": time.perf_counter() - began}
    section, _ = ev.data_section([str(out / "pi-lora")], None, "test", "text")
    tokenizer = model.load_tokenizer(recipe.model.base)
    subject = ev.Subject("full", net.eval(), tokenizer, p.pi.target_len)
    settings = ev.Settings(lengths=[256, 1024], stride=64, windows=WINDOWS, passkey=False)
    results = {"full": ev.perplexity_part(subject, settings, [256, 1024], section)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"cost": cost, "results": results}))
    return cost, results


def evaluate(name: str, subject: str, quant: str, out: Path, extra=()) -> dict:
    """Perplexity by context of `subject` (a run, or a model folder scored on the demo's held-out data)."""
    result = out / name / f"eval-{quant}"
    if not (result / "results.json").is_file():
        pi_lora("eval", subject, *EVAL, "--quant", quant, "--output", str(result), "--overwrite", *extra,
                log=out / f"{name}.log")
    return json.loads((result / "results.json").read_text())["results"]


def measure(names: list[str], steps: int, out: Path) -> dict:
    rows = {}
    for name in names:
        what, extra, quant = ROWS[name]
        if extra == "full":
            cost, results = full_row(steps, out)
        else:
            run = name.removesuffix("-as-trained")
            cost = train_row(run, extra if extra is not None else ROWS[run][1], steps, out)
            # the baselines once, beside the first row, and beside the first row of another scaling
            fresh = not rows or ("rope.scaling=yarn" in (extra or []) and not any("yarn" in r for r in rows))
            results = evaluate(name, str(out / run), quant, out, [] if fresh else ["--no-baselines"])
        for label, r in results.items():
            # eval's "tokens" (the text it read) must not hide the row's tokens trained
            if "base" in label:  # the run's baselines: its base with no scaling, and with PI untrained
                rows.setdefault(label.split(": ", 1)[-1], {**r, "what": "no training", "tokens": 0, "seconds": 0})
            else:
                rows[name] = {**r, "what": what, **cost}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of every row (default 30)")
    parser.add_argument("--out", type=Path, default=Path("eval/demo-ablation"))
    parser.add_argument("--docs", action="store_true", help="write the table into docs/results.md (section 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe setting for every trained row, e.g. train.grad_accum=1")
    args = parser.parse_args()
    EXTRA.extend(x for kv in args.set for x in ("--set", kv))
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = measure(["pi-lora", *[r for r in args.rows.split(",") if r != "pi-lora"]], args.steps, args.out)
    text = table(rows, args.steps)
    (args.out / "table.md").write_text(text)
    print(text)
    if args.docs:
        write_section(HEADING, text, RESULTS)


def table(rows: dict, steps: int) -> str:
    base = next(r for label, r in rows.items() if label.endswith("no scaling"))
    lines = [HEADING, "", f"Every row: {steps} steps from the demo base, perplexity on the held-out tenth "
             "(stride 64, the same tokens at both lengths).", "",
             "| row | what | ppl @256 | ppl @1,024 | @1,024 vs base @256 | @256 vs base @256 | tokens | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        p256, p1k = r["perplexity"].get("256"), r["perplexity"].get("1024")
        b = base["perplexity"]["256"]
        lines.append(f"| {name} | {r['what']} | {p256:.2f} | {p1k:.2f} | {p1k / b - 1:+.1%} | {p256 / b - 1:+.1%} | "
                     f"{r['tokens']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
