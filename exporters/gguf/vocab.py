"""The GGUF tokenizer section, derived from tokenizer.json (never from a table of known hashes).

Byte-level BPE becomes llama.cpp's `gpt2` model; the pre-tokenizer type is read from the pre-tokenizer's own
regexes (toolkit/core/pretokenizers.py: GPT-2's regex is `gpt-2`, Qwen's `qwen2`, Llama-3's `llama-bpe`, SmolLM's
digits + GPT-2 `smollm`, ...). Byte-fallback BPE with spaces as '▁' (SentencePiece converted to tokenizer.json:
Llama 2, Mistral, TinyLlama) becomes llama.cpp's `llama` model with scores, byte pieces and the space-prefix flag.
What llama.cpp cannot reproduce is refused.
"""
from __future__ import annotations

import json
import re
from typing import Any

import gguf

from toolkit.core.errors import ToolkitError
from toolkit.core.pretokenizers import llama_cpp_pre_type
from toolkit.core.tokenizer import Tokenizer

# end-of-turn markers of the chat formats llama.cpp knows, in the order it looks for them: Llama-3, ChatML, Phi-3,
# Gemma. Written explicitly: llama.cpp's own search by text takes whichever its hash map yields first (in a Qwen
# vocabulary <|endoftext|> may win over <|im_end|>)
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The parts of a tokenizer.json pipeline stage: a Sequence's list under `key`, else the stage itself."""
    if node is None:
        return []
    return node.get(key, []) if node.get("type") == "Sequence" else [node]


def _spm_space_prefix(spec: dict[str, Any], warnings: list[str]) -> bool:
    """Whether a byte-fallback BPE tokenizer (SentencePiece converted to tokenizer.json, Llama/Mistral style)
    prefixes text with '▁': by a Prepend normalizer (legacy) or a Metaspace pre-tokenizer. Refuses what llama.cpp's
    `llama` vocabulary (spaces as '▁', optional prefix, nothing else) cannot reproduce."""
    prefix = False
    for n in _steps(spec.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            prefix = True
        elif not (n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " "
                  and n.get("content") == "\u2581"):
            raise ToolkitError(f"normalizer {json.dumps(n)[:100]} has no llama.cpp equivalent",
                               "SentencePiece-style tokenizers may only map spaces to '▁' and prepend one")
    for p in _steps(spec.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace" and p.get("replacement") == "\u2581" and not p.get("split", False):
            scheme = p.get("prepend_scheme", "always")
            prefix = prefix or scheme in ("always", "first")
            if scheme != "never":
                # measured: HF's Metaspace adds no '▁' to text that already starts with a space; llama.cpp always
                # adds one (and, unlike "first", also after special tokens)
                warnings.append("the tokenizer's Metaspace prefix differs from llama.cpp's for text that starts "
                                "with a space (llama.cpp adds one more '▁') or follows a special token")
        else:
            raise ToolkitError(f"pre-tokenizer {json.dumps(p)[:100]} has no llama.cpp equivalent",
                               "SentencePiece-style tokenizers may only use a non-splitting Metaspace")
    return prefix


def _merge_scores(merges: list[str], vocab: dict[str, int]) -> dict[int, float]:
    """llama.cpp's `llama` (SentencePiece) tokenizer merges the adjacent pair whose joined piece has the highest
    score; BPE applies merges by rank. A piece scored minus the rank of the first merge that makes it gives the
    same order (checked against the Hugging Face tokenizer on real text in the tests)."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        token = vocab.get(left + right)
        if token is not None and token not in scores:
            scores[token] = -float(rank)
    return scores


def _is_byte_fallback_bpe(spec: dict[str, Any]) -> bool:
    steps = _steps(spec.get("decoder"), "decoders")
    return (spec["model"].get("type") == "BPE" and bool(spec["model"].get("byte_fallback"))
            and any(d.get("type") == "ByteFallback" for d in steps))


def _token_list(tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int, classify) -> tuple[list, list]:
    """Tokens in id order (holes as unused [PADn]) and their types; added tokens are control (special) or
    user-defined, the rest as `classify(id, text)` says."""
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(classify(i, by_id[i]))
    return tokens, types


def _merges(model: dict[str, Any]) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]


def _add_spm_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int
                   ) -> list[str]:
    model = spec["model"]
    warnings: list[str] = []
    prefix = _spm_space_prefix(spec, warnings)
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    merged = _merge_scores(_merges(model), vocab)
    unk = vocab.get(model.get("unk_token") or "")

    def classify(i: int, text: str) -> gguf.TokenType:
        if i == unk:
            return gguf.TokenType.UNKNOWN
        return gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", text) else gguf.TokenType.NORMAL

    tokens, types = _token_list(tokenizer, spec, vocab_size, classify)
    # pieces no merge makes are never chosen by BPE: the lowest score keeps llama.cpp from preferring them
    scores = [merged.get(i, 0.0 if len(t) == 1 or types[i] != gguf.TokenType.NORMAL else -1e9)
              for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)
    if unk is not None:
        writer.add_unk_token_id(unk)
    return warnings


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """Write the tokenizer section; returns warnings about what llama.cpp tokenizes differently."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if _is_byte_fallback_bpe(spec):
        warnings = _add_spm_vocab(writer, tokenizer, spec, vocab_size)
        _add_special_ids(writer, tokenizer, spec)
        return warnings
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ToolkitError(f"tokenizer model {model.get('type')} with {spec.get('decoder', {}).get('type')} "
                           "decoder cannot be written to GGUF yet", "byte-level BPE and byte-fallback "
                                                                    "(SentencePiece-style) BPE tokenizers are "
                                                                    "supported")
    merges = _merges(model)
    if not merges:
        raise ToolkitError("tokenizer.json has no merges", "llama.cpp's gpt2 vocabulary needs the BPE merges")
    warnings = _byte_level_normalizer_warnings(spec.get("normalizer"))
    pre = llama_cpp_pre_type(spec.get("pre_tokenizer"), ignore_merges=bool(model.get("ignore_merges", False)))
    tokens, types = _token_list(tokenizer, spec, vocab_size, lambda i, t: gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer, spec)
    return warnings


def _byte_level_normalizer_warnings(normalizer: dict[str, Any] | None) -> list[str]:
    """llama.cpp's byte-level BPE normalizes nothing. NFC (Qwen, GPT-NeoX) leaves text that is already NFC (nearly
    all real text) as it is: written with a warning. Any other normalizer changes ordinary text: refused."""
    steps = _steps(normalizer, "normalizers")
    if all(n.get("type") == "NFC" for n in steps):
        return ["the tokenizer normalizes text to NFC and llama.cpp does not: text not already in NFC (decomposed "
                "accents) tokenizes differently in llama.cpp"] if steps else []
    bad = next(n for n in steps if n.get("type") != "NFC")
    raise ToolkitError(f"normalizer {json.dumps(bad)[:100]} has no llama.cpp equivalent",
                       "llama.cpp's byte-level BPE (gpt2 vocabulary) normalizes nothing (NFC is tolerated)")


def _added_ids(spec: dict[str, Any]) -> dict[str, int]:
    return {a["content"]: a["id"] for a in spec.get("added_tokens", [])}


def _end_of_turn_id(spec: dict[str, Any]) -> int | None:
    """The chat format's end-of-turn token: the first known marker that the tokenizer has as an added token (a word
    BPE learned from text is never one)."""
    added = _added_ids(spec)
    return next((added[m] for m in END_OF_TURN_MARKERS if m in added), None)


def _add_special_ids(writer: gguf.GGUFWriter, tokenizer: Tokenizer, spec: dict[str, Any]) -> None:
    # llama.cpp defaults a gpt2 vocabulary's BOS/EOS to token 11 when absent: always write them
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    eot = _end_of_turn_id(spec)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(bool(tokenizer.config.get("add_eos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
