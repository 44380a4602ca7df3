"""Ollama's data model for chat TEMPLATEs, in Python: what a template that ranges over .Messages sees once Ollama's
chat handler and template package (ollama@fb30760: server/routes.go, template/template.go) have prepared the chat.
The Python renderings of the TEMPLATE families are written against it; ollama_render.go is the same in Go."""
from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT, THINK_ON, THINK_OFF = "default", "think on", "think off"
# the Ollama think flag each state sends: None = the user did not say (a thinking-capable template then gets True)
OLLAMA_THINK = {DEFAULT: None, THINK_ON: True, THINK_OFF: False}


@dataclass(frozen=True)
class Msg:
    role: str
    content: str
    thinking: str = ""


@dataclass(frozen=True)
class OllamaView:
    """What a TEMPLATE that ranges over .Messages sees (server/routes.go ChatHandler + template.Execute)."""
    system: str
    messages: tuple[Msg, ...]
    think: bool
    is_think_set: bool

    @classmethod
    def of(cls, messages: list[dict], modelfile_system: str | None, think: bool | None) -> "OllamaView":
        msgs = [Msg(m["role"], m.get("content") or "", m.get("thinking") or "") for m in messages]
        if modelfile_system and (not msgs or msgs[0].role != "system"):  # SYSTEM when the chat brings none
            msgs.insert(0, Msg("system", modelfile_system))
        collated: list[Msg] = []  # consecutive messages of one role merge (tool results stay apart)
        for m in msgs:
            if collated and collated[-1].role == m.role and m.role != "tool":
                collated[-1] = replace(collated[-1], content=collated[-1].content + "\n\n" + m.content)
            else:
                collated.append(m)
        system = "\n\n".join(m.content for m in msgs if m.role == "system")
        return cls(system, tuple(collated), bool(think), think is not None)

    @property
    def thinking_off(self) -> bool:
        return self.is_think_set and not self.think

    def first_system(self) -> tuple[str | None, tuple[Msg, ...]]:
        """(the first message's text if it is a system message, the messages after it): Jinja's messages[0] rule."""
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content, self.messages[1:]
        return None, self.messages




def chat_template_capabilities(jinja: str) -> set[str]:
    """What Ollama (server/images.go) reads off a GGUF's own Jinja by substring: "tools" and "thinking". When the
    Jinja has more of them than the Modelfile's TEMPLATE and the environment does not set OLLAMA_GO_TEMPLATE,
    that Ollama renders the Jinja itself (through llama-server) instead of the TEMPLATE."""
    caps = set()
    if "tools" in jinja or "tool_call" in jinja:
        caps.add("tools")
    splits = "content.split('</think>')" in jinja or 'content.split("</think>")' in jinja
    if ("<think>" in jinja and "</think>" in jinja) or (splits and "reasoning_content" not in jinja
                                                       and "<SPECIAL_12>" not in jinja):
        caps.add("thinking")
    return caps
