import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pi_lora import data
from pi_lora.errors import PiLoraError
from pi_lora.recipe import DataSection


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def section(source, **kw):
    return DataSection(source=str(source), **kw)


def test_documents_are_framed_and_packed_contiguously(tokenizer):
    docs = ["In the beginning", "God created the heaven and the earth. " * 5, "And there was light"]
    stream = [t for ids in data.token_ids(docs, tokenizer) for t in ids]
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert stream[: len(first) + 2] == [tokenizer.bos_token_id, *first, tokenizer.eos_token_id]
    assert stream.count(tokenizer.bos_token_id) == 3 and stream.count(tokenizer.eos_token_id) == 3
    seqs = list(data.pack(data.token_ids(docs, tokenizer), 16))
    assert len(seqs) == len(stream) // 16
    assert all(len(s) == 16 for s in seqs)
    assert np.concatenate(seqs).tolist() == stream[: 16 * len(seqs)]


def test_local_txt_files_are_whole_documents(corpus, tokenizer, tmp_path):
    packed = data.load(section(corpus), tokenizer, 128, seed=0, cache_dir=tmp_path)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    want = [t for ids in data.token_ids(texts, tokenizer) for t in ids]
    assert packed.total_tokens == len(want)
    assert np.asarray(packed.tokens).tolist() == want  # one BOS/EOS pair per file, not per line
    assert packed.count == len(want) // 128


def test_jsonl_with_text_field_and_wrong_field(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"title": f"t{i}", "body": "word " * 300}) + "\n" for i in range(3)))
    packed = data.load(section(path, text_field="body"), tokenizer, 64, 0, tmp_path / "cache")
    assert packed.count > 0
    with pytest.raises(PiLoraError, match="no field 'text' .fields: title, body"):
        data.load(section(path), tokenizer, 64, 0, tmp_path / "cache2")


def test_parquet_and_streaming_give_the_same_sequences(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["alpha beta gamma " * 40, "delta epsilon " * 50]}).to_parquet(path)
    cached = data.load(section(path, shuffle=False), tokenizer, 32, 0, tmp_path / "c")
    streamed = data.load(section(path, streaming=True, shuffle=False), tokenizer, 32, 0, tmp_path / "c")
    assert isinstance(streamed, data.StreamedData)
    a, b = cached.batches(0, 2), streamed.batches(0, 2)
    for _ in range(cached.count // 2 + 3):  # past the end: both start the data over
        assert torch.equal(next(a), next(b))


def test_streaming_shuffle_is_seeded_and_resumable(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": [f"document {i} " * 30 for i in range(40)]}).to_parquet(path)
    load = lambda seed: data.load(section(path, streaming=True), tokenizer, 32, seed, tmp_path)  # noqa: E731
    first = [next(b) for b in [load(1).batches(0, 2)] for _ in range(30)]
    again = load(1).batches(0, 2)
    assert all(torch.equal(x, next(again)) for x in first)
    plain = data.load(section(path, streaming=True, shuffle=False), tokenizer, 32, 1, tmp_path).batches(0, 2)
    assert not all(torch.equal(x, next(plain)) for x in first)  # shuffled, not file order
    resumed = load(1).batches(10 * 2, 2)
    assert all(torch.equal(x, next(resumed)) for x in first[10:])


def test_too_little_data_says_how_much(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("In the beginning")
    with pytest.raises(PiLoraError, match=r"holds \d+ tokens, but one sequence needs 4096"):
        data.load(section(path), tokenizer, 4096, 0, tmp_path)
    with pytest.raises(PiLoraError, match="one sequence needs 4096"):  # found before any model loads
        data.load(section(path, streaming=True), tokenizer, 4096, 0, tmp_path)


@pytest.mark.parametrize("source, message", [
    ("missing.txt", "does not exist"),
    ("./nowhere", "does not exist"),
])
def test_bad_sources(source, message, tokenizer, tmp_path):
    with pytest.raises(PiLoraError, match=message):
        data.load(section(source), tokenizer, 64, 0, tmp_path)


def test_bad_local_files(tmp_path, tokenizer):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PiLoraError, match="unsupported type"):
        data.load(section(tmp_path / "x.csv"), tokenizer, 64, 0, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PiLoraError, match="holds no"):
        data.load(section(empty), tokenizer, 64, 0, tmp_path)


def test_token_cache_is_reused_and_invalidated(corpus, tokenizer, tmp_path):
    files = sorted(corpus.glob("*.txt"))
    first = data.cached_tokens(section(corpus), files, tokenizer, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = data.cached_tokens(section(corpus), files, tokenizer, tmp_path)
    assert isinstance(again, np.memmap) and np.array_equal(first, again)
    # the cache serves every length: it holds the stream, not sequences
    assert data.load(section(corpus), tokenizer, 32, 0, tmp_path).total_tokens == len(first)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "a.txt").write_text(files[0].read_text() + " more")
    data.cached_tokens(section(changed), [changed / "a.txt"], tokenizer, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_resume_position_is_exact(corpus, tokenizer, tmp_path):
    packed = data.load(section(corpus), tokenizer, 64, seed=3, cache_dir=tmp_path)
    full = packed.batches(0, 3)
    seen = [next(full) for _ in range(2 * packed.count)]  # crosses epochs with reshuffles
    resumed = packed.batches(7 * 3, 3)
    for batch in seen[7:]:
        assert torch.equal(batch, next(resumed))
    epoch0 = torch.cat(seen[: packed.count // 3]).tolist()
    assert len({tuple(r) for r in epoch0}) == len(epoch0)  # no repeats inside an epoch
