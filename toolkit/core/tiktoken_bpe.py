"""tiktoken BPE files (`<base64 token bytes> <rank>` per line) as Hugging Face tokenizers, without tiktoken.

NanoChat saves its tokenizer as a pickled `tiktoken.Encoding`, which cannot be read safely (unpickling runs code);
its mergeable ranks, written out as a tiktoken BPE file, can. tiktoken encodes a pre-token by repeatedly merging the
adjacent pair whose concatenation has the lowest rank, after first looking the whole piece up. The same tokenizer in
Hugging Face terms: a byte-level BPE whose merges are listed in the rank order of the token they produce (each
token's merge is found by running that BPE on its own bytes with the lower ranks only) and `ignore_merges` (the
whole-piece lookup).
"""
from __future__ import annotations

import base64
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from toolkit.core.errors import ToolkitError
from toolkit.core.tokenizer import Tokenizer

# nanochat/tokenizer.py: GPT-4's split pattern with \p{N}{1,2} (Oniguruma, which `tokenizers` uses, has the
# possessive quantifiers)
NANOCHAT_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                  r"""\s*[\r\n]|\s+(?!\S)|\s+""")
# nanochat's special tokens take the ids right after the mergeable ranks, in this order
NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
NANOCHAT_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' }}"
    "{%- else %}{{- '<|user_start|>' + message['content'] + '<|user_end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant_start|>' }}{%- endif %}"
)
PICKLE_HINT = ("NanoChat's tokenizer.pkl is a pickle and is never unpickled here (that would run code). In the "
               "environment that trained the model, write its ranks as a tiktoken BPE file: python -c \"import "
               "pickle, base64; e = pickle.load(open('tokenizer.pkl', 'rb')); open('tokenizer.tiktoken', 'w')"
               ".writelines(f'{base64.b64encode(t).decode()} {r}\\n' for t, r in e._mergeable_ranks.items())\" "
               "and pass --tokenizer tokenizer.tiktoken (or a folder with a Hugging Face tokenizer.json)")


def read_ranks(file: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(Path(file).read_text(encoding="ascii").splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ToolkitError(f"cannot read tiktoken BPE file {file}: {e}",
                           "expected one '<base64 token> <rank>' pair per line") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ToolkitError(f"{file}: ranks are not 0..{len(ranks) - 1} without gaps",
                           "is it a tiktoken BPE file (mergeable ranks)?")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ToolkitError(f"{file}: {len(missing)} single bytes have no token, so some text cannot be encoded",
                           "a byte-level BPE file lists all 256 bytes")
    return ranks


def _split(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge loop on `token`, using only ranks lower than `below`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer(ranks: dict[bytes, int], pattern: str, specials: list[str]) -> HFTokenizer:
    chars = _byte_chars()
    text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = _split(tok, ranks, rank)
        if len(parts) != 2:
            raise ToolkitError(f"token {tok!r} (rank {rank}) cannot be built from two lower-ranked tokens",
                               "the file is not a consistent BPE ranking")
        merges.append((text(parts[0]), text(parts[1])))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)  # ids len(ranks), len(ranks) + 1, ... in this order
    return tok


def nanochat_tokenizer(file: Path) -> Tokenizer:
    """A NanoChat tokenizer from its tiktoken BPE file: nanochat's split pattern and special tokens."""
    ranks = read_ranks(file)
    tok = hf_tokenizer(ranks, NANOCHAT_SPLIT, NANOCHAT_SPECIALS)
    config = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "add_bos_token": True,
              "chat_template": NANOCHAT_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    return Tokenizer(tok, config)
