"""The CPU studies' tables (bench/demo_ablation.py, bench/smollm2_study.py, bench/demo_speed.py) and their sections of docs/."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import demo_ablation  # noqa: E402
import smollm2_study  # noqa: E402


def test_ablation_table_compares_every_row_with_the_base_at_its_own_length():
    rows = {
        "base, no scaling": {"what": "no training", "tokens": 0, "seconds": 0,
                             "perplexity": {"256": 20.0, "1024": 40.0}},
        "pi-lora": {"what": "PI", "tokens": 61440, "seconds": 12.4, "perplexity": {"256": 21.0, "1024": 19.0}},
    }
    text = demo_ablation.table(rows, 30)
    line = next(x for x in text.splitlines() if x.startswith("| pi-lora"))
    assert line == "| pi-lora | PI | 21.00 | 19.00 | -5.0% | +5.0% | 61,440 | 12 |"
    assert text.startswith(demo_ablation.HEADING)


def results(folder: Path, ppl: dict | None = None, k_max: int | None = None) -> None:
    folder.mkdir(parents=True)
    r = {"perplexity": ppl} if ppl else {"passkey": {"16384": {"k_max": k_max, "trials": 2, "accuracy": {}}}}
    (folder / "results.json").write_text(json.dumps({"results": {"model": r}}))


def test_study_table_reads_what_was_measured_and_marks_what_was_not(tmp_path):
    ppl = {"2048": 10.25, "8192": 9.5, "16384": 9.75}
    results(tmp_path / "eval" / "pi2-new-testament", ppl)
    results(tmp_path / "eval" / "pi2-passkey", k_max=8192)
    (tmp_path / "pi2").mkdir()
    steps = [{"step": n, "loss": 3.0, "tokens": 4096 * n, "seconds": 135.0} for n in range(1, 41)]
    (tmp_path / "pi2" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    text = smollm2_study.write_table(tmp_path, docs=False)
    row = next(x for x in text.splitlines() if x.startswith("| PI x2, trained"))
    assert row == "| PI x2, trained | 163,840 | 40 | 1.5 | 10.25 | 9.50 | 9.75 | - | - | - | 8,192 |"
    base = next(x for x in text.splitlines() if x.startswith("| base, no PI"))
    assert base.count("| - ") == 7  # nothing measured yet
    assert (tmp_path / "table.md").read_text() == text


def test_study_targets_compare_pi2_at_16k_with_the_base_at_8k_and_2k(tmp_path):
    results(tmp_path / "eval" / "pi2-new-testament", {"2048": 10.6, "8192": 9.5, "16384": 9.4})
    results(tmp_path / "eval" / "base-new-testament", {"2048": 10.0, "8192": 9.6, "16384": 731.0})
    results(tmp_path / "eval" / "pi2-austen", {"2048": 10.4, "8192": 9.5, "16384": 9.8})
    results(tmp_path / "eval" / "base-austen", {"2048": 10.0, "8192": 9.6, "16384": 700.0})
    results(tmp_path / "eval" / "pi2-passkey", k_max=4096)
    lines = smollm2_study.targets(tmp_path, "pi2")
    assert lines[0] == "Targets for PI x2, trained:"
    nt = next(x for x in lines if x.startswith("- New Testament"))
    austen = next(x for x in lines if x.startswith("- Austen"))
    assert "9.40 against the base's 9.60 with 8k: **met**" in nt and "+6.0%; within 5%: **missed**" in nt
    assert "9.80 against the base's 9.60 with 8k: **missed**" in austen and "+4.0%; within 5%: **met**" in austen
    assert "4,096 (at least 8,192: **missed**)" in lines[-1]
    assert smollm2_study.targets(tmp_path / "none", "pi2")[-1] == "- Passkey: not measured yet."


def test_study_a_model_unable_to_retrieve_at_all_has_k_max_0_with_a_note(tmp_path):
    folder = tmp_path / "eval" / "yarn2-passkey"
    folder.mkdir(parents=True)
    unable = {"max_len": 16384, "passkey_unable": "0 of 2 keys retrieved right before the question"}
    (folder / "results.json").write_text(json.dumps({"results": {"model": unable}}))
    text = smollm2_study.write_table(tmp_path, docs=False)
    row = next(x for x in text.splitlines() if x.startswith("| YaRN x2, trained"))
    assert row.endswith("| 0* |")
    assert "\\* YaRN x2, trained: no key found even right before the question" in text
    assert "- Passkey k_max in 16k prompts: 0 (at least 8,192: **missed**)." in smollm2_study.targets(tmp_path, "yarn2")
    results(tmp_path / "eval" / "control-passkey", k_max=0)  # measured at every distance, none found: no note
    text = smollm2_study.write_table(tmp_path, docs=False)
    row = next(x for x in text.splitlines() if x.startswith("| no PI, trained the same way"))
    assert row.endswith("| 0 |") and "\\* YaRN x2, trained:" in text and "control):" not in text


def test_demo_speed_adds_its_row_to_its_section_and_keeps_the_rest(tmp_path, monkeypatch):
    import demo_speed

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Before\n\nkept\n\n## The demo's first run, old\n\n| 0 | a |\n\n## After\n\nkept too\n")
    monkeypatch.setattr(demo_speed, "DOC", doc)
    demo_speed.write(demo_speed.recorded_rows() + ["| 2 | b |"])
    text = doc.read_text()
    assert demo_speed.recorded_rows() == ["| 0 | a |", "| 2 | b |"]
    assert text.count(demo_speed.HEADING) == 1 and text.count("kept") == 2 and demo_speed.NOTES.strip() in text
    assert text.index("## Before") < text.index(demo_speed.HEADING) < text.index("## After")


def test_study_control_drops_the_short_window_setting_and_nothing_else():
    argv = smollm2_study.without_setting(smollm2_study.TRAIN, "rope.train_len")
    assert "rope.train_len=2048" not in argv and argv.count("--set") == smollm2_study.TRAIN.count("--set") - 1
    assert argv[argv.index("train.warmup_steps=5") - 1] == "--set"
