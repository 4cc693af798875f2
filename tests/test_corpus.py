"""bench/corpus.py: HTML to text, R's serialization, filtering, the held-out novel, atomic hashed files, errors."""

import gzip
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "bench")]

import corpus  # noqa: E402
from pi_lora.errors import PiLoraError  # noqa: E402

PAGE = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
<body><div class="navheader"><table><tr><td><a href="a.html">Prev</a></td></tr></table>
<div>nested nav</div></div>
<h1>Joins   Between
Tables</h1><p>
  Queries can access <code>many</code>
tables &amp; rows.</p>
<pre>SELECT *
    FROM weather;</pre><ul><li>one</li><li>two</li></ul>
<div class="navfooter">Next</div><p>After the footer.</p></body></html>"""


def test_html_to_text_keeps_the_visible_text_and_drops_navigation():
    assert corpus.html_to_text(PAGE) == (
        "Joins Between Tables\n\nQueries can access many tables & rows.\n\n"
        "SELECT *\n    FROM weather;\n\none\n\ntwo\n\nAfter the footer."
    )


def _r_serialize(value) -> bytes:
    """R's XDR serialization (format 3) of a named list, a character or an integer vector, as R writes it."""
    symbols: list[str] = []

    def char(s):  # CHARSXP, NA for None; 0x8000: the UTF-8 level bit
        return struct.pack(">ii", 9, -1) if s is None else struct.pack(">ii", 0x8009, len(s.encode())) + s.encode()

    def symbol(name):  # the first use spells it, later ones refer back to it (REFSXP)
        if name in symbols:
            return struct.pack(">i", (symbols.index(name) + 1) << 8 | 255)
        symbols.append(name)
        return struct.pack(">i", 1) + char(name)

    def item(v):
        if isinstance(v, dict):  # VECSXP with attributes: a pairlist tagged `names`, ended by NULL
            return (struct.pack(">ii", 19 | 0x200, len(v)) + b"".join(item(x) for x in v.values())
                    + struct.pack(">i", 2 | 0x400) + symbol("names") + item(list(v)) + struct.pack(">i", 254))
        if v and isinstance(v[0], int):
            return struct.pack(f">ii{len(v)}i", 13, len(v), *v)
        return struct.pack(">ii", 16, len(v)) + b"".join(char(s) for s in v)

    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + item(value)


def test_r_lazy_load_database_reads_as_texts(tmp_path):
    novels = {"emma": ["EMMA", "", None, "Emma Woodhouse, handsome"], "persuasion": ["Persuasion", "by"]}
    blobs = [struct.pack(">i", 0) + zlib.compress(_r_serialize(lines)) for lines in novels.values()]
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(blobs))
    variables = {"emma": [0, len(blobs[0])], "persuasion": [len(blobs[0]), len(blobs[1])]}
    index = {"variables": variables, "references": ["x"], "compressed": [1]}
    assert corpus.r_unserialize(_r_serialize(index)) == index  # nested names: a symbol read by reference
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    assert corpus.read_rdata(tmp_path / "Rdata.rdx") == {
        "emma": "EMMA\n\n\nEmma Woodhouse, handsome", "persuasion": "Persuasion\nby"}
    with pytest.raises(PiLoraError, match="XDR"):
        corpus.r_unserialize(b"RDX3\n")


def test_short_documents_are_dropped():
    docs = [{"title": "a", "text": "x" * 200}, {"title": "b", "text": "  " + "y" * 199 + "\n\n"}, {"title": "c", "text": ""}]
    assert [d["title"] for d in corpus.keep(docs, 200)] == ["a"]


def test_the_held_out_novel_is_not_in_training():
    docs = [{"title": f"{corpus.AUSTEN}/{n}", "text": n} for n in ("emma", "persuasion")] + [{"title": "linux/x", "text": "k"}]
    train, held = corpus.hold_out(docs, f"{corpus.AUSTEN}/persuasion")
    assert held["text"] == "persuasion" and [d["title"] for d in train] == [f"{corpus.AUSTEN}/emma", "linux/x"]
    with pytest.raises(PiLoraError, match="not found"):
        corpus.hold_out(docs, f"{corpus.AUSTEN}/mansfieldpark")


def test_jsonl_is_written_atomically_with_its_hash(tmp_path):
    docs = [{"title": "é", "text": "line\nnext"}, {"title": "b", "text": "z"}]
    (tmp_path / "train.jsonl").write_text("an older corpus\n")
    digest = corpus.write_atomically(tmp_path / "train.jsonl", corpus.jsonl(docs))
    raw = (tmp_path / "train.jsonl").read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    assert [json.loads(line) for line in raw.decode().splitlines()] == docs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # no temporary file left


def test_missing_tools_and_failed_downloads_are_one_readable_line():
    with pytest.raises(PiLoraError, match="'no-such-tool-x' not found"):
        corpus.run(["no-such-tool-x", "download", "p"])
    with pytest.raises(PiLoraError, match="failed: E: Unable to locate package p$"):
        corpus.run(["sh", "-c", "echo 'W: a warning' >&2; echo 'E: Unable to locate package p' >&2; exit 100"])


def test_the_command_exits_2_on_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    assert corpus.main(["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
