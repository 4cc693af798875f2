"""A tokenizer as GGUF metadata that llama.cpp tokenizes with exactly as transformers does, and back.

llama.cpp does not run a tokenizer.json: it has its own tokenizers, chosen by metadata.
`tokenizer.ggml.model` picks byte-level BPE ("gpt2") or SentencePiece ("llama"); for BPE,
`tokenizer.ggml.pre` names the split regexes run before the merges (a wrong name silently
tokenizes differently); token types mark control tokens (matched whole, never split); and
`add_bos_token`/`add_eos_token` say what is added around a text. The gguf package reads the
vocabulary files; what is ours is choosing the pre-tokenizer as llama.cpp's converter does
(by the hash of the ids a fixed text tokenizes to), the token types, and the checks.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from .errors import PiLoraError

# llama.cpp's own check text (convert_hf_to_gguf.py, get_vocab_base_pre): the sha256 of
# str(tokenizer.encode(CHKTXT)) identifies a BPE tokenizer's pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Hash -> llama.cpp pre-tokenizer name, from the table in llama.cpp's convert_hf_to_gguf.py
# (get_vocab_base_pre, generated there by convert_hf_to_gguf_update.py), for the BPE tokenizers of
# models with the LLaMA/Mistral layout this export writes. tests/test_gguf.py checks each entry
# against the converter in the llama.cpp source the tests build.
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # pixtral-12b
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # Minerva-7B
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # Seed-Coder-8B
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",  # Mellum-4b
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",  # Trillion-7B
}

# The text the export's own check tokenizes both ways (the chat markup is added per tokenizer).
VERIFY_TEXT = (
    "In the beginning God created the heaven and the earth.\n\n2 And the earth was without form, and void;\n"
    "3.14159 1,000,000 2024-12-01 0x1F 007 12345678901234567890\n"
    "Wait... what?!?! Yes!!! No??? --- === *** ((( ))) [[[ ]]] {{{ }}} \"quoted\" 'single' `tick`\n"
    "   three spaces\t\ttwo tabs \t mixed \n\n\n\n four newlines\r\n crlf  \u00a0nbsp\n"
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: print(f\"{x:>10}\")\n"
    "Größe naïve café Ærø; Привет, мир! Γειά σου; 你好，世界；こんにちは；안녕하세요; مرحبا; שלום; नमस्ते 🚀🦙✅\n"
    "I've 'RE you're we'Ve HE'LL don't"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42."}]


def pre_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def pre_name(tokenizer) -> str:
    """llama.cpp's name for this BPE tokenizer's pre-tokenizer, found as its converter finds it, else
    from the split itself where that is exactly one llama.cpp has."""
    name = PRE_BY_HASH.get(pre_hash(tokenizer)) or split_name(tokenizer)
    if name is None:
        raise PiLoraError(
            "llama.cpp does not know this BPE tokenizer (its check-text hash is not in the table), so the GGUF "
            "would tokenize differently there; give llama.cpp's pre-tokenizer name with --tokenizer-pre NAME "
            "(llama.cpp's src/llama-vocab.cpp lists them, e.g. gpt-2, llama-bpe, smollm).")
    return name


def split_name(tokenizer) -> str | None:
    """"gpt-2" for a tokenizer whose whole pre-processing is GPT-2's byte-level split, else None.

    The converter's hash names a pre-tokenizer only for vocabularies it has seen: the ids depend on the
    merges. A tokenizer trained afresh (the demo's) has a new hash, yet its split is llama.cpp's "gpt-2"
    exactly when there is no normalizer and the only pre-tokenizer is ByteLevel with GPT-2's regex and
    no prefix space. The export's own check then compares the two tokenizations.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    split = spec.get("pre_tokenizer") or {}
    gpt2 = (split.get("type") == "ByteLevel" and split.get("use_regex", True)
            and not split.get("add_prefix_space", False))
    return "gpt-2" if gpt2 and spec.get("normalizer") is None else None


def vocab_kind(folder: Path) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece, or its BPE-with-byte-fallback form)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            return "llama"
        raise PiLoraError(f"no tokenizer.json or tokenizer.model in '{folder}' to write into the GGUF.")
    spec = json.loads(path.read_text())
    model, decoder = spec.get("model", {}), (spec.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and decoder == "ByteLevel":
        return "gpt2"
    raise PiLoraError(f"GGUF export supports byte-level BPE and SentencePiece tokenizers, not the "
                      f"{model.get('type')} tokenizer in '{folder}'.")


def add_tokenizer(writer, folder: Path, n_vocab: int, pre: str | None = None, reference: Path | None = None) -> None:
    """The tokenizer.* keys: copied from `reference` (the base's own GGUF) when given, else from `folder`."""
    if reference is not None:
        from gguf import GGUFReader

        count = len(GGUFReader(reference).fields["tokenizer.ggml.tokens"].data)
        if count != n_vocab:
            raise PiLoraError(f"the base GGUF's tokenizer has {count} tokens, the model {n_vocab}.")
        copy_tokenizer(reference, writer, pre)
        return
    from gguf import SpecialVocab
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kind = vocab_kind(folder)
    if kind == "gpt2":
        tokens, types = bpe_tokens(folder, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or pre_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        if pre is not None:
            raise PiLoraError("--tokenizer-pre applies to BPE vocabularies; this one is SentencePiece.")
        tokens, scores, types = sentencepiece_tokens(folder, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")  # llama.cpp's SentencePiece tokenizer has no pre-tokenizer
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=n_vocab)
    special.add_special_token.update(adds_special(tokenizer))
    special.add_to_gguf(writer, quiet=True)


def adds_special(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer adds BOS/EOS around a text, observed rather than read from configs."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and full[:1] == [bos] and plain[:1] != [bos],
            "eos": eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]}


def added_types(folder: Path) -> dict[int, tuple[str, int]]:
    """Id -> (text, type) for tokenizer.json's added tokens: special ones control, others user-defined.

    The gguf package's readers mark as control only added tokens outside the base vocabulary,
    so SmolLM2's `<|im_start|>` (id 1, inside it) would be split by llama.cpp.
    """
    from gguf import TokenType

    path = folder / "tokenizer.json"
    added = json.loads(path.read_text()).get("added_tokens", []) if path.is_file() else []
    return {t["id"]: (t["content"], TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
            for t in added}


def padded(tokens: list, types: list, n_vocab: int, scores: list | None = None):
    """Pad to the model's vocabulary size with unused placeholders, as llama.cpp's converter does."""
    from gguf import TokenType

    if len(tokens) > n_vocab:
        raise PiLoraError(f"the tokenizer has {len(tokens)} tokens, more than the model's {n_vocab}.")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode() if tokens and isinstance(tokens[0], bytes) else f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return tokens, types


def bpe_tokens(folder: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    spec = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    extra = added_types(folder)
    size = max([*by_id, *extra]) + 1
    tokens, types = [], []
    for i in range(size):
        if i in extra:
            tokens.append(extra[i][0])
            types.append(extra[i][1])
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return padded(tokens, types, n_vocab)


def sentencepiece_tokens(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model (llama.cpp merges by these scores), then added tokens."""
    from gguf import TokenType
    from gguf.vocab import SentencePieceVocab

    if not (folder / "tokenizer.model").is_file():
        raise PiLoraError(f"'{folder}' has a SentencePiece-style tokenizer.json but no tokenizer.model; "
                          "llama.cpp needs the SentencePiece scores it holds.")
    try:
        pieces = SentencePieceVocab(folder)
    except RuntimeError as e:  # the gguf package raises this when sentencepiece is missing
        raise PiLoraError(f"a SentencePiece vocabulary needs the sentencepiece package for GGUF ({e}): "
                          "pip install sentencepiece") from e
    tokens, scores, types = (list(x) for x in zip(*pieces.all_tokens()))
    for i, (text, kind) in added_types(folder).items():  # as llama.cpp's converter marks them
        while i >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        tokens[i], types[i], scores[i] = text.encode(), kind, -1000.0
    tokens, types = padded(tokens, types, n_vocab, scores)
    return tokens, scores, types


def copy_tokenizer(reference: Path, writer, pre: str | None = None) -> None:
    """Every tokenizer.* key of the base's own GGUF, as it is there (the way llama.cpp tokenized the base)."""
    from gguf import GGUFReader, GGUFValueType

    for field in GGUFReader(reference).fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        if field.name == "tokenizer.ggml.pre" and pre is not None:
            writer.add_tokenizer_pre(pre)
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)


def reference_gguf(base_folder: Path) -> Path | None:
    """The tokenizer of the GGUF a base folder was converted from (model.gguf_folder keeps it)."""
    path = base_folder / TOKENIZER_GGUF
    return path if path.is_file() else None


TOKENIZER_GGUF = "tokenizer.gguf"  # in a folder converted from a GGUF: that GGUF's tokenizer.* keys


def save_tokenizer_keys(gguf_path: Path, folder: Path) -> None:
    from gguf import GGUFReader, GGUFWriter

    arch = GGUFReader(gguf_path).fields["general.architecture"].contents()
    writer = GGUFWriter(folder / TOKENIZER_GGUF, arch)
    copy_tokenizer(gguf_path, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def rebuilt_splits() -> frozenset[str]:
    """The BPE pre-tokenizer names transformers' GGUF reader rebuilds, found in the installed release.

    Releases before its table (5.17 and older) read every BPE GGUF with GPT-2's split, so none.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return frozenset()
    return frozenset(GGUF_PRE_TOKENIZER_SPLITS)


def split_for(pre: str | None):
    """A tokenizers pre-tokenizer doing llama.cpp's split for `pre`, where transformers' GGUF reader has none.

    transformers rebuilds some names (llama-bpe, qwen2, ...) and reads every other BPE GGUF with
    GPT-2's split; SmolLM's also splits digits one by one (llama.cpp's "smollm": \\p{N}, then GPT-2's).
    """
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "gpt-2":
        return byte_level
    if pre in rebuilt_splits():
        return "transformers"
    return None


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF describes, through transformers' GGUF reader, split as llama.cpp splits.

    Returns (tokenizer, known): known is False for a BPE pre-tokenizer neither rebuilds here.
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    fields = GGUFReader(path).fields
    model = fields["tokenizer.ggml.model"].contents()
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    add_user_defined(tokenizer, fields)
    add_special_flags(tokenizer, fields)
    if model != "gpt2":
        return tokenizer, True
    split = split_for(pre)
    if split is not None and split != "transformers":
        tokenizer.backend_tokenizer.pre_tokenizer = split
    return tokenizer, split is not None


def add_user_defined(tokenizer, fields) -> None:
    """The GGUF's user-defined tokens (added but not special, like `<think>`), which llama.cpp matches
    whole. Newer transformers releases add them when reading a GGUF; 5.17 cut them into pieces."""
    from gguf import TokenType
    from tokenizers import AddedToken

    if "tokenizer.ggml.token_type" not in fields:
        return
    types = fields["tokenizer.ggml.token_type"].contents()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    vocab, added = tokenizer.get_vocab(), tokenizer.get_added_vocab()
    missing = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
               if kind == TokenType.USER_DEFINED and t in vocab and t not in added]
    if missing:
        tokenizer.add_tokens(missing)


def add_special_flags(tokenizer, fields) -> None:
    """BOS/EOS around a text as the GGUF's add_bos_token/add_eos_token say (llama.cpp follows them).
    Newer transformers releases read them; 5.17 left a SentencePiece GGUF without its BOS."""
    for which in ("bos", "eos"):
        key = f"tokenizer.ggml.add_{which}_token"
        if key in fields and getattr(tokenizer, f"add_{which}_token", None) != bool(fields[key].contents()):
            setattr(tokenizer, f"add_{which}_token", bool(fields[key].contents()))


def warn_unknown_split(path: Path, known: bool) -> None:
    if not known:
        warnings.warn(f"'{path.name}' names a BPE pre-tokenizer that transformers does not rebuild; the model "
                      "is trained with GPT-2's split, which may tokenize some text differently from llama.cpp.",
                      stacklevel=3)


def check_text(tokenizer) -> str:
    """VERIFY_TEXT, a chat in the tokenizer's own template, and its special tokens around text."""
    text = VERIFY_TEXT + "\n"
    if getattr(tokenizer, "chat_template", None):
        try:
            text += tokenizer.apply_chat_template(CHAT, tokenize=False)
        except Exception:  # a template may demand roles or tools this chat lacks; the raw markup below stays
            pass
    return text + "".join(f"{t}user\nHi {t} there " for t in tokenizer.all_special_tokens)


def tokenization_error(reference, gguf_path: Path) -> tuple[str | None, bool]:
    """Where the GGUF's tokenizer first differs from `reference` on the check text (None: identical)."""
    candidate, known = gguf_tokenizer(gguf_path)
    if not known:  # llama.cpp's split for this name is not rebuilt here: check vocabulary and types only
        candidate.backend_tokenizer.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    text = check_text(reference)
    want, got = reference.encode(text), candidate.encode(text)
    if want == got:
        return None, known
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    around = reference.decode(want[max(0, at - 2): at + 3])
    return (f"token {at} of {len(want)} differs ({want[at:at + 3]} vs {got[at:at + 3]}, near {around!r}; "
            f"{len(want)} vs {len(got)} tokens)"), known
