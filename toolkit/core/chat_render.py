"""Chat templates (the Jinja a model ships) rendered as transformers' `apply_chat_template` renders them, without
importing transformers: importing it imports torch (2 s and more), which the torch-free GGUF conversion must not pay
to write a Modelfile. The environment is transformers' (read from its chat_template_utils; a test holds the two
renderers byte-identical on every real template of the llama-cpp-python sdist): an immutable sandbox with
trim_blocks and lstrip_blocks, loop controls, a pass-through `{% generation %}` tag, `tojson` that does not escape
HTML, `raise_exception`, `strftime_now`, and a `dict` and `namespace` that refuse underscore names.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# names a message's reasoning comes under; templates read the first, gpt-oss's reads `thinking`
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(Exception):
    """The template refused to render: its own raise_exception, a missing variable, a type error."""


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the class object itself (no attribute tricks on it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=64)
def _compiled(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=Namespace)
    return env.from_string(template)


def _aliased(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else dict(m))
    return out


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt: `variables` are the tokenizer's named special tokens (bos_token, eos_token, ...) and template
    switches (enable_thinking, ...). Raises TemplateError when the template refuses."""
    try:
        return _compiled(template).render(messages=_aliased(messages), tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **variables)
    except Exception as e:  # a template can raise anything: TemplateError, TypeError, UndefinedError...
        raise TemplateError(f"{type(e).__name__}: {e}") from None
