"""Documents in, fixed-length token sequences out.

Each document is tokenized as BOS + text + EOS and the documents are packed end to end into
sequences of exactly `length` tokens with positions 0..length-1: continued-pretraining packing,
as the PI paper trains. Local files are tokenized once into a cached token stream (keyed on the
tokenizer and the files, not the length, so one cache serves every target length); hub datasets
are streamed and packed on the fly, so PG-19 or RedPajama is never tokenized up front.

A run's position in the data is one number, the index of the next sequence, so resuming is exact.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .console import note
from .errors import PiLoraError, check_text, first_line

READERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_files(source: str) -> list[Path] | None:
    """The files a local source names, or None when it is a hub id."""
    if source == "demo":
        from .demo import TEXT

        return [TEXT]
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in READERS:
            raise PiLoraError(f"data file '{source}' has an unsupported type; use one of {', '.join(READERS)}.")
        return readable([path])
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in READERS and p.is_file())
        if not files:
            raise PiLoraError(f"data folder '{source}' holds no {', '.join(READERS)} files.")
        kinds = {READERS[p.suffix] for p in files}
        if len(kinds) > 1:
            raise PiLoraError(f"data folder '{source}' mixes file kinds ({', '.join(sorted(kinds))}); use one.")
        return readable(files)
    if source.startswith((".", "/", "~")) or path.suffix in READERS:
        raise PiLoraError(f"data file '{source}' does not exist.")
    return None


def readable(files: list[Path]) -> list[Path]:
    """Text files that are UTF-8 and hold something: the datasets readers fail on the others with a
    traceback (a UnicodeDecodeError mid-way through tokenizing, a StopIteration on an empty JSON file)."""
    for f in files:
        if READERS[f.suffix] == "parquet":
            continue
        check_text(f)
        if READERS[f.suffix] == "json" and f.stat().st_size < 1 << 16 and not f.read_bytes().strip():
            raise PiLoraError(f"data file '{f}' is empty.")
    return files


def open_dataset(section, files: list[Path] | None, streaming: bool):
    """A `datasets` dataset of documents (streamed or not)."""
    import datasets

    if files is None:
        from . import hub

        hub.require(section.source, "dataset")
    try:
        if files is None:
            return datasets.load_dataset(
                section.source, section.config, split=section.split, streaming=streaming
            )
        reader = READERS[files[0].suffix]
        extra = {"sample_by": "document"} if reader == "text" else {}
        return datasets.load_dataset(
            reader, data_files=[str(f) for f in files], split="train", streaming=streaming, **extra
        )
    except (FileNotFoundError, ValueError, ConnectionError, OSError, StopIteration,
            datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise PiLoraError(f"cannot read data '{section.source}': {first_line(cause)}") from e


def texts(dataset, field: str, skip: bool = False, counts: dict | None = None) -> Iterator[str]:
    """Each row's text. A row whose text field is missing or null is an error naming the row, or, with
    `skip` (data.skip_bad_rows), skipped and counted in counts["skipped"]; a value that is not text
    is always an error: no row is lost without a word."""
    for i, row in enumerate(dataset):
        if field not in row:
            raise PiLoraError(
                f"data rows have no field '{field}' (fields: {', '.join(row)}); set data.text_field."
            )
        text = row[field]
        if isinstance(text, str):
            if text:
                yield text
            continue
        shown = repr(dict(row))
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        if text is not None:
            raise PiLoraError(f"data row {i + 1} has a {type(text).__name__} in '{field}', not text: {shown}")
        if not skip:
            raise PiLoraError(f"data row {i + 1} has no '{field}' (null or missing): {shown}. Fix the data, or "
                              "set data.skip_bad_rows true to skip such rows (they are counted).")
        if counts is not None:
            counts["skipped"] = counts.get("skipped", 0) + 1


def token_ids(docs: Iterable[str], tokenizer, batch: int = 32) -> Iterator[list[int]]:
    """Each document as BOS + tokens + EOS (BOS only where the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    pending: list[str] = []

    def flush():
        out = tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
        pending.clear()
        return out

    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield from (bos + ids + eos for ids in flush())
    if pending:
        yield from (bos + ids + eos for ids in flush())


def pack(docs: Iterable[list[int]], length: int) -> Iterator[np.ndarray]:
    """Consecutive sequences of exactly `length` tokens; the tail that does not fill one is dropped."""
    buffer: list[int] = []
    for ids in docs:
        buffer.extend(ids)
        while len(buffer) >= length:
            yield np.asarray(buffer[:length], dtype=np.int64)
            del buffer[:length]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(
        f"{text}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode()
    ).hexdigest()


def cache_key(section, files: list[Path], tokenizer) -> str:
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([tokenizer_fingerprint(tokenizer), stamp, section.text_field, section.skip_bad_rows])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(path: Path, tokenizer) -> np.ndarray:
    """The cached stream, or ValueError saying why it cannot be used (truncated, garbage, wrong)."""
    meta = json.loads(path.with_suffix(".json").read_text())
    stream = np.load(path, mmap_mode="r", allow_pickle=False)
    if stream.dtype != np.uint32 or stream.ndim != 1 or len(stream) != meta["tokens"]:
        raise ValueError(f"{stream.dtype} {stream.shape}, not {meta['tokens']} uint32 tokens")
    if len(stream) and int(stream.max()) >= len(tokenizer):  # a token the model has no embedding for
        raise ValueError(f"token {int(stream.max())} is outside the vocabulary ({len(tokenizer)})")
    return stream


def cached_tokens(section, files: list[Path], tokenizer, cache_dir: Path, progress=None,
                  counts: dict | None = None) -> np.ndarray:
    """The whole token stream of local files, tokenized once and memory-mapped after. A cache that
    cannot be read (a kill, a full disk, an edit) is said and rebuilt, never a lasting failure."""
    from . import run

    path = cache_dir / f"{cache_key(section, files, tokenizer)}.npy"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PiLoraError(f"cannot create the token cache folder '{cache_dir}': {e.strerror}.") from None
    with run.writing(path, wait=True):  # one process tokenizes, another waiting uses its cache
        if path.is_file():
            try:
                stream = _read_cache(path, tokenizer)
                if counts is not None:
                    counts["skipped"] = json.loads(path.with_suffix(".json").read_text()).get("skipped", 0)
                return stream
            except (OSError, ValueError, KeyError, TypeError) as e:
                note(f"[yellow]token cache[/] {path} cannot be used ({first_line(e)}); tokenizing again.")
        dataset = open_dataset(section, files, streaming=False)
        task = progress.add_task("tokenizing", total=len(dataset), info="") if progress else None
        chunks, found = [], {"skipped": 0}
        for ids in token_ids(texts(dataset, section.text_field, section.skip_bad_rows, found), tokenizer):
            chunks.append(np.asarray(ids, dtype=np.uint32))
            if progress:
                progress.advance(task)
        stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
        tmp = run.temp_file(path, ".npy")
        try:
            with open(tmp, "wb") as f:
                np.save(f, stream)
            run.write_json(path.with_suffix(".json"), {"tokens": len(stream), "skipped": found["skipped"]})
            run.put_file(tmp, path)
        except OSError as e:
            raise PiLoraError(f"cannot write the token cache '{path}': {e.strerror}.") from None
        finally:
            tmp.unlink(missing_ok=True)
        if counts is not None:
            counts["skipped"] = found["skipped"]
        return stream


def _counting(docs: Iterator[list[int]], found: list[int]) -> Iterator[list[int]]:
    for ids in docs:
        found[0] += len(ids)
        yield ids


def too_short(found: int, length: int) -> PiLoraError:
    return PiLoraError(
        f"the data holds {found} tokens, but one sequence needs {length}; "
        "give more text or a shorter target length."
    )


class PackedData:
    """Sequences of a fixed length from a token array; sequence i is deterministic given the seed."""

    def __init__(self, tokens: np.ndarray, length: int, seed: int, shuffle: bool):
        self.count = len(tokens) // length
        if self.count == 0:
            raise too_short(len(tokens), length)
        self.tokens, self.length, self.seed, self.shuffle = tokens, length, seed, shuffle
        self.total_tokens = len(tokens)
        self.skipped = 0  # rows without text, skipped by data.skip_bad_rows

    def describe(self) -> str:
        return (
            f"{self.count} sequences of {self.length} tokens "
            f"({self.count * self.length:,} of {self.total_tokens:,} tokens used)" + skipped_note(self.skipped)
        )

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.count)
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def batches(self, start: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches of sequences from global sequence index `start` on, looping over epochs."""
        index, epoch, order = start, None, None
        while True:
            rows = []
            for _ in range(batch_size):
                e, i = divmod(index, self.count)
                if e != epoch:
                    epoch, order = e, self.order(e)
                j = order[i] * self.length
                rows.append(torch.from_numpy(np.asarray(self.tokens[j : j + self.length], dtype=np.int64)))
                index += 1
            yield torch.stack(rows)


class StreamedData:
    """Sequences packed on the fly from a streamed dataset; resuming skips what was consumed.

    With shuffling, documents go through a seeded shuffle buffer reseeded each epoch, so the
    order is random yet the same on every pass, which keeps skip-to-resume exact.
    """

    SHUFFLE_BUFFER = 1000  # documents

    def __init__(self, dataset, tokenizer, field: str, length: int, seed: int | None = None, skip: bool = False):
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=self.SHUFFLE_BUFFER)
        self.dataset, self.tokenizer, self.field, self.length = dataset, tokenizer, field, length
        self.count, self.skip, self.counts = None, skip, {"skipped": 0}
        next(self.sequences())  # fail now, not after the model has loaded: wrong field, too little data

    def describe(self) -> str:
        note = " (rows without text are skipped: data.skip_bad_rows)" if self.skip else ""
        return f"streamed, packed into sequences of {self.length} tokens{note}" + skipped_note(self.counts["skipped"])

    def sequences(self) -> Iterator[np.ndarray]:
        """Packed sequences, starting the stream over whenever it ends (epochs)."""
        epoch = 0
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            epoch += 1
            found, produced = [0], 0
            docs = token_ids(texts(self.dataset, self.field, self.skip, self.counts), self.tokenizer)
            for seq in pack(_counting(docs, found), self.length):
                produced += 1
                yield seq
            if produced == 0:
                raise too_short(found[0], self.length)

    def batches(self, start: int, batch_size: int) -> Iterator[torch.Tensor]:
        stream = self.sequences()
        for _ in range(start):
            next(stream)
        while True:
            yield torch.stack([torch.from_numpy(next(stream)) for _ in range(batch_size)])


def streamed(section, files: list[Path] | None) -> bool:
    return files is None if section.streaming == "auto" else section.streaming


def token_stream(section, files: list[Path] | None, tokenizer, cache_dir: Path, progress=None,
                 counts: dict | None = None) -> np.ndarray:
    """All of a source's tokens at once: local files through the cache, a hub dataset downloaded."""
    if files is not None:
        return cached_tokens(section, files, tokenizer, cache_dir, progress, counts)
    dataset = open_dataset(section, None, streaming=False)
    docs = texts(dataset, section.text_field, section.skip_bad_rows, counts)
    return np.fromiter((t for ids in token_ids(docs, tokenizer) for t in ids), dtype=np.uint32)


def skipped_note(skipped: int) -> str:
    return f"; {skipped:,} row(s) without text skipped (data.skip_bad_rows)" if skipped else ""


def split(tokens: np.ndarray, fraction: float, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out): the last `fraction` of the tokens is held out, starting at the next
    document boundary unless that would leave less than half of it (one long document)."""
    if not fraction:
        return tokens, tokens[:0]
    cut = len(tokens) - math.ceil(len(tokens) * fraction)
    ends = np.flatnonzero(np.asarray(tokens[cut:]) == eos)
    if len(ends) and len(tokens) - (cut + ends[0] + 1) >= (len(tokens) - cut) / 2:
        cut += int(ends[0]) + 1
    return tokens[:cut], tokens[cut:]


def every_nth(dataset, fraction: float, held_out: bool):
    """A streamed dataset's held-out documents (every round(1/fraction)-th) or the others. Filtered
    before any shuffle, so a document is on the same side in every epoch."""
    n = max(2, round(1 / fraction))
    return dataset.filter(lambda row, i: (i % n == n - 1) == held_out, with_indices=True)


def load(section, tokenizer, length: int, seed: int, cache_dir: Path, progress=None):
    """Packed training data for `section` (held-out data excluded), as PackedData (local, cached)
    or StreamedData (hub)."""
    files = local_files(section.source)
    if streamed(section, files):
        dataset = open_dataset(section, files, streaming=True)
        if section.eval_fraction:
            dataset = every_nth(dataset, section.eval_fraction, held_out=False)
        return StreamedData(dataset, tokenizer, section.text_field, length, seed if section.shuffle else None,
                            section.skip_bad_rows)
    counts = {"skipped": 0}
    tokens = token_stream(section, files, tokenizer, cache_dir, progress, counts)
    train, _ = split(tokens, section.eval_fraction, tokenizer.eos_token_id)
    packed = PackedData(train, length, seed, section.shuffle)
    packed.skipped = counts["skipped"]
    return packed


def held_out(section, tokenizer, cache_dir: Path, progress=None) -> Iterator[np.ndarray] | None:
    """The validation tokens, in pieces (documents or slices), or None when nothing is held out."""
    if section.eval_source is not None:
        section = section.model_copy(update={"source": section.eval_source, "split": section.eval_split,
                                             "eval_source": None, "eval_fraction": 0.0})
        files = local_files(section.source)
        if files is None:  # a hub split, streamed: only what validation needs is read
            docs = texts(open_dataset(section, None, streaming=True), section.text_field, section.skip_bad_rows)
            return (np.asarray(ids, dtype=np.int64) for ids in token_ids(docs, tokenizer))
        return _slices(cached_tokens(section, files, tokenizer, cache_dir, progress))
    if not section.eval_fraction:
        return None
    files = local_files(section.source)
    if streamed(section, files):
        dataset = every_nth(open_dataset(section, files, streaming=True), section.eval_fraction, held_out=True)
        docs = texts(dataset, section.text_field, section.skip_bad_rows)
        return (np.asarray(ids, dtype=np.int64) for ids in token_ids(docs, tokenizer))
    tokens = token_stream(section, files, tokenizer, cache_dir, progress)
    return _slices(split(tokens, section.eval_fraction, tokenizer.eos_token_id)[1])


def _slices(tokens: np.ndarray, size: int = 1 << 16) -> Iterator[np.ndarray]:
    for i in range(0, len(tokens), size):
        yield np.asarray(tokens[i : i + size], dtype=np.int64)


def validation(section, tokenizer, length: int, count: int, cache_dir: Path, progress=None) -> torch.Tensor | None:
    """Up to `count` held-out sequences of `length` tokens, packed like the training data."""
    pieces = held_out(section, tokenizer, cache_dir, progress)
    if pieces is None:
        return None
    found = [0]
    rows = list(itertools.islice(pack(_counting(pieces, found), length), count))
    if not rows:
        raise PiLoraError(f"the held-out data holds {found[0]:,} tokens, fewer than one sequence of {length}; "
                          "raise data.eval_fraction or give a longer data.eval_source.")
    return torch.from_numpy(np.stack(rows))


def held_out_tokens(section, tokenizer, need: int, cache_dir: Path, progress=None) -> torch.Tensor | None:
    """The first `need` held-out tokens (fewer when there are not as many), or None."""
    pieces = held_out(section, tokenizer, cache_dir, progress)
    if pieces is None:
        return None
    taken = list(itertools.islice(itertools.chain.from_iterable(pieces), need))
    return torch.tensor(taken, dtype=torch.int64)
