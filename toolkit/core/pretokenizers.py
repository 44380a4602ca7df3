"""llama.cpp's byte-level BPE pre-tokenizer types as data, both ways: tokenizer.json `pre_tokenizer` -> the
`tokenizer.ggml.pre` name that splits text identically, and name -> a tokenizer.json `pre_tokenizer` that does.

A byte-level BPE tokenizer first cuts text into pieces, then merges bytes inside each piece. llama.cpp knows a fixed
set of cuttings, each a list of regexes applied one after the other, every match kept as its own piece (what
tokenizers calls a `Split` with behavior `Isolated`), chosen by the name in `tokenizer.ggml.pre`. Each type also
fixes whether a piece found whole in the vocabulary skips the merges (`ignore_merges`) and whether BOS is added
when the file does not say. The type is read from the regexes of the tokenizer.json itself (never from hashes of
vocabularies); what no type cuts the same way is refused, naming the step.

The regexes below are the tokenizer.json originals (llama.cpp rewrites `(?i:'s|...)` as `(?:'[sS]|...)`, the same
split). Every row is proven in tests/test_gguf_tokenizers.py: llama.cpp's own test vectors where the sdist has the
vocabulary, and llama.cpp vs tokenizers on one trained vocabulary per row.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from toolkit.core.errors import ToolkitError

# what tokenizers' ByteLevel(use_regex=True) splits by (GPT-2's regex)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen1.5 - Qwen3: one digit per piece
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# Llama-3.x (and tiktoken's cl100k): up to three digits per piece
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# Qwen3.5: combining marks stay with their letters
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM / Coder: a cascade of regexes (letters of the Latin, Greek, Cyrillic... blocks; ASCII and full-width
# punctuation; CJK and Hangul runs)
# (\u escapes: these classes hold compatibility characters, e.g. U+1F7D, that a normalizing editor would change)
DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")
DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"

# llama.cpp spells the case-insensitive contractions out; both spellings split identically
_CONTRACTIONS = {r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    # trim_offsets changes offsets only, never ids: as the real files have it (GPT-2 True, Qwen False)
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": use_regex, "use_regex": use_regex}


def _sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


@dataclass(frozen=True)
class PreType:
    """One llama.cpp pre-tokenizer type: the tokenizer.json pre_tokenizer that cuts text as the type's regexes do,
    and the merge/BOS facts llama.cpp ties to the type."""
    name: str
    hf: dict[str, Any]
    ignore_merges: bool = False
    add_bos_default: bool = False  # llama.cpp's BOS rule when the file has no tokenizer.ggml.add_bos_token
    aliases: tuple[str, ...] = ()  # other names llama.cpp gives the same cutting, merging and BOS default

    @property
    def regexes(self) -> tuple[str, ...]:
        """The regexes llama.cpp cuts text by for this type, in order, before the byte-level mapping."""
        return splitting_regexes(self.hf)


PRE_TYPES: tuple[PreType, ...] = (
    PreType("gpt-2", _byte_level(use_regex=True),
            aliases=("mpt", "olmo", "jais", "trillion", "granite-docling", "phi-2", "jina-es", "jina-de",
                     "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4")),
    # SmolLM/SmolLM2, StarCoder(2), Refact, Command-R: every digit its own piece, then GPT-2's regex
    PreType("smollm", _sequence({"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)),
            aliases=("starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")),
    PreType("qwen2", _sequence(_split(QWEN2_REGEX), _byte_level(use_regex=False)),
            aliases=("stablelm2", "hunyuan", "solar-open", "grok-2", "deepseek-r1-qwen", "kormo", "f2llmv2",
                     "megrez")),
    PreType("qwen35", _sequence(_split(QWEN35_REGEX), _byte_level(use_regex=False))),
    # Llama-3.x: a word found whole in the vocabulary is taken as it is (tokenizer.json's ignore_merges)
    PreType("llama-bpe", _sequence(_split(LLAMA3_REGEX), _byte_level(use_regex=False)),
            ignore_merges=True, add_bos_default=True,
            aliases=("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")),
    # the same regex with every merge applied (DBRX, Smaug)
    PreType("dbrx", _sequence(_split(LLAMA3_REGEX), _byte_level(use_regex=False)),
            aliases=("smaug-bpe",)),
    PreType("deepseek-llm", _sequence(_split(r"[\r\n]"), _split(DEEPSEEK_LETTERS), _split(DEEPSEEK_PUNCT),
                                      _split(r"\s+$"), _split(CJK_HANGUL),
                                      {"type": "Digits", "individual_digits": False}, _byte_level(use_regex=False))),
    PreType("deepseek-coder", _sequence(_split(r"[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
                                        _split(CJK_HANGUL), {"type": "Digits", "individual_digits": True},
                                        _byte_level(use_regex=False))),
)
_BY_NAME = {n: t for t in PRE_TYPES for n in (t.name, *t.aliases)}


def _canonical(regex: str) -> str:
    """One spelling per split: control characters as escapes, contractions as tokenizer.json writes them."""
    regex = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t").replace(r"\p{N}{1}", r"\p{N}")
    for spelled, canonical in _CONTRACTIONS.items():
        regex = regex.replace(spelled, canonical)
    return regex


def _describe(step: dict[str, Any]) -> str:
    return json.dumps(step, ensure_ascii=False)[:160]


def _flatten(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if spec is None:
        raise ToolkitError("the tokenizer has no pre-tokenizer", "llama.cpp's byte-level BPE (gpt2 vocabulary) needs "
                                                                 "a byte-level one (ByteLevel, possibly after Split "
                                                                 "and Digits steps)")
    if spec.get("type") == "Sequence":
        return [s for part in spec.get("pretokenizers", []) for s in _flatten(part)]
    return [spec]


def splitting_regexes(spec: dict[str, Any] | None) -> tuple[str, ...]:
    """The regexes a byte-level pre-tokenizer cuts text by, in order, as llama.cpp would apply them; refuses a step
    llama.cpp's byte-level BPE cannot run."""
    steps = _flatten(spec)
    regexes: list[str] = []
    for i, step in enumerate(steps):
        kind = step.get("type")
        if kind == "ByteLevel":
            if i != len(steps) - 1:
                raise ToolkitError(f"pre-tokenizer step {_describe(steps[i + 1])} runs after ByteLevel",
                                   "llama.cpp maps text to bytes last: only Split/Digits steps may precede "
                                   "ByteLevel, nothing may follow it")
            if step.get("add_prefix_space", False):
                raise ToolkitError(f"pre-tokenizer step {_describe(step)} adds a space before the text",
                                   "llama.cpp's byte-level BPE never adds one: set add_prefix_space to false if the "
                                   "model was trained so, otherwise it cannot be written to GGUF")
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        elif kind == "Split":
            pattern = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert", False):
                raise ToolkitError(f"pre-tokenizer step {_describe(step)} is not an isolating split",
                                   "llama.cpp keeps every regex match as its own piece (behavior Isolated, "
                                   "invert false); other split behaviors cannot be written to GGUF")
            if "Regex" in pattern:
                regexes.append(_canonical(pattern["Regex"]))
            else:  # a literal string splits as its escaped regex would
                regexes.append("".join("\\" + c if not c.isalnum() else c for c in pattern.get("String", "")))
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits", False) else r"\p{N}+")
        else:
            raise ToolkitError(f"pre-tokenizer step {kind} ({_describe(step)}) has no llama.cpp equivalent",
                               "llama.cpp's byte-level BPE splits text by regexes only (Split, Digits, ByteLevel)")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise ToolkitError(f"pre-tokenizer {_describe(spec)} does not end in ByteLevel",
                           "llama.cpp's gpt2 vocabulary is byte-level BPE: the last step must be ByteLevel")
    return tuple(regexes)


def llama_cpp_pre_type(pre_tokenizer_spec: dict[str, Any] | None, ignore_merges: bool = False) -> str:
    """The `tokenizer.ggml.pre` value under which llama.cpp splits (and merges) text as this tokenizer.json
    pre_tokenizer does; `ignore_merges` is the BPE model's flag of that name. Refuses, naming the step, what no
    llama.cpp type reproduces."""
    regexes = splitting_regexes(pre_tokenizer_spec)
    same_split = [t for t in PRE_TYPES if t.regexes == regexes]
    for pre_type in same_split:
        if pre_type.ignore_merges == bool(ignore_merges):
            return pre_type.name
    if same_split:
        names = ", ".join(t.name for t in same_split)
        differs = ("merges even words found whole in the vocabulary" if ignore_merges
                   else "takes words found whole in the vocabulary as they are, without merging")
        raise ToolkitError(f"llama.cpp's pre-tokenizer {names} splits text as this tokenizer does, but {differs} "
                           f"(the tokenizer's BPE ignore_merges is {str(bool(ignore_merges)).lower()})",
                           "no llama.cpp type tokenizes this vocabulary identically")
    # name the first step that no type with the same steps before it has
    steps = _flatten(pre_tokenizer_spec)
    best = max(PRE_TYPES, key=lambda t: _common_prefix(t.regexes, regexes))
    at = _common_prefix(best.regexes, regexes)
    culprit = regexes[at] if at < len(regexes) else "(nothing: a split step is missing)"
    raise ToolkitError(f"no llama.cpp pre-tokenizer type splits text as this tokenizer does: split regex "
                       f"{json.dumps(culprit, ensure_ascii=False)[:160]} (step {min(at + 1, len(steps))} of "
                       f"{len(steps)}; closest type: {best.name})",
                       "supported byte-level pre-tokenizers: " + ", ".join(t.name for t in PRE_TYPES))


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pre_type(name: str) -> PreType:
    """The table row of a llama.cpp pre-tokenizer name (or one of its aliases)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ToolkitError(f"llama.cpp pre-tokenizer type '{name}' has no tokenizer.json equivalent here",
                           "supported: " + ", ".join(sorted(_BY_NAME))) from None


def hf_pre_tokenizer(pre_type_name: str) -> dict[str, Any]:
    """The tokenizer.json `pre_tokenizer` that splits text as llama.cpp's pre type does (a fresh copy)."""
    return copy.deepcopy(pre_type(pre_type_name).hf)
