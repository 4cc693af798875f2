"""GGUF export: the tokenizer llama.cpp reads from it, checked against transformers and llama.cpp itself.

The fast tests check the metadata and the export's own checks on tiny models (a byte-level BPE one,
and a real SentencePiece LLaMA tokenizer trained here). The slow ones run llama.cpp's own
`llama-tokenize` and `llama-perplexity`, built from the llama-cpp-python sdist (tests/llamacpp.py).
"""

import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from typer.testing import CliRunner

import llamacpp  # tests/llamacpp.py
from pi_lora import export, run, vocab
from pi_lora.cli import app
from pi_lora.errors import PiLoraError
from test_real_model import missing, smollm2, smollm2_folder  # noqa: F401  (fixtures)

RUNNER = CliRunner()


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


def train(base: Path, corpus: Path, out: Path, target_len: int = 256, steps: int = 2, scaling: str = "linear") -> Path:
    argv = ["train", "--base", str(base), "--target-len", str(target_len), "--data", str(corpus), "--output",
            str(out), "--steps", str(steps), "--lr", "1e-2", "--grad-accum", "1", "--rank", "4", "--scaling", scaling,
            "--set", "lora.trainable=[embed, norm]", "--set", "train.warmup_steps=0"]
    result = RUNNER.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def build_sentencepiece_llama(folder: Path) -> Path:
    """A tiny LLaMA with a real SentencePiece BPE tokenizer (LLaMA's settings), trained on Genesis in seconds."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from pi_lora.demo import TEXT

    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in TEXT.read_text().splitlines() if line.strip()]),
        model_writer=model_file, model_type="bpe", vocab_size=600, character_coverage=1.0, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_chatml_llama(folder: Path) -> Path:
    """A tiny LLaMA whose byte-level BPE has SmolLM2's kind of special tokens: inside the vocabulary (ids 0-3),
    with a chat template, plus one added token that is not special (`<think>`, after the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pi_lora.demo import TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(TEXT)], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|endoftext|>", "<repo_name>"])
    tokenizer.add_tokens(["<think>"])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_base(tmp_path_factory):
    return build_chatml_llama(tmp_path_factory.mktemp("bpe") / "base")


@pytest.fixture(scope="module")
def bpe_run(bpe_base, corpus, tmp_path_factory):
    return train(bpe_base, corpus, tmp_path_factory.mktemp("bpe-run") / "run")


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory):
    return build_sentencepiece_llama(tmp_path_factory.mktemp("spm") / "base")


@pytest.fixture(scope="module")
def spm_run(spm_base, corpus, tmp_path_factory):
    return train(spm_base, corpus, tmp_path_factory.mktemp("spm-run") / "run")


@pytest.fixture(scope="module")
def demo_run(tiny_base, corpus, tmp_path_factory):
    """A run on the demo's kind of tokenizer: byte-level BPE trained afresh, GPT-2's split."""
    return train(tiny_base, corpus, tmp_path_factory.mktemp("demo-run") / "run")


def test_demo_tokenizer_exports_with_no_flags(demo_run, tmp_path):
    out = tmp_path / "demo.gguf"
    result = RUNNER.invoke(app, ["export", str(demo_run), "--format", "gguf", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert fields(out)["tokenizer.ggml.pre"] == "gpt-2"
    assert "verified: " in result.output and "tokenizer not verified" not in result.output


def test_unknown_bpe_tokenizer_is_an_error_that_names_the_option(bpe_run, tmp_path, monkeypatch):
    monkeypatch.setattr(vocab, "split_name", lambda tokenizer: None)  # a split llama.cpp has no name for
    out = tmp_path / "m.gguf"
    result = RUNNER.invoke(app, ["export", str(bpe_run), "--format", "gguf", "--output", str(out)])
    assert result.exit_code == 2 and "--tokenizer-pre NAME" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bpe_special_tokens_are_control_and_bos_flags_written(bpe_run, bpe_base, tmp_path):
    from gguf import TokenType
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    result = RUNNER.invoke(app, ["export", str(bpe_run), "--format", "gguf", "--output", str(out),
                                 "--tokenizer-pre", "gpt-2"])
    assert result.exit_code == 0, result.output
    assert "pre-tokenizer 'gpt-2') with identical tokenization" in " ".join(result.output.split())
    got = fields(out)
    assert got["tokenizer.ggml.pre"] == "gpt-2" and got["tokenizer.ggml.model"] == "gpt2"
    assert got["tokenizer.ggml.tokens"][:4] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]
    assert got["tokenizer.ggml.token_type"][:4] == [TokenType.CONTROL] * 4
    assert got["tokenizer.ggml.tokens"][512:] == ["<think>"] and got["tokenizer.ggml.token_type"][512] == TokenType.USER_DEFINED
    assert set(got["tokenizer.ggml.token_type"][4:512]) == {TokenType.NORMAL}
    assert got["tokenizer.ggml.add_bos_token"] is False and got["tokenizer.ggml.add_eos_token"] is False
    assert got["tokenizer.ggml.bos_token_id"] == 1 and got["tokenizer.ggml.eos_token_id"] == 2
    assert got["tokenizer.chat_template"] == CHATML
    merges = json.loads((bpe_base / "tokenizer.json").read_text())["model"]["merges"]
    assert got["tokenizer.ggml.merges"][:3] == [" ".join(m) for m in merges[:3]]
    chat = AutoTokenizer.from_pretrained(bpe_base).apply_chat_template(vocab.CHAT, tokenize=False)
    (gguf_tok, _), hf = vocab.gguf_tokenizer(out), AutoTokenizer.from_pretrained(bpe_base)
    assert gguf_tok.encode("<|im_start|>user") == [1] + hf.encode("user")  # whole, not in pieces
    assert gguf_tok.encode("<repo_name><think>") == [3, 512]
    assert gguf_tok.encode(chat) == hf.encode(chat)


def test_tokenizer_check_catches_special_tokens_written_as_normal(bpe_run, tmp_path, monkeypatch):
    """What the gguf package's reader writes (special tokens inside the vocabulary as normal) fails the check."""
    monkeypatch.setattr(vocab, "added_types", lambda folder: {})
    with pytest.raises(PiLoraError, match="tokenizer check failed"):
        export.export_gguf(bpe_run, tmp_path / "bad.gguf", "fp32", tokenizer_pre="gpt-2")
    assert not list(tmp_path.iterdir())


def test_split_names_transformers_rebuilds_are_detected_not_assumed(monkeypatch):
    """transformers 5.17 has no GGUF_PRE_TOKENIZER_SPLITS and reads every BPE GGUF with GPT-2's split."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    if hasattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS"):
        assert "llama-bpe" in vocab.rebuilt_splits() and vocab.split_for("llama-bpe") == "transformers"
        monkeypatch.delattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS")
    assert vocab.rebuilt_splits() == frozenset()
    assert vocab.split_for("llama-bpe") is None  # unknown here: trained with GPT-2's split, said so
    assert vocab.split_for("smollm") is not None and vocab.split_for("gpt-2") is not None


def test_pre_name_is_found_by_llamacpp_hash(tiny_base, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    monkeypatch.setattr(vocab, "split_name", lambda tokenizer: None)
    with pytest.raises(PiLoraError, match="--tokenizer-pre"):
        vocab.pre_name(tokenizer)
    monkeypatch.setitem(vocab.PRE_BY_HASH, vocab.pre_hash(tokenizer), "smollm")
    assert vocab.pre_name(tokenizer) == "smollm"  # the hash wins over the split


def test_gpt2_split_is_named_from_the_tokenizer_itself():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def named(split, normalizer=None):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = split
        if normalizer is not None:
            tok.normalizer = normalizer
        return vocab.split_name(PreTrainedTokenizerFast(tokenizer_object=tok))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert named(byte_level) == "gpt-2"
    assert named(pre_tokenizers.ByteLevel(add_prefix_space=True)) is None
    assert named(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)) is None
    assert named(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])) is None
    assert named(byte_level, normalizers.NFKC()) is None


def test_sentencepiece_export_keeps_scores_types_and_tokenizes_like_transformers(spm_run, spm_base, tmp_path):
    import sentencepiece as spm
    from gguf import TokenType
    from transformers import AutoTokenizer

    out = tmp_path / "spm.gguf"
    result = RUNNER.invoke(app, ["export", str(spm_run), "--format", "gguf", "--dtype", "fp32", "--output", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "with identical tokenization" in said and "back with the merged model's logits (max relative" in said
    got = fields(out)
    sp = spm.SentencePieceProcessor(model_file=str(spm_base / "tokenizer.model"))
    assert got["tokenizer.ggml.model"] == "llama" and len(got["tokenizer.ggml.tokens"]) == sp.vocab_size()
    assert got["tokenizer.ggml.tokens"][300] == sp.id_to_piece(300)
    assert math.isclose(got["tokenizer.ggml.scores"][300], sp.get_score(300), rel_tol=1e-6)
    types = got["tokenizer.ggml.token_type"]
    assert types[:3] == [TokenType.CONTROL] * 3 and types[3:259] == [TokenType.BYTE] * 256
    assert got["tokenizer.ggml.add_bos_token"] is True and got["tokenizer.ggml.add_eos_token"] is False
    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    hf = AutoTokenizer.from_pretrained(spm_base)
    assert gguf_tok.encode(vocab.VERIFY_TEXT) == hf.encode(vocab.VERIFY_TEXT) == [1] + sp.encode(vocab.VERIFY_TEXT)
    assert RUNNER.invoke(app, ["export", str(spm_run), "--format", "gguf", "--output", str(tmp_path / "x.gguf"),
                               "--tokenizer-pre", "gpt-2"]).exit_code == 2


def test_sentencepiece_tokenizer_json_without_its_model_file_is_refused(spm_run, tmp_path):
    meta = run.read_meta(spm_run)
    base = tmp_path / "no-model"
    shutil.copytree(meta["base_path"], base, ignore=shutil.ignore_patterns("tokenizer.model"))
    copy = tmp_path / "run"
    shutil.copytree(spm_run, copy)
    run.write_json(copy / run.META, {**meta, "base_path": str(base)})
    with pytest.raises(PiLoraError, match="no tokenizer.model"):
        export.export_gguf(copy, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


# --- llama.cpp itself --------------------------------------------------------------------------

KJV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kjv-books.jsonl"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """llama-tokenize and llama-perplexity, built once from the sdist .ci/run downloads (about 11 min on 2 cores)."""
    archive = llamacpp.sdist()
    if archive is None:
        missing("the llama-cpp-python sdist")
    return llamacpp.build(archive, jobs=int(os.environ.get("LLAMACPP_JOBS", os.cpu_count() or 2)))


def llama_tokenize(bin_dir: Path, model: Path, text: str, tmp_path: Path, special: bool = True) -> list[int]:
    """Token ids as llama.cpp tokenizes `text` (adding BOS as the file says; special tokens parsed)."""
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode())
    args = ["-m", str(model), "-f", str(path), "--ids", "--log-disable", "--no-escape"]
    result = llamacpp.run(bin_dir, "llama-tokenize", *args, *([] if special else ["--no-parse-special"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def llama_perplexity(bin_dir: Path, model: Path, text_file: Path, n_ctx: int) -> float:
    """llama-perplexity on the first chunk: the mean NLL of tokens n_ctx/2+1 .. n_ctx-1, F32 KV cache."""
    result = llamacpp.run(bin_dir, "llama-perplexity", "-m", str(model), "-f", str(text_file), "-c", str(n_ctx),
                          "--chunks", "1", "-ctk", "f32", "-ctv", "f32", "-t", str(os.cpu_count() or 2))
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    assert result.returncode == 0 and found, result.stderr[-3000:]
    return float(found.group(1))


def transformers_perplexity(model, ids: list[int], n_ctx: int, bos: int | None) -> float:
    """The same number in transformers: llama-perplexity's first chunk, BOS written over its first token."""
    chunk = torch.tensor([([bos] if bos is not None else ids[:1]) + ids[1:n_ctx]])
    first = n_ctx // 2
    with torch.no_grad():
        logits = model(input_ids=chunk).logits[0, first:n_ctx - 1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, chunk[0, first + 1:n_ctx]).item())


def check_in_llamacpp(bin_dir: Path, gguf: Path, reference, text_file: Path, n_ctx: int, tmp_path: Path,
                      text: str | None = None):
    """Token ids on the check text and on the perplexity text, then perplexity, against transformers."""
    text = text or vocab.check_text(reference)
    assert llama_tokenize(bin_dir, gguf, text, tmp_path) == reference.encode(text)
    long_text = text_file.read_text()
    ids = reference.encode(long_text)
    assert len(ids) >= 2 * n_ctx
    assert llama_tokenize(bin_dir, gguf, long_text, tmp_path, special=False) == ids
    got = llama_perplexity(bin_dir, gguf, text_file, n_ctx)
    add_bos = fields(gguf)["tokenizer.ggml.add_bos_token"]
    want = transformers_perplexity(export.read_gguf(gguf).eval(), ids, n_ctx, reference.bos_token_id if add_bos else None)
    print(f"{gguf.name}: {len(ids)} tokens identical; perplexity at {n_ctx}: llama.cpp {got:.4f}, transformers {want:.4f}")
    assert abs(got / want - 1) < 1e-3, (got, want)
    return got, want


def test_pre_table_is_llamacpp_converters():
    """Every hash -> name entry, and the check text, as llama.cpp's own converter has them."""
    archive = llamacpp.sdist()
    if archive is None:
        missing("the llama-cpp-python sdist")
    code = (llamacpp.source(archive) / "conversion" / "base.py").read_text()
    assert f"chktxt = {vocab.CHKTXT!r}" in code
    for digest, name in vocab.PRE_BY_HASH.items():
        assert re.search(rf'if chkhsh == "{digest}":\s*\n\s*# ref: \S+\s*\n\s*res = "{re.escape(name)}"', code), name


@pytest.mark.slow
def test_sentencepiece_export_tokenizes_and_scores_like_transformers_in_llamacpp(llama_bin, spm_run, spm_base, tmp_path):
    """Identical ids on the fixed text (and Genesis), perplexity at 256 (trained 64).

    Where transformers' LlamaTokenizer itself departs from sentencepiece -- text right after a special
    token, or starting with a space -- llama.cpp follows sentencepiece, which LLaMA was trained with.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pi_lora.demo import TEXT

    out = tmp_path / "spm.gguf"
    export.export_gguf(spm_run, out, "fp32")
    assert run.read_meta(spm_run)["original_len"] == 64  # 256 is past it
    reference = AutoTokenizer.from_pretrained(spm_base)
    check_in_llamacpp(llama_bin, out, reference, TEXT, 256, tmp_path, text=vocab.VERIFY_TEXT)
    sp = spm.SentencePieceProcessor(model_file=str(spm_base / "tokenizer.model"))
    markup = "</s>user\nHi</s>there"
    want = [1, 2, *sp.encode("user\nHi"), 2, *sp.encode("there")]  # sentencepiece on each piece
    assert llama_tokenize(llama_bin, out, markup, tmp_path) == want != reference.encode(markup)
    assert llama_tokenize(llama_bin, out, " space", tmp_path) == [1, *sp.encode(" space")] != reference.encode(" space")


@pytest.mark.slow
def test_bpe_export_with_special_tokens_tokenizes_like_transformers_in_llamacpp(llama_bin, bpe_run, bpe_base, tmp_path):
    from transformers import AutoTokenizer

    from pi_lora.demo import TEXT

    out = tmp_path / "bpe.gguf"
    export.export_gguf(bpe_run, out, "fp32", tokenizer_pre="gpt-2")
    check_in_llamacpp(llama_bin, out, AutoTokenizer.from_pretrained(bpe_base), TEXT, 256, tmp_path)


@pytest.mark.slow
def test_demo_tokenizer_export_with_no_flags_tokenizes_like_transformers_in_llamacpp(llama_bin, demo_run, tiny_base,
                                                                                     tmp_path):
    from transformers import AutoTokenizer

    from pi_lora.demo import TEXT

    out = tmp_path / "demo.gguf"
    export.export_gguf(demo_run, out, "fp32")  # no tokenizer_pre: found from the split
    reference = AutoTokenizer.from_pretrained(tiny_base)
    check_in_llamacpp(llama_bin, out, reference, TEXT, 256, tmp_path, text=vocab.VERIFY_TEXT)


@pytest.mark.slow
def test_smollm2_gguf_base_export_tokenizes_and_scores_like_the_base_in_llamacpp(
        llama_bin, smollm2, smollm2_folder, tmp_path):
    """SmolLM2 from its GGUF, 8192 -> 9216: the export tokenizes as the base GGUF does in llama.cpp, as the
    training tokenizer does in transformers (digits one by one), and scores as transformers past 8192."""
    from transformers import AutoTokenizer

    if not KJV.is_file():
        missing(str(KJV))
    book = json.loads(KJV.read_text().splitlines()[0])["text"][:90000]
    text_file = tmp_path / "genesis.txt"
    text_file.write_text(book)
    data = tmp_path / "genesis.jsonl"
    data.write_text(json.dumps({"text": book[:40000]}) + "\n")
    run_dir = tmp_path / "run"
    argv = ["train", "--base", str(smollm2_folder), "--target-len", "9216", "--data", str(data), "--output",
            str(run_dir), "--steps", "1", "--lr", "1e-3", "--batch-size", "1", "--grad-accum", "1",
            "--set", "train.warmup_steps=0", "--set", "lora.trainable=[norm]"]
    result = RUNNER.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "smol.gguf"
    # the export's logits check would run two fp32 forwards past 8192 tokens; perplexity below is stronger
    assert export.export_gguf(run_dir, out, "fp32", check=False).pre == "smollm"
    assert fields(out)["tokenizer.ggml.token_type"][:17] == [3] * 17
    reference = AutoTokenizer.from_pretrained(smollm2_folder)
    assert vocab.tokenization_error(reference, out) == (None, True)  # the export's own tokenizer check
    text = vocab.check_text(reference)
    base_ids = llama_tokenize(llama_bin, smollm2, text, tmp_path)
    assert llama_tokenize(llama_bin, out, text, tmp_path) == base_ids == reference.encode(text)
    assert len(reference.encode("<|im_start|>user")) == 2
    check_in_llamacpp(llama_bin, out, reference, text_file, 9216, tmp_path)
