"""A model's own chat template (the Jinja in tokenizer_config.json / a GGUF's `tokenizer.chat_template`), rendered
exactly as transformers' `apply_chat_template` renders it: transformers' environment, reproduced without importing
transformers (toolkit/core/chat_render.py, held byte-identical to it by a test), the named special tokens as template
variables, and add_generation_prompt=True. The fixed conversations on which Ollama TEMPLATEs are chosen and proven live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The conversations a TEMPLATE must render exactly as the Jinja does: user only; system + user; multi-turn; and
# multi-turn with a system message. Plain ASCII without edge whitespace, each text distinct.
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user": [{"role": "user", "content": "Name three primary colours."}],
    "system, user": [{"role": "system", "content": "You answer in one short sentence."},
                     {"role": "user", "content": "Name three primary colours."}],
    "user, assistant, user": [{"role": "user", "content": "Hi there."},
                              {"role": "assistant", "content": "Hello! How can I help you today?"},
                              {"role": "user", "content": "What is the capital of France?"}],
    "system, user, assistant, user": [{"role": "system", "content": "You answer in one short sentence."},
                                      {"role": "user", "content": "Hi there."},
                                      {"role": "assistant", "content": "Hello! How can I help you today?"},
                                      {"role": "user", "content": "What is the capital of France?"}],
}
# The variable a template reads to switch reasoning on or off (Qwen3, SmolLM3, DeepSeek: enable_thinking; IBM
# Granite: thinking; MiniMind-3: open_thinking), in the order they are looked for.
THINK_SWITCHES = ("enable_thinking", "thinking", "open_thinking")
# the named special tokens transformers passes to every template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class JinjaError(Exception):
    """The chat template itself refused to render (raise_exception, a missing variable, a type error)."""


def render(template: str, messages: list[dict], special: dict[str, str], switch: str | None = None,
           think: bool | None = None) -> str:
    """The prompt transformers' apply_chat_template(messages, add_generation_prompt=True) renders. `special` holds
    the tokenizer's named special tokens; `think` sets the template's thinking switch (None: left undefined)."""
    from toolkit.core.chat_render import TemplateError
    from toolkit.core.chat_render import render as render_template

    kwargs = {k: v for k, v in special.items() if v is not None}
    if switch is not None and think is not None:
        kwargs[switch] = think
    try:
        return render_template(template, messages, add_generation_prompt=True, **kwargs)
    except TemplateError as e:
        raise JinjaError(str(e)) from None


@lru_cache(maxsize=64)
def think_switch(template: str) -> str | None:
    """The thinking variable the template reads but never sets itself, if any."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        names = meta.find_undeclared_variables(ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
                                               .parse(template))
    except jinja2.TemplateSyntaxError:
        return None
    return next((n for n in THINK_SWITCHES if n in names), None)


@dataclass(frozen=True)
class TokenFacts:
    """What the chat template and llama.cpp know about a model's tokens."""
    special: dict  # named special tokens as apply_chat_template passes them (bos_token, eos_token, ...)
    add_bos: bool  # llama.cpp (and so Ollama) puts BOS in front of every prompt it tokenizes

    @property
    def bos(self) -> str | None:
        return self.special.get("bos_token")

    @property
    def eos(self) -> str | None:
        return self.special.get("eos_token")

    @classmethod
    def of_tokenizer(cls, tokenizer) -> "TokenFacts":
        special = {}
        for name in SPECIAL_NAMES:
            value = tokenizer.config.get(name)
            if isinstance(value, dict):  # {"content": ...} form of older tokenizer_config files
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(special, tokenizer.add_bos)


@dataclass(frozen=True)
class GGUFChat:
    """A GGUF's chat template with its token facts, read from the file's metadata."""
    template: str | None
    facts: TokenFacts


GGUF_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                    "unk_token": "tokenizer.ggml.unknown_token_id", "sep_token": "tokenizer.ggml.seperator_token_id",
                    "pad_token": "tokenizer.ggml.padding_token_id", "cls_token": "tokenizer.ggml.cls_token_id",
                    "mask_token": "tokenizer.ggml.mask_token_id"}


def read_gguf_chat(path: Path) -> GGUFChat:
    """`tokenizer.chat_template`, the named special tokens' texts and add_bos_token of a GGUF (header only)."""
    from exporters.gguf.gguf_metadata import read_metadata

    values, tokens = read_metadata(Path(path), lambda v: [v.get(key) for key in GGUF_SPECIAL_IDS.values()])
    special = {name: tokens[values[key]] for name, key in GGUF_SPECIAL_IDS.items() if values.get(key) in tokens}
    template = values.get("tokenizer.chat_template")
    return GGUFChat(template if isinstance(template, str) and template else None,
                    TokenFacts(special, bool(values.get("tokenizer.ggml.add_bos_token", False))))
