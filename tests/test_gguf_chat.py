"""A GGUF's chat template end to end: the export keeps the Jinja in `tokenizer.chat_template`, its Modelfile's
TEMPLATE renders in Go as that Jinja does with the token facts the file really has, and `toolkit generate FILE.gguf
--chat` feeds llama.cpp exactly the token ids transformers' apply_chat_template gives."""
from __future__ import annotations

import re

import pytest

from exporters.gguf.chat_templates import CONVERSATIONS, read_gguf_chat
from exporters.gguf.exporter import export
from runtimes.llama_cpp import LlamaCppRuntime
from tests.conftest import SHARED_DATA, run_cli
from tests.helpers import random_weights, tiny_config
from tests.ollama_corpus import require_go
from tests.real_models import Unavailable, smollm2_gguf
from toolkit.core.bundle import ModelBundle
from toolkit.core.tokenizer import Tokenizer

TOKENIZERS = ["minimind3-tokenizer", "real-tokenizers/qwen3", "real-tokenizers/llama3-instruct"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def exported(request, tmp_path_factory):
    """A tiny random-weight llama with a real tokenizer, exported as the toolkit exports (no logit check)."""
    folder = SHARED_DATA / request.param
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    tok = Tokenizer.from_dir(folder)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=32, num_layers=1, max_position_embeddings=4096, tie_word_embeddings=True)
    bundle = ModelBundle.from_tensors(cfg, random_weights(cfg, 0), tok).check()
    out = tmp_path_factory.mktemp("chat") / "m.gguf"
    export(bundle, out, "f16", verify_file=False)
    return folder, tok, out


def _oracle_ids(hf_tokenizer, messages) -> list[int]:
    return list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def _cli_prompt_tokens(gguf_file, messages) -> int:
    system = [m["content"] for m in messages if m["role"] == "system"]
    args = ["generate", gguf_file, "--chat", "-p", messages[-1]["content"], "-n", "1"]
    proc = run_cli(*args, *(["--system", system[0]] if system else []))
    assert proc.returncode == 0, proc.stderr[-1500:]
    return int(re.search(r"prompt (\d+) tokens", proc.stderr)[1])


def test_gguf_keeps_the_jinja_and_its_modelfile_renders_it(exported):
    _, tok, out = exported
    assert read_gguf_chat(out).template == tok.chat_template  # byte for byte, as tokenizer_config has it
    modelfile = out.with_name("m.Modelfile")
    require_go()
    proc = run_cli("modelfile", "validate", modelfile)
    assert proc.returncode == 0, proc.stderr[-1500:]
    # the TEMPLATE was chosen from the tokenizer; the GGUF's own add_bos_token/special tokens agree with it
    assert "identical to m.gguf's own chat template" in proc.stderr, proc.stderr


def test_generate_chat_feeds_the_ids_apply_chat_template_gives(exported):
    from transformers import AutoTokenizer

    folder, _, out = exported
    hf = AutoTokenizer.from_pretrained(str(folder))
    rt = LlamaCppRuntime(out, ctx=256)
    for name, messages in CONVERSATIONS.items():
        ids, stops = rt.chat_ids(messages)
        assert ids == _oracle_ids(hf, messages), name
        # the stop is the token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)
        turns = hf.decode(_oracle_ids(hf, CONVERSATIONS["user, assistant, user"]))
        assert any(rt.detokenize_special(i) in turns for i in stops), (name, stops)
    single = CONVERSATIONS["system, user"]
    assert _cli_prompt_tokens(out, single) == len(_oracle_ids(hf, single))


def test_generate_chat_on_smollm2(tmp_path):
    """The real model: its GGUF's template (with its default system message) through llama.cpp, against
    transformers' tokenizer read from the same GGUF."""
    from transformers import AutoTokenizer

    try:
        gguf_file = smollm2_gguf()
    except Unavailable as e:
        pytest.skip(str(e))
    hf = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    rt = LlamaCppRuntime(gguf_file, ctx=256)
    for name, messages in CONVERSATIONS.items():
        ids, stops = rt.chat_ids(messages)
        assert ids == _oracle_ids(hf, messages), name
    assert "named SmolLM" in hf.decode(rt.chat_ids(CONVERSATIONS["user"])[0])
    assert "<|im_end|>" in [rt.detokenize_special(i) for i in rt.chat_ids(CONVERSATIONS["user"])[1]]
    assert _cli_prompt_tokens(gguf_file, CONVERSATIONS["user"]) == len(_oracle_ids(hf, CONVERSATIONS["user"]))
