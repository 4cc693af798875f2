"""Does PI extend SmolLM2-135M-Instruct 8,192 -> 32,768, and is it PI or just fine-tuning? One call.

`pi-lora train` (NF4, LoRA + embeddings and norms) on a varied corpus (bench/corpus.py's train.jsonl),
then `pi-lora eval` on held-out Austen and the New Testament: perplexity with 2k, 8k, 16k and 32k of
context (stride 256, 32 strides: 8,192 scored tokens per text) and passkey in 32k prompts (8k for the
no-PI rows). Rows, in the order the time box takes them:
  A      PI x4, lr --lr, --steps x 32k tokens; its halfway checkpoint is evaluated last
  C      the control: no PI, 8k windows x 4 a step (the same tokens), the same lr
  bases  no PI; PI x4 untrained; YaRN x4 untrained (no training)
  B      A at lr 2e-5
  D      YaRN x4 trained like A
Every step is a process with its own cap (bench/timebox.py) and ends before it; a step that fails
or is capped leaves a dash in the table, never stops the rows after it.

    python bench/study.py --corpus DIR --kjv kjv-books.jsonl --gguf smollm2.gguf --out OUT
    python bench/study.py ... --gguf smollm2.gguf.aa smollm2.gguf.ab    # a file split in parts
    python bench/study.py --corpus DIR --kjv FILE --out OUT --dry-run   # a tiny model on the CPU

OUT gets study.md (the table), study.json (the records) and study.tar.gz (results, metrics, logs).
The model folder, adapters and token caches stay in --work (the temp folder by default).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from report import device_name, results  # noqa: E402
from timebox import (Box, Steps, offline_env, outputs_problems, pack, say, stop_cleanly_on_sigterm,  # noqa: E402
                     unpacked)

PY = sys.executable
# Seconds each kind of step may take (on a GPU / in a dry run); the box's remainder caps them too.
# 148 steps x 32k took 158 s on an H200 (docs/results.md): A and C fill most of 9 minutes, B and D get the rest.
CAPS = {"prepare": (90, 60), "train": (200, 60), "eval": (60, 60), "report": (20, 20)}
ROWS = {"A": "PI x4, lr {lr}", "C": "control: no PI, 8k windows x 4, lr {lr}", "B": "PI x4, lr 2e-5",
        "D": "YaRN x4, lr {lr}"}


class Study:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.work, self.out = args.work, args.out
        self.box = Box(args.minutes * 60, reserve=self.caps("report"))
        self.steps = Steps(self.box, self.work / "logs", offline_env(self.work / "home"), "study")
        self.records: list[dict] = []
        self.notes = self.steps.notes  # the steps' and the rows' own, in one list
        self.halfway: list[tuple] = []  # evaluated after every row, when time is left

    def caps(self, kind: str) -> float:
        return self.args.cap.get(kind, CAPS[kind][1 if self.dry else 0])

    def step(self, name: str, kind: str, cmd: list) -> dict:
        """One capped step (timebox.Steps), its log in work/logs; what happened, for the record."""
        return self.steps.run(name, cmd, self.caps(kind), grace=15 if kind == "train" else 3)

    def prepare(self) -> None:
        self.texts = {"Austen": self.corpus_file("austen-heldout.jsonl"),
                      "NT": new_testament(self.args.kjv, self.work / "nt.jsonl")}
        self.train_data = self.corpus_file("train.jsonl")
        if self.dry and not self.args.gguf:
            self.base, self.name = self.work / "base", "a tiny model"
            code = "import sys, pathlib; from pi_lora.demo import build_tiny_llama; build_tiny_llama(pathlib.Path(sys.argv[1]))"
            self.step("prepare", "prepare", [PY, "-c", code, self.base])
        else:
            from bundle import joined

            folders = self.work / "folders"  # left out of study.tar.gz, with the converted model
            folders.mkdir(exist_ok=True)
            gguf = joined(self.args.gguf, folders / (self.args.gguf[0].name.split(".gguf")[0] + ".gguf"))
            code = ("import sys, pathlib; from gguf import GGUFReader, LlamaFileType; from pi_lora.model import "
                    "gguf_folder; f = GGUFReader(sys.argv[1]).fields; print('model:', f['general.name'].contents(), "
                    "'(GGUF', LlamaFileType(f['general.file_type'].contents()).name.removeprefix('MOSTLY_') + ')'); "
                    "print(gguf_folder(pathlib.Path(sys.argv[1]), cache=pathlib.Path(sys.argv[2])))")
            self.step("prepare", "prepare", [PY, "-c", code, gguf, folders])
            log = (self.work / "logs" / "prepare.log").read_text().strip().splitlines()
            self.base = Path(log[-1]) if log and Path(log[-1]).is_dir() else None
            self.name = model_name(log)
        if self.base is None or not (self.base / "config.json").is_file():
            raise SystemExit(f"study: no base model (see {self.work / 'logs' / 'prepare.log'})")
        self.base_len = json.loads((self.base / "config.json").read_text())["max_position_embeddings"]
        self.target = 4 * self.base_len
        self.lengths = [self.base_len // 4, self.base_len, 2 * self.base_len, self.target]

    def corpus_file(self, name: str) -> Path:
        """bench/corpus.py's NAME (or NAME.gz); missing data is an error before anything runs."""
        found = unpacked(self.args.corpus, name, self.work)
        if found is None:
            raise SystemExit(f"study: no {name} (or {name}.gz) in {self.args.corpus}: build it with "
                             f"bench/corpus.py --out {self.args.corpus}")
        return found

    def evaluate(self, name: str, model: Path, scaling: str | None, passkey_len: int, separate=()) -> dict:
        """Capped `pi-lora eval`s: perplexity on Austen; perplexity and passkey on the New Testament.
        `separate`: (scalings, prompt length) whose passkey runs in calls of their own (the bases: no PI
        at 8k, PI and YaRN at 32k). {text: [results of each model or scaling, in order], "passkey": [...]}."""
        a, found = self.args, {"passkey": []}

        def cmd(rope, folder, *extra):
            return [PY, "-m", "pi_lora", "eval", model, "--stride", a.stride, "--output", folder, "--overwrite",
                    *(["--scaling", rope] if rope else ["--no-baselines"]), *extra]

        def keys(length):
            return ["--passkey-lengths", length, "--distances", a.distances, "--trials", a.trials]

        for text, path in self.texts.items():
            folder = self.work / "eval" / name / text
            extra = keys(passkey_len) if text == "NT" and not separate else ["--no-passkey"]
            self.step(f"eval-{name}-{text}", "eval", cmd(scaling, folder, "--data", path, "--windows", a.windows,
                                                         "--lengths", ",".join(map(str, self.lengths)), *extra))
            found[text] = results(folder)
        for rope, length in separate:
            folder = self.work / "eval" / name / f"passkey-{length}"
            self.step(f"eval-{name}-passkey-{length}", "eval",
                      cmd(rope, folder, "--data", self.texts["NT"], "--no-perplexity", *keys(length)))
            found["passkey"] += results(folder) or [{}] * len(rope.split(","))
        return found

    def bases(self) -> None:
        began = time.monotonic()
        found = self.evaluate("bases", self.base, "none,linear:4,yarn:4", 0,
                              [("none", self.base_len), ("linear:4,yarn:4", self.target)])
        for i, (label, what) in enumerate((("base", "no PI, untrained"), ("base PI x4", "PI x4, untrained"),
                                           ("base YaRN x4", "YaRN x4, untrained"))):
            self.records.append(record(label, what, 0, time.monotonic() - began, found, i,
                                       self.base_len if i == 0 else self.target))

    def train(self, name: str) -> None:
        a, began = self.args, time.monotonic()
        lr = 2e-5 if name == "B" else a.lr
        control = name == "C"
        folder = self.work / "runs" / name
        shutil.rmtree(folder, ignore_errors=True)
        half = max(1, a.steps // 2)
        sets = ["lora.trainable=[embed,norm]", f"train.save_every={half}", *a.set]
        if control:  # plain RoPE on windows of the base's own length
            sets.append("rope.scaling=none")
        if self.dry:
            sets.append("train.warmup_steps=0")
        cmd = [PY, "-m", "pi_lora", "train", "--base", self.base,
               "--target-len", self.base_len if control else self.target,
               *([] if control else ["--scaling", "yarn" if name == "D" else "linear"]),
               "--data", self.train_data, "--steps", a.steps, "--lr", lr, "--batch-size", 4 if control else 1,
               "--grad-accum", 1, "--output", folder, "--overwrite", *[x for s in sets for x in ("--set", s)]]
        trained = self.step(f"train-{name}", "train", cmd)
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()] \
            if (folder / "metrics.jsonl").is_file() else []
        what = ROWS[name].format(lr=f"{lr:.0e}".replace("e-0", "e-"))
        if not adapter_ready(folder):
            self.records.append({"row": name, "what": what, "tokens": 0, "minutes": trained["seconds"] / 60})
            return
        plen = self.base_len if control else self.target
        found = self.evaluate(name, folder, None, plen)  # minutes: training and evaluation
        self.records.append(record(name, what, metrics[-1]["tokens"] if metrics else 0, time.monotonic() - began,
                                   found, 0, plen))
        halfway = halfway_run(folder, half) if name == "A" else None
        if halfway is not None:
            tokens = next((m["tokens"] for m in metrics if m["step"] == half), 0)
            self.halfway.append((f"{name}, step {half}", what, tokens, halfway, plen))

    def halfways(self) -> None:
        for row, what, tokens, folder, plen in self.halfway:
            began = time.monotonic()
            found = self.evaluate(folder.name, folder, None, plen)
            self.records.append(record(row, what, tokens, time.monotonic() - began, found, 0, plen))

    def report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = table(self, device_name(self.dry))
        (self.out / "study.md").write_text(text)
        (self.out / "study.json").write_text(json.dumps({"records": self.records, "notes": self.notes}, indent=1) + "\n")
        pack(self.out / "study.tar.gz", self.work, skip=("adapter", "checkpoints", "home", "folders", "base",
                                                       "base-no-pi", "nt.jsonl", "train.jsonl", "austen-heldout.jsonl"))
        print(text, flush=True)
        for problem in outputs_problems(self.out):  # other files in OUT: say so, the study's own are 3
            say("study", f"warning: {self.out} holds {problem}")


def new_testament(kjv: Path, dest: Path) -> Path:
    """The 27 books after the 39 of the Old Testament (kjv-books.jsonl: one book a line, in order)."""
    if not kjv.is_file():
        raise SystemExit(f"study: no KJV text at {kjv}")
    lines = (gzip.decompress(kjv.read_bytes()).decode() if kjv.suffix == ".gz" else kjv.read_text()).splitlines()
    if len(lines) < 40:
        raise SystemExit(f"study: {kjv} has {len(lines)} lines, not the 66 books")
    dest.write_text("\n".join(lines[39:]) + "\n")
    return dest


def model_name(log: list[str]) -> str:
    """The name the prepare step printed (`model: NAME (GGUF TYPE)`); its log opens with the command,
    which holds the same words in quotes."""
    return next((x.removeprefix("model: ") for x in log if x.startswith("model: ")), "the GGUF")


def adapter_ready(folder: Path) -> bool:
    """A capped run has no adapter/, but its last checkpoint holds the same weights."""
    if (folder / "adapter" / "adapter_config.json").is_file():
        return True
    steps = sorted(folder.glob("checkpoints/step-*/adapter"), key=lambda p: int(p.parent.name.split("-")[1]))
    if steps:
        shutil.copytree(steps[-1], folder / "adapter")
    return bool(steps)


def halfway_run(folder: Path, step: int) -> Path | None:
    """A run folder holding the adapter of checkpoint `step`, for `pi-lora eval`."""
    adapter = folder / "checkpoints" / f"step-{step}" / "adapter"
    if not adapter.is_dir() or not (folder / "adapter").is_dir():
        return None
    half = folder.with_name(folder.name + "-half")
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(folder, half, ignore=shutil.ignore_patterns("checkpoints", "adapter", "eval"))
    shutil.copytree(adapter, half / "adapter")
    return half


def record(row: str, what: str, tokens: int, seconds: float, found: dict, index: int, passkey_len: int) -> dict:
    """One table row from the evaluations' results (the index-th model or scaling of each)."""
    def pick(text):
        return found[text][index] if len(found.get(text) or []) > index else {}

    keys = (found["passkey"][index] if found.get("passkey") else pick("NT")).get("passkey", {}).get(str(passkey_len), {})
    return {"row": row, "what": what, "tokens": tokens, "minutes": round(seconds / 60, 2),
            "perplexity": {t: pick(t).get("perplexity", {}) for t in ("Austen", "NT")},
            "scored": {t: next(iter(pick(t).get("scored_tokens", {}).values()), 0) for t in ("Austen", "NT")},
            "passkey_len": passkey_len, "k_max": keys.get("k_max"), "accuracy": mean(keys.get("accuracy"))}


def mean(by_distance: dict | None) -> float | None:
    return sum(by_distance.values()) / len(by_distance) if by_distance else None


def table(study: Study, device: str) -> str:
    lengths = [str(n) for n in study.lengths]
    head = " | ".join(f"{t} ppl @{int(n) // 1024 or n}{'k' if int(n) >= 1024 else ''}" for t in ("Austen", "NT")
                      for n in lengths)
    lines = [f"| row | what | tokens seen | minutes | {head} | passkey k_max (prompt) | passkey accuracy |",
             "|---|---|---|---|" + "---|" * (2 * len(lengths)) + "---|---|"]
    for r in sorted(study.records, key=lambda r: (not r["row"].startswith("base"), r["row"])):
        cells = " | ".join(f"{r['perplexity'][t][n]:.2f}" if n in r.get("perplexity", {}).get(t, {}) else "-"
                           for t in ("Austen", "NT") for n in lengths)
        k = "-" if r.get("k_max") is None else f"{r['k_max']:,} ({int(r['passkey_len']):,})"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        lines.append(f"| {r['row']} | {r['what']} | {r['tokens']:,} | {r['minutes']:.1f} | {cells} | {k} | {acc} |")
    a = study.args
    scored = {t: max((r.get("scored", {}).get(t, 0) for r in study.records), default=0) for t in ("Austen", "NT")}
    return "\n".join([
        f"### {study.name}, PI "
        f"{study.base_len:,} -> {study.target:,}: {device}, {time.strftime('%Y-%m-%d')}", "",
        f"`pi-lora train`: NF4, LoRA r=8 q/k/v/o + embeddings and norms, {a.steps} steps of {study.target:,} tokens "
        f"(the control: 4 x {study.base_len:,}), on {a.corpus.name}/train.jsonl. `pi-lora eval`: stride {a.stride}, "
        f"{scored['Austen']:,} / {scored['NT']:,} scored tokens (Austen / NT) at every length; passkey "
        f"{a.distances} distances x {a.trials} trials. Time box {study.box.seconds / 60:.0f} min, "
        f"{study.box.spent() / 60:.1f} used. Command: `python bench/study.py {' '.join(sys.argv[1:])}`.", "",
        *lines, "", *verdict(study), *(f"- {n}" for n in study.notes), ""])


def verdict(study: Study) -> list[str]:
    """The study's three tests of PI, from the NT perplexity (missing numbers say so)."""
    by = {r["row"]: r for r in study.records}
    ppl = lambda row, n: by.get(row, {}).get("perplexity", {}).get("NT", {}).get(str(n))  # noqa: E731
    a32, c8, b8, a2, c2 = ppl("A", study.target), ppl("C", study.base_len), ppl("base", study.base_len), \
        ppl("A", study.lengths[0]), ppl("C", study.lengths[0])
    k = by.get("A", {}).get("k_max")
    tests = [("A with 32k of context at or below C and the base with 8k (NT)",
              None if None in (a32, c8, b8) else a32 <= min(c8, b8)),
             ("A with 2k within 5% of C (NT)", None if None in (a2, c2) else abs(a2 / c2 - 1) <= 0.05),
             (f"A's passkey k_max is {study.target:,}", None if k is None else k >= study.target)]
    return [f"- {what}: {'-' if ok is None else 'yes' if ok else 'NO'}" for what, ok in tests]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="bench/corpus.py's folder: train.jsonl[.gz], "
                   "austen-heldout.jsonl[.gz]")
    p.add_argument("--kjv", type=Path, required=True, help="kjv-books.jsonl[.gz]: one book a line")
    p.add_argument("--gguf", type=Path, nargs="+", default=[], help="the SmolLM2 GGUF, or its parts in order")
    p.add_argument("--out", type=Path, required=True, help="for study.md, study.json and study.tar.gz")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pi-lora-study")
    p.add_argument("--minutes", type=float, default=9.0, help="the whole call [9]")
    p.add_argument("--rows", default="A,C,B,D", help="trained rows, in order [A,C,B,D]; the bases always run")
    p.add_argument("--steps", type=int, default=None, help="steps per trained row [160; dry run 4]")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--set", action="append", default=[], help="a recipe key for every trained row (repeatable)")
    p.add_argument("--cap", action="append", default=[], metavar="KIND=SECONDS",
                   help=f"a step kind's cap: {', '.join(CAPS)} (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="a tiny model (or --gguf's) on this machine, small sizes")
    a = p.parse_args()
    a.cap = {k: float(v) for k, v in (c.split("=") for c in a.cap)}
    a.steps = a.steps or (4 if a.dry_run else 160)
    a.stride, a.windows, a.distances, a.trials = (32, 2, 3, 1) if a.dry_run else (256, 32, 16, 5)
    if not a.gguf and not a.dry_run:
        p.error("--gguf is needed (the SmolLM2 GGUF), except with --dry-run")
    stop_cleanly_on_sigterm()
    shutil.rmtree(a.work, ignore_errors=True)
    (a.work / "logs").mkdir(parents=True)
    study = Study(a)
    study.prepare()
    try:
        rows = a.rows.split(",")
        for name in rows[:2] + ["bases"] + rows[2:]:  # A and C, the bases, then what time allows
            try:
                study.bases() if name == "bases" else study.train(name)
            except Exception as e:  # one row's surprise is a note; the rows after it still run
                study.notes.append(f"row {name}: {type(e).__name__}: {e}")
        study.halfways()
    except KeyboardInterrupt:
        study.notes.append("interrupted: the rows so far")
    finally:
        study.report()


if __name__ == "__main__":
    main()
