"""The GGUF tokenizer section, derived from tokenizer.json (never from a table of known hashes).

Byte-level BPE becomes llama.cpp's `gpt2` model; the pre-tokenizer type is read from the pre-tokenizer spec: the
GPT-2 split regex (HF `ByteLevel(use_regex=True)`) is `gpt-2`. What llama.cpp cannot reproduce is refused.
"""
from __future__ import annotations

import json
from typing import Any

import gguf

from toolkit.errors import ToolkitError
from toolkit.tokenizer import Tokenizer


def _pre_type(spec: dict[str, Any] | None) -> str:
    if spec is None:
        raise ToolkitError("tokenizer has no pre-tokenizer", "llama.cpp's gpt2 vocabulary needs a byte-level one")
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if len(parts) == 1:
            return _pre_type(parts[0])
        raise ToolkitError("tokenizer's pre-tokenizer sequence has no llama.cpp equivalent",
                           "only byte-level BPE with the GPT-2 regex is supported for now")
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
        return "gpt-2"
    raise ToolkitError(f"pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp equivalent",
                       "only byte-level BPE with the GPT-2 regex is supported for now")


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ToolkitError(f"tokenizer model {model.get('type')} with {spec.get('decoder', {}).get('type')} "
                           "decoder cannot be written to GGUF yet", "byte-level BPE tokenizers are supported")
    merges = model.get("merges") or []
    if not merges:
        raise ToolkitError("tokenizer.json has no merges", "llama.cpp's gpt2 vocabulary needs the BPE merges")
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    pre = _pre_type(spec.get("pre_tokenizer"))
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
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # llama.cpp defaults a gpt2 vocabulary's BOS/EOS to token 11 when absent: always write them
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    eot = tokenizer.tok.token_to_id("<|im_end|>")
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(bool(tokenizer.config.get("add_eos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
