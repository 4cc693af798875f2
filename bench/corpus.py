"""A varied long-text training corpus from Debian packages, for a context-extension study.

Sources (each one package, downloaded with `apt-get download` and unpacked with `dpkg-deb -x`,
nothing installed): the Linux kernel's reST documentation, Python's reST documentation, the
PostgreSQL manual (HTML), the Debian Administrator's Handbook (English HTML) and six Jane Austen
novels (r-cran-janeaustenr, read from R's lazy-load database). A document is one file, page or
novel; documents under --min-chars are dropped.

    python bench/corpus.py --out DIR                       # DIR/train.jsonl, austen-heldout.jsonl, manifest.json
    python bench/corpus.py --out DIR --tokenizer MODEL_DIR # also count tokens per package

DIR/train.jsonl holds {"title", "text"} lines shuffled with --seed so packages interleave;
DIR/austen-heldout.jsonl holds one novel (--heldout), which train.jsonl does not; DIR/manifest.json
records each package's exact version, documents, characters (and tokens; the held-out novel counted
with its package), each file's documents, characters and sha256, and the command. Point training at
DIR/train.jsonl itself: the folder also holds the held-out novel and the manifest. The .debs stay in
DIR/.debs, so a second run downloads nothing and writes the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from pi_lora.errors import PiLoraError, first_line  # noqa: E402

AUSTEN = "r-cran-janeaustenr"
# package -> (files to read, relative to the unpacked root; how to read them)
SOURCES = {
    "linux-doc-6.1": ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz", "text"),
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "text"),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html/*.html", "html"),
    "debian-handbook": ("usr/share/doc/debian-handbook/html/en-US/*.html", "html"),
    AUSTEN: ("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", "rdata"),
}
SKIPPED_PARTS = {"translations"}  # the kernel's non-English copies of its documents
BLOCKS = {"p", "div", "br", "li", "dd", "dt", "tr", "pre", "table", "section", "blockquote",
          "h1", "h2", "h3", "h4", "h5", "h6"}
HIDDEN = {"script", "style", "head"}
# classes or ids of navigation: DocBook's and Publican's Prev/Up/Next bars, tables of contents, banners
HIDDEN_MARKS = {"navheader", "navfooter", "docnav", "toc", "banner"}


class _Text(HTMLParser):
    """Visible text of a page: block elements become line breaks, <pre> keeps its layout."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden: list[str] = []  # the tag that opened the hidden element, once per nesting level
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        marks = set((dict(attrs).get("class") or "").split()) | {dict(attrs).get("id")}
        if self.hidden and tag == self.hidden[0] or not self.hidden and (tag in HIDDEN or marks & HIDDEN_MARKS):
            self.hidden.append(tag)  # the same tag nested inside is counted, to find the element's real end
        self.pre += tag == "pre"
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.hidden and tag == self.hidden[0]:
            self.hidden.pop()
        self.pre -= tag == "pre" and self.pre > 0
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden and self.pre:
            self.parts.append(data)
        elif not self.hidden:  # outside <pre> a run of white space is one space, none at a line's start
            text = re.sub(r"\s+", " ", data)
            self.parts.append(text.lstrip() if not self.parts or self.parts[-1].endswith("\n") else text)


def html_to_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    lines = (line.rstrip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def r_unserialize(data: bytes):
    """R's XDR serialization of character, integer and logical vectors and (named) lists.

    Hand-written: reading an R package's data otherwise needs R itself or the `rdata` package with
    xarray and pandas, for the few types a lazy-load database of texts holds."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n:pos]

    def integer() -> int:
        return struct.unpack(">i", take(4))[0]

    if take(2) != b"X\n":
        raise PiLoraError("R data is not in R's XDR serialization format.")
    if (integer(), integer(), integer())[0] == 3:
        take(integer())  # format 3 names the native encoding
    symbols: list = []

    def item():
        flags = integer()
        kind, attributes, tagged = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to a symbol read before
            return symbols[(flags >> 8) - 1]
        if kind == 1:  # a symbol: its name
            symbols.append(item())
            return symbols[-1]
        if kind == 9:  # a string (length -1 is NA); bit 2 of its levels marks latin-1
            n = integer()
            return None if n == -1 else take(n).decode("latin-1" if flags >> 12 & 4 else "utf-8")
        if kind == 2:  # a pairlist (attributes): attributes, tag, value, rest
            _ = item() if attributes else None
            tag = item() if tagged else None
            return {tag: item(), **(item() or {})}
        if kind in (10, 13):  # logical, integer
            n = integer()
            values = list(struct.unpack(f">{n}i", take(4 * n)))
        elif kind in (16, 19):  # character vector, list
            values = [item() for _ in range(integer())]
        else:
            raise PiLoraError(f"R data holds a type (SEXP {kind}) this reader does not read.")
        names = (item() or {}).get("names") if attributes else None
        return dict(zip(names, values)) if names else values

    return item()


def read_rdata(index: Path) -> dict[str, str]:
    """Each object of an R lazy-load database (NAME.rdx + NAME.rdb) that is a character vector, as text."""
    variables = r_unserialize(gzip.decompress(index.read_bytes()))["variables"]
    database = index.with_suffix(".rdb").read_bytes()
    texts = {}
    for name, (offset, length) in variables.items():
        blob = database[offset:offset + length]  # 4 bytes of uncompressed length, then zlib
        value = r_unserialize(zlib.decompress(blob[4:]))
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            texts[name] = "\n".join(v or "" for v in value)
    return texts


def read_documents(root: Path, package: str, pattern: str, kind: str) -> list[dict]:
    """The documents of one unpacked package, in path order."""
    docs = []
    for path in sorted(root.glob(pattern)):
        if kind == "rdata":
            docs += [{"title": f"{package}/{name}", "text": text} for name, text in read_rdata(path).items()]
            continue
        relative = path.relative_to(root / pattern.split("*")[0])
        if SKIPPED_PARTS & set(relative.parts):
            continue
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        docs.append({"title": f"{package}/{relative}", "text": html_to_text(text) if kind == "html" else text})
    return docs


def keep(docs: list[dict], min_chars: int) -> list[dict]:
    """Documents with at least min_chars characters, white space at either end not counted."""
    return [d for d in docs if len(d["text"].strip()) >= min_chars]


def hold_out(docs: list[dict], title: str) -> tuple[list[dict], dict]:
    """(the others, the one titled `title`)."""
    held = [d for d in docs if d["title"] == title]
    if len(held) != 1:
        raise PiLoraError(f"held-out document '{title}' not found (titles: {', '.join(d['title'] for d in docs[:8])}).")
    return [d for d in docs if d["title"] != title], held[0]


def jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def write_atomically(path: Path, data: bytes) -> str:
    """Write to a temporary file, then rename it over `path`; return the data's sha256."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


def run(command: list[str], cwd: Path | None = None) -> str:
    """The command's output; a missing tool or a failure is one line (apt's first "E:" line)."""
    if shutil.which(command[0]) is None:
        raise PiLoraError(f"'{command[0]}' not found: building the corpus needs a Debian or Ubuntu system.")
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("E:")] or done.stderr.splitlines() or ["?"]
        raise PiLoraError(f"{shlex.join(command)} failed: {errors[0]}")
    return done.stdout


def fetch(package: str, cache: Path) -> Path:
    """The package's .deb: the cached one, else one `apt-get download` (no install, no root needed)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        run(["apt-get", "download", package], cwd=cache)
        found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise PiLoraError(f"apt-get download {package} left no {package}_*.deb in {cache}.")
    return found[-1]


def count_tokens(docs: list[dict], tokenizer) -> int:
    return sum(len(ids) for i in range(0, len(docs), 64)
               for ids in tokenizer([d["text"] for d in docs[i:i + 64]], add_special_tokens=False)["input_ids"])


def build(out: Path, heldout: str, seed: int, min_chars: int, tokenizer_path: str | None) -> dict:
    tokenizer = None
    if tokenizer_path:
        from transformers import AutoTokenizer

        if not Path(tokenizer_path).is_dir():
            raise PiLoraError(f"tokenizer folder '{tokenizer_path}' does not exist.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as e:
            raise PiLoraError(f"cannot load the tokenizer '{tokenizer_path}': {first_line(e)}") from e
    out.mkdir(parents=True, exist_ok=True)
    docs, packages = [], []
    for package, (pattern, kind) in SOURCES.items():
        started = time.monotonic()
        deb = fetch(package, out / ".debs")
        version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        with tempfile.TemporaryDirectory(prefix="corpus-") as root:
            run(["dpkg-deb", "-x", str(deb), root])
            found = keep(read_documents(Path(root), package, pattern, kind), min_chars)
        entry = {"name": package, "version": version, "documents": len(found),
                 "characters": sum(len(d["text"]) for d in found)}
        if tokenizer is not None:
            entry["tokens"] = count_tokens(found, tokenizer)
        packages.append(entry)
        docs += found
        tokens = f", {entry['tokens'] / 1e6:.2f}M tokens" if "tokens" in entry else ""
        print(f"{package} {version}: {len(found)} documents, {entry['characters'] / 1e6:.1f}M characters"
              f"{tokens} ({time.monotonic() - started:.0f} s)", flush=True)
    train, held = hold_out(docs, f"{AUSTEN}/{heldout}")
    random.Random(seed).shuffle(train)
    files = {name: {"sha256": write_atomically(out / name, jsonl(rows)), "documents": len(rows),
                    "characters": sum(len(d["text"]) for d in rows)}
             for name, rows in (("train.jsonl", train), ("austen-heldout.jsonl", [held]))}
    manifest = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "seed": seed,
                "min_chars": min_chars, "heldout": held["title"], "tokenizer": tokenizer_path,
                "packages": packages, "files": files}
    write_atomically(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, austen-heldout.jsonl, manifest.json")
    parser.add_argument("--heldout", default="persuasion",
                        choices=["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"],
                        help="the Austen novel kept out of train.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="seed of the documents' shuffle")
    parser.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder: count tokens per package")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = build(args.out, args.heldout, args.seed, args.min_chars, args.tokenizer)
    except PiLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    train = manifest["files"]["train.jsonl"]
    print(f"{args.out}/train.jsonl: {train['documents']} documents, {train['characters'] / 1e6:.1f}M characters; "
          f"held out {manifest['heldout']} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
