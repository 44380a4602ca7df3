"""A Hugging Face tokenizer rebuilt from a GGUF file's `tokenizer.*` keys: tokenizer.json (as a `tokenizers`
object) plus the tokenizer_config facts (special tokens, BOS/EOS rules, chat template).

Two of llama.cpp's vocabularies have a tokenizer.json form that tokenizes as llama.cpp does:
- `gpt2` (byte-level BPE): tokens and merges as stored (tokenizer.json's own spelling), the pre-tokenizer of the
  file's `tokenizer.ggml.pre` type (toolkit/core/pretokenizers.py), the ByteLevel decoder;
- `llama` (SentencePiece BPE): byte-fallback BPE over '▁'-spaced text, merges recovered from the token scores as
  transformers' GGUF loader recovers them (each piece's splits into two pieces of the vocabulary, ranked by the
  piece's score: llama.cpp's SentencePiece merges the pair whose joined piece scores highest), byte pieces <0xNN>,
  the space prefix as a `Prepend` normalizer (llama.cpp prefixes a space even to text that starts with one, as
  Prepend does and Metaspace does not).
Both: CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (matched whole in text, as
llama.cpp matches them); UNUSED placeholders are left out. Other vocabularies are refused. Reads fields only.
"""
from __future__ import annotations

import json
from typing import Any

import gguf

from toolkit.core.errors import ToolkitError
from toolkit.core.pretokenizers import hf_pre_tokenizer, pre_type
from toolkit.core.tokenizer import Tokenizer

_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}
_ADDED = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value as Python: str, number, bool, or a list of them; None when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    kinds = field.types
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]][0].item()


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": kind == gguf.TokenType.CONTROL}
            for i, (t, kind) in enumerate(zip(tokens, types)) if kind in _ADDED]


def _vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    # the exporter fills ids no token has with UNUSED "[PADn]" placeholders: they are not part of the tokenizer
    return {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != gguf.TokenType.UNUSED}


def _byte_level_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> tuple[dict, bool]:
    merges = _field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise ToolkitError("the GGUF's gpt2 vocabulary has no tokenizer.ggml.merges",
                           "a byte-level BPE vocabulary needs its merges; the file is incomplete")
    pre_name = _field(reader, "tokenizer.ggml.pre") or "default"
    row = pre_type(pre_name)  # refuses a type with no tokenizer.json equivalent here, naming it
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": row.ignore_merges, "vocab": _vocab(tokens, types),
             "merges": [m.split(" ", 1) for m in merges]}
    spec = {"normalizer": None, "pre_tokenizer": hf_pre_tokenizer(pre_name),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}
    return spec, row.add_bos_default


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float], types: list[int]) -> list[list[str]]:
    """Every split of a piece into two pieces of the vocabulary, best-scored joined piece first; among one piece's
    splits, the longer left part first (transformers' `generate_merges` order). Control, byte and unknown pieces
    are never made by merging (SentencePiece does not produce them from text)."""
    mergeable = {t: i for t, i in vocab.items() if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)}
    merges = []
    for piece, i in mergeable.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in mergeable and piece[k:] in mergeable]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((scores[i], left, right) for left, right in splits)
    merges.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: ties keep the id order above
    return [[left, right] for _, left, right in merges]


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> tuple[dict, bool]:
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ToolkitError("the GGUF's llama vocabulary has no scores for its tokens",
                           "SentencePiece merges are recovered from tokenizer.ggml.scores; the file is incomplete")
    vocab = _vocab(tokens, types)
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    space_prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    space_prefix = True if space_prefix is None else bool(space_prefix)  # llama.cpp's default for this vocabulary
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, escape]}
                  if space_prefix else escape)
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
             "ignore_merges": False, "vocab": vocab, "merges": _sentencepiece_merges(vocab, scores, types)}
    spec = {"normalizer": normalizer, "pre_tokenizer": None,
            "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}
    return spec, True  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise


def _post_processor(config: dict[str, Any], ids: dict[str, int]) -> dict[str, Any] | None:
    """BOS/EOS as the file's add_bos/add_eos say, for users of the tokenizer.json alone (transformers)."""
    def special(key: str) -> list[dict]:
        token = config.get(key)
        return [{"SpecialToken": {"id": token, "type_id": 0}}] if token is not None else []

    bos = special("bos_token") if config["add_bos_token"] else []
    eos = special("eos_token") if config["add_eos_token"] else []
    if not bos and not eos:
        return None
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair = [{"Sequence": {"id": "B", "type_id": 1}}]
    specials = {config[k]: {"id": config[k], "ids": [ids[config[k]]], "tokens": [config[k]]}
                for k, on in (("bos_token", bos), ("eos_token", eos)) if on}
    return {"type": "TemplateProcessing", "single": bos + seq + eos, "pair": bos + seq + eos + bos + pair + eos,
            "special_tokens": specials}


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    """The Hugging Face tokenizer a GGUF file's tokenizer section describes (see the module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ToolkitError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)",
                           "pass --tokenizer DIR with the model's tokenizer.json")
    types = _field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if kind == "gpt2":
        spec, add_bos_default = _byte_level_bpe(reader, tokens, types)
    elif kind == "llama":
        spec, add_bos_default = _sentencepiece_bpe(reader, tokens, types)
    else:
        raise ToolkitError(f"the GGUF's tokenizer model '{kind}' cannot be rebuilt as a tokenizer.json here",
                           "supported: gpt2 (byte-level BPE) and llama (SentencePiece BPE); or pass --tokenizer DIR "
                           "with the model's tokenizer.json")
    config: dict[str, Any] = {}
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token")
    config["add_bos_token"] = add_bos_default if add_bos is None else bool(add_bos)
    config["add_eos_token"] = bool(add_eos)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    config["clean_up_tokenization_spaces"] = False
    config["tokenizer_class"] = "PreTrainedTokenizerFast"

    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
            **spec, "post_processor": _post_processor(config, {t: i for i, t in enumerate(tokens)})}
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec, ensure_ascii=False)), config)
