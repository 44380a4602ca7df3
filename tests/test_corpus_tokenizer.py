"""The embedded corpus and the tokenizer, against transformers' tokenizer and chat-template code as the oracle."""
from __future__ import annotations

import time

import pytest
import transformers

from toolkit.app.corpus import default_corpus
from toolkit.core.tokenizer import Tokenizer


def test_default_corpus_is_sized_deterministic_and_fast():
    from toolkit.app import corpus

    corpus.default_corpus_documents.cache_clear()
    t0 = time.perf_counter()
    text = default_corpus()
    elapsed = time.perf_counter() - t0
    assert 750_000 <= len(text.encode()) <= 1_500_000
    assert elapsed < 20  # "a few seconds at most"; generous for loaded 2-core CI machines
    corpus.default_corpus_documents.cache_clear()
    assert default_corpus() == text


@pytest.mark.parametrize("era", ["minimind2-tokenizer", "minimind3-tokenizer"])
def test_minimind_tokenizers_match_transformers(era, shared_data):
    ours = Tokenizer.from_dir(shared_data / era)
    theirs = transformers.AutoTokenizer.from_pretrained(shared_data / era)
    text = (shared_data / "wikitext-2-raw-test.txt").read_text()[:200_000] + "\n你好，世界！2024年3月 🙂🚀"
    assert ours.encode(text) == theirs(text, add_special_tokens=True)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    assert ours.bos_id == 1 and ours.eos_id == 2 and not ours.add_bos
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    assert ours.render_chat(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)


def test_trained_bpe_round_trips_and_renders_chatml(tmp_path):
    tok = Tokenizer.train_bpe([default_corpus()[:200_000]], 1024)
    assert tok.vocab_size == 1024 and tok.kind == "BPE"
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text, add_special_tokens=True)["input_ids"] == tok.encode(text)
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.render_chat(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(msgs) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
