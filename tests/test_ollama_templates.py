"""Ollama TEMPLATEs proven with Go's own text/template (exporters/gguf/ollama_render.go, built offline from the
standard library) against transformers' rendering of real chat templates: llama.cpp's 70 test templates, SmolLM2's
GGUF and the real tokenizers of ../shared/data."""
from __future__ import annotations

import re
from datetime import date

import pytest

from exporters.gguf import ollama_go
from exporters.gguf.chat_templates import CONVERSATIONS, JinjaError, TokenFacts
from exporters.gguf.ollama_templates import (
    DEFAULT,
    OLLAMA_THINK,
    THINK_OFF,
    THINK_ON,
    all_candidates,
    choose,
    expected_prompts,
)
from exporters.gguf.template_text import DATE_FORMATS, DATE_PRELUDE, Dated
from tests.ollama_corpus import ROOT, all_templates, require_go

# the families the real templates of small models must get (the list), by template name
EXPECTED_FAMILIES = {
    "Qwen-Qwen2.5-7B-Instruct": "chatml", "SmolLM2-135M-Instruct": "chatml", "Qwen-Qwen3-0.6B": "qwen3",
    "qwen3": "qwen3", "HuggingFaceTB-SmolLM3-3B": "qwen3", "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3", "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "llama3-instruct": "llama3", "microsoft-Phi-3.5-mini-instruct": "phi3", "google-gemma-2-2b-it": "gemma",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "ibm-granite-granite-3.3-2B-Instruct": "granite",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "deepseek-r1",
}
# Llama 2 Chat's template as Meta published it in its tokenizer_config.json (no Llama 2 is among llama.cpp's test
# templates): the system text in <<SYS>> on the first user turn, BOS before every [INST]
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# beyond the four plain conversations, what the Python renderings must also get right: Ollama merges consecutive
# messages of one role, a system message may be empty or come late, a chat may end on the assistant (prefill) and
# carry earlier thinking
EXTRA = {
    "two users in a row": [{"role": "user", "content": "One."}, {"role": "user", "content": "Two."}],
    "empty system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}],
    "late system": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    "ends on assistant": [{"role": "user", "content": "Hi."},
                          {"role": "assistant", "content": "Hello.", "thinking": "greet back"}],
}


@pytest.fixture(scope="module")
def real():
    found, missing = all_templates()
    if not found:
        pytest.skip("no real chat template could be had: " + "; ".join(missing))
    return found


@pytest.fixture(scope="module")
def go():
    require_go()


@pytest.fixture(scope="module")
def choices(real):
    return {rt.name: (rt, choose(rt.jinja, rt.facts)) for rt in real}


def test_chosen_templates_render_in_go_exactly_as_the_jinja(real, go, choices):
    """Go's text/template with Ollama's data model, on every conversation and think state, byte for byte."""
    jobs, keys = [], []
    for name, (rt, choice) in choices.items():
        if choice.candidate is None:
            continue
        exp, _, _ = expected_prompts(rt.jinja, rt.facts)
        compared = [ch for ch in choice.checks if ch.status == "match"]
        jobs.append((choice.candidate.template, [ollama_go.Case(CONVERSATIONS[ch.conversation],
                                                                choice.candidate.system or "",
                                                                OLLAMA_THINK[ch.state]) for ch in compared]))
        keys.append((name, choice.candidate, [exp[ch.conversation, ch.state] for ch in compared], compared))
    results = ollama_go.render(jobs)
    for (name, cand, wants, compared), got in zip(keys, results):
        assert got.parse_error is None, (name, got.parse_error)
        assert got.thinking == cand.thinking, name  # Ollama offers thinking exactly when the family says it does
        for ch, want, prompt, error in zip(compared, wants, got.prompts, got.errors):
            assert error is None, (name, ch.conversation, ch.state, error)
            assert prompt == want, (name, ch.conversation, ch.state)
    matched = [name for name, (_, c) in choices.items() if c.candidate is not None]
    assert len(matched) >= 12, matched


def test_small_models_get_their_family(choices):
    got = {name: (c.candidate.family if c.candidate else None) for name, (_, c) in choices.items()
           if name in EXPECTED_FAMILIES}
    missing = set(EXPECTED_FAMILIES) - set(got)
    assert not missing - {"qwen3", "llama3-instruct"}, f"templates not found: {missing}"  # ../shared may be absent
    assert got == {k: v for k, v in EXPECTED_FAMILIES.items() if k in got}


def test_every_conversation_is_compared(choices):
    """A match is never vacuous: all four plain conversations render in Go and Jinja alike, except where the Jinja
    itself refuses one (Gemma 2 has no system role)."""
    for name, (_, choice) in choices.items():
        if choice.candidate is None:
            continue
        default = {ch.conversation: ch.status for ch in choice.checks if ch.state == DEFAULT}
        assert set(default) == set(CONVERSATIONS), name
        assert all(s == "match" or (s == "jinja raises" and "system" in conv) for conv, s in default.items()), name
        if choice.switch:  # think off is a state Ollama sends to any model: it must match too
            assert all(ch.status in ("match", "jinja raises") for ch in choice.checks if ch.state == THINK_OFF), name


def test_python_renderings_equal_go_for_every_candidate(real, go):
    """Templates are chosen without Go, by a Python rendering of each family's TEMPLATE: for every candidate of
    every real template, on the plain conversations and harder ones, it must be what Go renders."""
    conversations = {**CONVERSATIONS, **EXTRA}
    jobs, keys = [], []
    for rt in real:
        exp, switch, leads = expected_prompts(rt.jinja, rt.facts)
        if isinstance(exp["user", DEFAULT], JinjaError):
            continue
        for cand in all_candidates(exp, switch, leads):
            cases = [(c, s) for c in conversations for s in (DEFAULT, THINK_OFF, THINK_ON)
                     if s != THINK_ON or cand.thinking]
            jobs.append((cand.template, [ollama_go.Case(conversations[c], cand.system or "", OLLAMA_THINK[s])
                                         for c, s in cases]))
            keys.append((rt.name, cand, cases))
    assert len(jobs) >= 40
    for (name, cand, cases), got in zip(keys, ollama_go.render(jobs)):
        assert got.parse_error is None and got.thinking == cand.thinking, (name, cand.family, got.parse_error)
        for (conv, state), prompt, error in zip(cases, got.prompts, got.errors):
            assert error is None, (name, cand.family, conv, state, error)
            assert prompt == cand.render(conversations[conv], state), (name, cand.family, conv, state)


def test_unmatched_templates_say_why(choices):
    for name, (_, choice) in choices.items():
        if choice.candidate is None:
            assert choice.reason and len(choice.reason) > 20, name


def test_docs_table_is_what_the_code_chooses(choices):
    """docs/OLLAMA_TEMPLATES.md (written by bench/ollama_templates.py) lists every template with its family."""
    doc = (ROOT / "docs" / "OLLAMA_TEMPLATES.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]* \| ([\w.-]+) \|", doc, flags=re.M))
    for name, (_, choice) in choices.items():
        assert rows.get(name) == (choice.candidate.family if choice.candidate else "none"), name


def test_llama2_chat_gets_the_llama2_form_of_the_inst_family(go):
    facts = TokenFacts({"bos_token": "<s>", "eos_token": "</s>"}, add_bos=True)
    choice = choose(LLAMA2_CHAT, facts)
    assert choice.candidate is not None and choice.candidate.family == "llama2", choice.reason
    exp, _, _ = expected_prompts(LLAMA2_CHAT, facts)
    got = ollama_go.render([(choice.candidate.template,
                             [ollama_go.Case(CONVERSATIONS[c]) for c in CONVERSATIONS])])[0]
    assert got.prompts == [exp[c, DEFAULT] for c in CONVERSATIONS]
    assert got.prompts[1] == "[INST] <<SYS>>\nYou answer in one short sentence.\n<</SYS>>\n\nName three primary " \
                             "colours. [/INST]"  # no <s>: llama.cpp adds the BOS


def test_dates_render_in_go_as_strftime_does_every_month(go):
    """The date a template prints (Llama 3.2, Granite) comes from Ollama's currentDate, YYYY-MM-DD: every month's
    name must come out as Python's strftime_now writes it. Here currentDate is replaced by fixed days."""
    days = [date(2026, month, 1 + (7 * month) % 28) for month in range(1, 13)]
    text = Dated(tuple(p for fmt in DATE_FORMATS for p in ((fmt,), " | "))).go()
    jobs = [(DATE_PRELUDE.replace("currentDate", f'"{d.isoformat()}"') + "{{ range .Messages }}{{ end }}" + text,
             [ollama_go.Case([{"role": "user", "content": "x"}])]) for d in days]
    for d, got in zip(days, ollama_go.render(jobs)):
        assert got.prompts[0] == "".join(d.strftime(fmt) + " | " for fmt in DATE_FORMATS), d


def test_modelfile_quoting_keeps_every_template_byte_for_byte(choices):
    """What the Modelfile says is what Ollama's parser reads back: TEMPLATE and SYSTEM survive the quoting."""
    from exporters.gguf.modelfile import modelfile_text, parse

    for name, (rt, choice) in choices.items():
        text, warning = modelfile_text("m.gguf", choice, rt.facts.eos, 4096)
        got = {ins.command: ins.args for ins in parse(text)}
        if choice.candidate is None:
            assert "template" not in got and warning and f"# No TEMPLATE: {choice.reason}." in text, name
        else:
            assert got["template"] == choice.candidate.template and warning is None, name
            assert got.get("system") == choice.candidate.system, name
