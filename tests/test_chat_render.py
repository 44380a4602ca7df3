"""toolkit/core/chat_render.py renders every real chat template byte for byte as transformers' own renderer does (the
oracle), on every fixed conversation and thinking state — including the templates that refuse a conversation,
which must refuse it in both."""
from __future__ import annotations

import pytest

from exporters.gguf.chat_templates import CONVERSATIONS, think_switch
from tests.ollama_corpus import all_templates
from toolkit.core.chat_render import TemplateError, render


def _transformers(template, messages, **variables):
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                     **variables)[0][0]
    except Exception as e:
        return ("refused", type(e).__name__)


def test_same_render_as_transformers_on_every_real_template():
    templates, missing = all_templates()
    if not templates:
        pytest.skip("; ".join(missing))
    compared = refused = 0
    for t in templates:
        switch = think_switch(t.jinja)
        for think in ((None, True, False) if switch else (None,)):
            variables = {k: v for k, v in t.facts.special.items() if v is not None}
            if think is not None:
                variables[switch] = think
            for name, messages in CONVERSATIONS.items():
                want = _transformers(t.jinja, messages, **variables)
                try:
                    got = render(t.jinja, messages, True, **variables)
                except TemplateError as e:
                    got = ("refused", str(e).split(":")[0])
                if isinstance(want, tuple):
                    refused += 1
                    assert isinstance(got, tuple), (t.name, name, think, got[:200])
                else:
                    compared += 1
                    assert got == want, (t.name, name, think)
    print(f"{len(templates)} templates, {compared} renders identical, {refused} refused by both")
    assert len(templates) >= 70 and compared >= 250, (len(templates), compared, refused)
