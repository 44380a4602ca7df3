"""Ollama TEMPLATEs for the chat formats real small models use, chosen by rendering.

Each family is a Go template with parameters read off the model's own Jinja renders (its default system message,
a preamble, dates, what the generation prompt adds with thinking on or off), plus a Python rendering of that same
Go template over Ollama's data model, used to choose without a Go toolchain. A family is kept for a model only when
its rendering is byte-identical to the Jinja's on every conversation of `chat_templates.CONVERSATIONS` (and with
the template's thinking switch on and off); the tests prove each chosen TEMPLATE with Go's own text/template
(ollama_render.go) and prove the Python renderings equal Go's for every candidate.

Byte-identical means what llama.cpp tokenizes: Ollama puts the BOS token in front of the prompt itself when the
GGUF says add_bos_token, so the TEMPLATE then leaves out the BOS the Jinja writes first; otherwise the TEMPLATE
writes it. What Go's text/template cannot express is out of reach of any TEMPLATE, and is why some templates match
no family: string tests and edits (`'/think' in system`, `| trim`, `.split('</think>')`) on contents, or anything a
plain conversation does not show (tools, documents).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from exporters.gguf.chat_templates import CONVERSATIONS, JinjaError, TokenFacts, render, think_switch
from exporters.gguf.ollama_data import DEFAULT, OLLAMA_THINK, THINK_OFF, THINK_ON, OllamaView
from exporters.gguf.template_text import Dated, Text, go_literal, with_date_prelude


# --- candidates -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    family: str  # the name shown in tables and the Modelfile's comment
    template: str  # the Go template, exactly as the Modelfile's TEMPLATE carries it
    system: str | None  # the Modelfile's SYSTEM line (a default system message Ollama inserts as the Jinja does)
    stops: tuple[str, ...]
    thinking: bool  # the template shows .Thinking, so Ollama offers thinking (and defaults think to true)
    mirror: Callable[[OllamaView], str] = field(compare=False, repr=False)

    def render(self, messages: list[dict], state: str) -> str:
        think = OLLAMA_THINK[state]
        if think is None and self.thinking:
            think = True
        return self.mirror(OllamaView.of(messages, self.system, think))


Expected = dict  # (conversation name, state) -> the prompt text Ollama must produce, or a JinjaError


def _conv_text(name: str, role: str, nth: int = 0) -> str:
    return [m["content"] for m in CONVERSATIONS[name] if m["role"] == role][nth]


USER = _conv_text("user", "user")
SYSTEM = _conv_text("system, user", "system")
REPLY = _conv_text("user, assistant, user", "assistant")


def _get(exp: Expected, conv: str, state: str) -> str | None:
    value = exp.get((conv, state))
    return value if isinstance(value, str) else None


def _thinking_block() -> str:
    # shown only on replies after the last user message, as Qwen3's own template does with reasoning_content; a plain
    # chat therefore never resends earlier thinking. Naming .Thinking inside the range over .Messages is also what
    # gives the model Ollama's thinking capability (tags <think> and </think>).
    return "{{ if and .Thinking (gt $i $lastUser) }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}"


LAST_USER = '{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}' \
            '{{ end }}{{ end }}'
NO_SYSTEM_FIRST = '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'


class RoleTagged:
    """Every message as OPEN(role) + content + CLOSE, then the generation prompt: ChatML, Llama-3's headers, Phi-3,
    Granite, Seed-OSS, GLM-4. Read off the renders: a default system turn (for a plain default, Ollama's SYSTEM
    line does exactly what the Jinja does: a first system message when the chat has none), text around the system
    message (Llama-3.1's knowledge/date preamble, SmolLM3's metadata), a prefix on replies, the generation prompt,
    each per think state."""

    def __init__(self, name: str, a: str, b: str, close: str, stops: tuple[str, ...], head: str = "",
                 thinking_name: str | None = None, drop_empty_system: bool = False):
        self.name, self.a, self.b, self.close, self.stops, self.head = name, a, b, close, stops, head
        self.thinking_name = thinking_name  # the family's name when its template reacts to the think flag
        self.drop_empty_system = drop_empty_system  # Phi-3 writes no system turn for an empty system message

    def open(self, role: str) -> str:
        return f"{self.a}{role}{self.b}"

    def _parse(self, exp: Expected, state: str) -> dict | None:
        e = re.escape
        o, c = lambda r: e(self.open(r)), e(self.close)
        user = _get(exp, "user", state)
        if user is None:
            return None
        m = re.fullmatch(f"{e(self.head)}(?:{o('system')}(?P<default>.*?){c})?{o('user')}{e(USER)}{c}(?P<gen>.*)",
                         user, re.S)
        if not m:
            return None
        got = {"default": m["default"], "gen": m["gen"], "pre": "", "post": ""}
        with_system = _get(exp, "system, user", state)
        if with_system is not None:
            s = re.fullmatch(f"{e(self.head)}{o('system')}(?P<pre>.*?){e(SYSTEM)}(?P<post>.*?){c}{o('user')}"
                             f"{e(USER)}{c}(?P<gen>.*)", with_system, re.S)
            if not s or s["gen"] != m["gen"]:
                return None
            got.update(pre=s["pre"], post=s["post"])
        multi = _get(exp, "user, assistant, user", state)
        h = re.search(f"{o('assistant')}(?P<hist>.*?){e(REPLY)}{c}", multi or "", re.S)
        got["hist"] = h["hist"] if h else ""
        return got

    def candidates(self, exp: Expected, switch: str | None, capable: bool, lead: str) -> Iterable[Candidate]:
        base = self._parse(exp, DEFAULT)
        if base is None:
            return
        off = self._parse(exp, THINK_OFF) if switch else base
        if off is None or (off["default"] is None) != (base["default"] is None):
            return
        pre, post, gen, hist = (Text.fit(base[k], off[k]) for k in ("pre", "post", "gen", "hist"))
        default = None if base["default"] is None else Text.fit(base["default"], off["default"])
        thinking = capable and self.thinking_name is not None
        system_line = None
        # a plain default system message goes on the SYSTEM line, where Ollama applies the Jinja's own rule
        if default is not None and default.literal and pre.empty and post.empty:
            system_line, default = default.literal, None
        reacts = thinking or any(t.default != t.off for t in (pre, post, gen, hist))
        name = self.thinking_name if reacts and self.thinking_name else self.name
        yield self._build(name, lead, default, pre, post, gen, hist, system_line, thinking)

    def _build(self, name, lead, default, pre, post, gen, hist, system_line, thinking) -> Candidate:
        a, b, close = go_literal(self.a), go_literal(self.b), go_literal(self.close)
        go = [go_literal(lead + self.head)]
        if default is not None:
            go.append(f"{NO_SYSTEM_FIRST}{go_literal(self.open('system'))}{default.go()}{close}{{{{ end }}}}")
        if thinking:
            go.append(LAST_USER)
        branches = []
        if not (pre.empty and post.empty) or self.drop_empty_system:
            turn = f"{go_literal(self.open('system'))}{pre.go()}{{{{ .Content }}}}{post.go()}{close}"
            branches.append(('eq .Role "system"', f"{{{{ if .Content }}}}{turn}{{{{ end }}}}" if self.drop_empty_system
                             else turn))
        if not hist.empty or thinking:
            shown = _thinking_block() if thinking else ""
            branches.append(('eq .Role "assistant"',
                             f"{go_literal(self.open('assistant'))}{hist.go()}{shown}{{{{ .Content }}}}{close}"))
        generic = f"{a}{{{{ .Role }}}}{b}{{{{ .Content }}}}{close}"
        body = generic
        if branches:
            body = "".join(f"{{{{ {'if' if i == 0 else 'else if'} {cond} }}}}{text}" for i, (cond, text)
                           in enumerate(branches)) + f"{{{{ else }}}}{generic}{{{{ end }}}}"
        loop = "{{ range $i, $m := .Messages }}" if thinking else "{{ range .Messages }}"
        go.append(f"{loop}{body}{{{{ end }}}}{gen.go()}")
        template = "".join(go)

        def mirror(view: OllamaView) -> str:
            out = [lead, self.head]
            if default is not None and (not view.messages or view.messages[0].role != "system"):
                out.append(self.open("system") + default.py(view) + self.close)
            last_user = max((i for i, m in enumerate(view.messages) if m.role == "user"), default=-1)
            for i, m in enumerate(view.messages):
                if m.role == "system" and (not (pre.empty and post.empty) or self.drop_empty_system):
                    if m.content or not self.drop_empty_system:
                        out.append(self.open("system") + pre.py(view) + m.content + post.py(view) + self.close)
                elif m.role == "assistant" and (not hist.empty or thinking):
                    think = f"<think>\n{m.thinking}\n</think>\n\n" if thinking and m.thinking and i > last_user else ""
                    out.append(self.open("assistant") + hist.py(view) + think + m.content + self.close)
                else:
                    out.append(self.open(m.role) + m.content + self.close)
            out.append(gen.py(view))
            return "".join(out)

        return Candidate(name, with_date_prelude(template), system_line, self.stops, thinking, mirror)


class Gemma:
    """Gemma's turns (assistant as "model"); no system role: the system text opens the first user turn, as Gemma 3's
    own template does (Gemma 2's raises on a system message, so those conversations have nothing to match)."""
    name = "gemma"
    stops = ("<end_of_turn>", "<start_of_turn>")

    def candidates(self, exp: Expected, switch: str | None, capable: bool, lead: str) -> Iterable[Candidate]:
        e = re.escape
        user = _get(exp, "user", DEFAULT)
        m = user and re.fullmatch(f"<start_of_turn>user\n{e(USER)}<end_of_turn>\n(?P<gen><start_of_turn>model\n.*)",
                                  user, re.S)
        if not m:
            return
        gen = Text.plain(m["gen"])
        sep = "\n\n"
        with_system = _get(exp, "system, user", DEFAULT)
        if with_system is not None:
            s = re.fullmatch(f"<start_of_turn>user\n{e(SYSTEM)}(?P<sep>.*?){e(USER)}<end_of_turn>\n.*", with_system,
                             re.S)
            if not s:
                return
            sep = s["sep"]
        template = (f'{go_literal(lead)}{{{{ $sys := "" }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}'
                    f'{{{{ $sys = .Content }}}}{{{{ else if eq .Role "user" }}}}<start_of_turn>user\n{{{{ if $sys }}}}'
                    f'{{{{ $sys }}}}{go_literal(sep)}{{{{ $sys = "" }}}}{{{{ end }}}}{{{{ .Content }}}}<end_of_turn>\n'
                    f'{{{{ else if eq .Role "assistant" }}}}<start_of_turn>model\n{{{{ .Content }}}}<end_of_turn>\n'
                    f'{{{{ end }}}}{{{{ end }}}}{gen.go()}')

        def mirror(view: OllamaView) -> str:
            out, sys = [lead], ""
            for m in view.messages:
                if m.role == "system":
                    sys = m.content
                elif m.role == "user":
                    out.append(f"<start_of_turn>user\n{sys + sep if sys else ''}{m.content}<end_of_turn>\n")
                    sys = ""
                elif m.role == "assistant":
                    out.append(f"<start_of_turn>model\n{m.content}<end_of_turn>\n")
            return "".join(out) + gen.py(view)

        yield Candidate(self.name, template, None, self.stops, False, mirror)


class Inst:
    """[INST] ... [/INST] turns: Mistral (system text on the last user turn, or a [SYSTEM_PROMPT] turn) and
    Llama 2 (<<SYS>> on the first user turn); spacing, reply endings and placement read off the renders."""
    name = "mistral"

    def candidates(self, exp: Expected, switch: str | None, capable: bool, lead: str) -> Iterable[Candidate]:
        e = re.escape
        user, multi = _get(exp, "user", DEFAULT), _get(exp, "user, assistant, user", DEFAULT)
        if user is None or multi is None:
            return
        u = re.fullmatch(f"(?P<turn>.*?)(?P<open>\\[INST\\] ?){e(USER)}(?P<close> ?\\[/INST\\])(?P<gen>.*)", user,
                         re.S)
        if not u:
            return
        o, c = u["open"], u["close"]
        hi, capital = _conv_text("user, assistant, user", "user", 0), _conv_text("user, assistant, user", "user", 1)
        mm = re.fullmatch(f"{e(u['turn'])}{e(o)}{e(hi)}{e(c)}(?P<apre>.*?){e(REPLY)}(?P<apost>.*?){e(o)}"
                          f"{e(capital)}{e(c)}{e(u['gen'])}", multi, re.S)
        if not mm:
            return
        placement, spre, ssep, default = "last", "", "\n\n", None
        s_user, s_multi = _get(exp, "system, user", DEFAULT), _get(exp, "system, user, assistant, user", DEFAULT)
        if s_user is not None and s_multi is not None:
            turn = re.fullmatch(f"(?P<spre>.*?){e(SYSTEM)}(?P<ssep>.*?){e(o)}{e(USER)}{e(c)}.*", s_user, re.S)
            inline = re.fullmatch(f"{e(o)}(?P<spre>.*?){e(SYSTEM)}(?P<ssep>.*?){e(USER)}{e(c)}.*", s_user, re.S)
            if inline and not u["turn"]:
                placement = "first" if s_multi.find(SYSTEM) < s_multi.find(hi) else "last"
                spre, ssep = inline["spre"], inline["ssep"]
            elif turn:
                placement, spre, ssep = "turn", turn["spre"], turn["ssep"]
            else:
                return
        if u["turn"]:  # a default system turn when the chat has none (Mistral Small 3, Devstral)
            if placement != "turn" or not (u["turn"].startswith(spre) and u["turn"].endswith(ssep)):
                return
            default = Dated.find(u["turn"][len(spre):len(u["turn"]) - len(ssep)])
        system_line = None
        if default is not None and default.literal:
            system_line, default = default.literal, None
        yield self._build(lead, o, c, mm["apre"], mm["apost"], Text.plain(u["gen"]), placement, spre, ssep, default,
                          system_line)

    def _build(self, lead, o, c, apre, apost, gen, placement, spre, ssep, default, system_line) -> Candidate:
        L = go_literal
        where = {"first": "(eq $i 0)", "last": "(eq (len (slice $msgs $i)) 1)"}.get(placement)
        go = [L(lead), '{{ $sys := "" }}{{ $has := false }}{{ $msgs := .Messages }}',
              '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ $sys = (index .Messages 0).Content }}'
              '{{ $has = true }}{{ $msgs = slice .Messages 1 }}{{ end }}']
        if placement == "turn":
            no_sys = f"{{{{ else }}}}{L(spre)}{default.go()}{L(ssep)}" if default is not None else ""
            go.append(f"{{{{ if $has }}}}{L(spre)}{{{{ $sys }}}}{L(ssep)}{no_sys}{{{{ end }}}}")
            sys_in_user = ""
        else:
            sys_in_user = f"{{{{ if and $has {where} }}}}{L(spre)}{{{{ $sys }}}}{L(ssep)}{{{{ end }}}}"
        go.append(f'{{{{ range $i, $m := $msgs }}}}{{{{ if eq $m.Role "user" }}}}{L(o)}{sys_in_user}'
                  f'{{{{ $m.Content }}}}{L(c)}{{{{ else if eq $m.Role "assistant" }}}}{L(apre)}{{{{ $m.Content }}}}'
                  f'{L(apost)}{{{{ end }}}}{{{{ end }}}}{gen.go()}')
        template = "".join(go)
        name = "llama2" if "<<SYS>>" in spre else self.name

        def mirror(view: OllamaView) -> str:
            sys, msgs = view.first_system()
            out = [lead]
            if placement == "turn":
                if sys is not None:
                    out.append(spre + sys + ssep)
                elif default is not None:
                    out.append(spre + default.py() + ssep)
            for i, m in enumerate(msgs):
                if m.role == "user":
                    here = sys is not None and placement != "turn" and (
                        i == 0 if placement == "first" else i == len(msgs) - 1)
                    out.append(o + (spre + sys + ssep if here else "") + m.content + c)
                elif m.role == "assistant":
                    out.append(apre + m.content + apost)
            return "".join(out) + gen.py(view)

        return Candidate(name, with_date_prelude(template), system_line, ("[INST]", "[/INST]"), False, mirror)


class DeepSeek:
    """DeepSeek-R1 and its distills: the system text bare at the start, <｜User｜>/<｜Assistant｜> turns, replies
    ended by <｜end▁of▁sentence｜> (and opened by an empty thinking block in V3), the generation prompt opening
    <think> (each per think state)."""
    name = "deepseek-r1"
    USER_TAG, ASSISTANT_TAG, END = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"

    def candidates(self, exp: Expected, switch: str | None, capable: bool, lead: str) -> Iterable[Candidate]:
        e = re.escape
        U, A, END = self.USER_TAG, self.ASSISTANT_TAG, self.END

        def parse(state):
            user, multi = _get(exp, "user", state), _get(exp, "user, assistant, user", state)
            m = user and re.fullmatch(f"{e(U)}{e(USER)}(?P<usuf>(?:{e(END)})?){e(A)}(?P<gen>.*)", user, re.S)
            h = multi and re.search(f"{e(A)}(?P<hist>.*?){e(REPLY)}{e(END)}", multi, re.S)
            return m and (m["usuf"], m["gen"], h["hist"] if h else "")

        base = parse(DEFAULT)
        off = parse(THINK_OFF) if switch else base
        if not base or not off or base[0] != off[0]:
            return
        usuf, gen, hist = base[0], Text.fit(base[1], off[1]), Text.fit(base[2], off[2])
        template = (f'{go_literal(lead)}{{{{ $sys := "" }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}'
                    f'{{{{ $sys = .Content }}}}{{{{ end }}}}{{{{ end }}}}{{{{ $sys }}}}{{{{ range .Messages }}}}'
                    f'{{{{ if eq .Role "user" }}}}{U}{{{{ .Content }}}}{usuf}{{{{ else if eq .Role "assistant" }}}}'
                    f'{A}{hist.go()}{{{{ .Content }}}}{END}{{{{ end }}}}{{{{ end }}}}{A}{gen.go()}')

        def mirror(view: OllamaView) -> str:
            systems = [m.content for m in view.messages if m.role == "system"]  # the last one wins, as in the Jinja
            out = [lead, systems[-1] if systems else ""]
            for m in view.messages:
                if m.role == "user":
                    out.append(U + m.content + usuf)
                elif m.role == "assistant":
                    out.append(A + hist.py(view) + m.content + END)
            return "".join(out) + A + gen.py(view)

        yield Candidate(self.name, template, None, (END, U, A), False, mirror)


FAMILIES = (
    RoleTagged("chatml", "<|im_start|>", "\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>"), thinking_name="qwen3"),
    RoleTagged("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>",
               ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    RoleTagged("phi3", "<|", "|>\n", "<|end|>\n", ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
               drop_empty_system=True),
    Gemma(),
    Inst(),
    DeepSeek(),
    RoleTagged("granite", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>\n",
               ("<|end_of_text|>", "<|start_of_role|>")),
    RoleTagged("seed-oss", "<seed:bos>", "\n", "<seed:eos>", ("<seed:eos>", "<seed:bos>")),
    RoleTagged("glm4", "<|", "|>\n", "", ("<|user|>", "<|observation|>", "<|endoftext|>"), head="[gMASK]<sop>",
               thinking_name="glm4"),
)


# --- the choice -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    conversation: str
    state: str
    status: str  # "match", "differs", "jinja raises", "not offered" (Ollama refuses think=true for this template)
    detail: str = ""


@dataclass
class Choice:
    candidate: Candidate | None
    checks: list[Check]
    reason: str | None  # why no family matched (None when one did)
    switch: str | None  # the Jinja's thinking variable
    tried: list[tuple[Candidate, list[Check]]] = field(default_factory=list)


class BosMismatch(JinjaError):
    """llama.cpp adds a BOS the Jinja does not write: no TEMPLATE can give the Jinja's tokens."""


def expected_prompts(jinja: str, facts: TokenFacts) -> tuple[Expected, str | None, list[str]]:
    """(the prompt Ollama must send llama.cpp for each (conversation, state), the thinking switch, the leading texts
    a family may leave to be written as such). With add_bos the GGUF's BOS comes from llama.cpp, so it is taken off
    the Jinja's; without, a BOS text the Jinja writes first is either a family's own markup (ChatML models whose
    bos_token is <|im_start|>) or written literally in front of the family's template."""
    switch = think_switch(jinja)
    states = (DEFAULT, THINK_ON, THINK_OFF) if switch else (DEFAULT,)
    exp: Expected = {}
    for conv, messages in CONVERSATIONS.items():
        for state in states:
            try:
                exp[conv, state] = render(jinja, messages, facts.special, switch, OLLAMA_THINK[state])
            except JinjaError as err:
                exp[conv, state] = err
    bos = facts.bos or ""
    leads = [""]
    texts = [v for v in exp.values() if isinstance(v, str)]
    if facts.add_bos and bos:
        exp = {k: (v[len(bos):] if isinstance(v, str) and v.startswith(bos) else
                   BosMismatch(f"the GGUF adds BOS {bos!r} (add_bos_token) in front of every prompt, and the chat "
                               "template does not write it") if isinstance(v, str) else v) for k, v in exp.items()}
    elif bos and texts and all(t.startswith(bos) for t in texts):
        leads.append(bos)
    return exp, switch, leads


def _without(exp: Expected, lead: str) -> Expected:
    return {k: v[len(lead):] if isinstance(v, str) else v for k, v in exp.items()}


def first_difference(want: str, got: str) -> str:
    """Where two renderings part, with a little of each around it."""
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"at byte {i}: Jinja {want[max(0, i - 20):i + 30]!r}, TEMPLATE {got[max(0, i - 20):i + 30]!r}"


def check(candidate: Candidate, exp: Expected, switch: str | None) -> list[Check]:
    out = []
    for conv, messages in CONVERSATIONS.items():
        for state in ((DEFAULT, THINK_ON, THINK_OFF) if switch else (DEFAULT,)):
            want = exp[conv, state]
            if isinstance(want, JinjaError):
                out.append(Check(conv, state, "jinja raises", str(want)))
            elif state == THINK_ON and not candidate.thinking:
                out.append(Check(conv, state, "not offered", "Ollama refuses think=true for a template without "
                                                             ".Thinking"))
            else:
                got = candidate.render(messages, state)
                out.append(Check(conv, state, "match") if got == want else
                           Check(conv, state, "differs", first_difference(want, got)))
    return out


NO_CHAT_TEMPLATE = "the model has no chat template"


def all_candidates(exp: Expected, switch: str | None, leads: list[str]) -> Iterable[Candidate]:
    """Every family's TEMPLATE that fits the renders, in the order they are tried."""
    capable = switch is not None and all(exp[c, THINK_ON] == exp[c, DEFAULT] for c in CONVERSATIONS)
    for lead in leads:
        for family in FAMILIES:
            yield from family.candidates(_without(exp, lead), switch, capable, lead)


def choose(jinja: str | None, facts: TokenFacts) -> Choice:
    """The first family whose TEMPLATE renders every conversation exactly as the model's Jinja does."""
    if not jinja:
        return Choice(None, [], NO_CHAT_TEMPLATE, None)
    exp, switch, leads = expected_prompts(jinja, facts)
    plain = exp["user", DEFAULT]
    if isinstance(plain, BosMismatch):
        return Choice(None, [], str(plain), switch)
    if isinstance(plain, JinjaError):
        return Choice(None, [], f"the chat template does not render a plain user message ({plain})", switch)
    tried = []
    for candidate in all_candidates(exp, switch, leads):
        checks = check(candidate, exp, switch)
        tried.append((candidate, checks))
        if all(ch.status != "differs" for ch in checks) and any(ch.status == "match" for ch in checks):
            return Choice(candidate, checks, None, switch, tried)
    if not tried:
        return Choice(None, [], f"its turn format is none of the families' (its rendering begins {plain[:70]!r})",
                      switch, tried)
    best, checks = min(tried, key=lambda t: sum(ch.status == "differs" for ch in t[1]))
    first = next((ch for ch in checks if ch.status == "differs"), None)
    if first is None:
        return Choice(None, checks, "no conversation renders in both the Jinja and a TEMPLATE", switch, tried)
    return Choice(None, checks, f"closest family {best.family}: '{first.conversation}' ({first.state}) differs "
                                f"{first.detail}", switch, tried)
