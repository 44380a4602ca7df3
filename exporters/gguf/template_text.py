"""Literal text of a TEMPLATE that depends on today's date or on Ollama's think flag: read off the Jinja's renders,
written as Go template text (dates through Ollama's `currentDate`) and rendered in Python the same way."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime

from exporters.gguf.ollama_data import OllamaView

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
# strftime formats a template may print today's date in (strftime_now), longest first
DATE_FORMATS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%d %b %Y", "%Y-%m-%d")
# today's parts as Go template variables, from Ollama's `currentDate` (YYYY-MM-DD, local time, as strftime_now is)
DATE_VARS = {"%Y": "$year", "%m": "$month", "%d": "$day", "%B": "$monthName", "%b": "$mon"}
DATE_PRELUDE = ('{{ $year := slice currentDate 0 4 }}{{ $month := slice currentDate 5 7 }}'
                '{{ $day := slice currentDate 8 10 }}{{ $monthName := "" }}'
                + "".join(f'{{{{ {"if" if i == 0 else "else if"} eq $month "{i + 1:02d}" }}}}'
                          f'{{{{ $monthName = "{n}" }}}}' for i, n in enumerate(MONTHS))
                + '{{ end }}{{ $mon := slice $monthName 0 3 }}')


def _go_date(fmt: str) -> str:
    return "".join(f"{{{{ {DATE_VARS[tok]} }}}}" if tok in DATE_VARS else go_literal(tok)
                   for tok in re.split(r"(%[YmdBb])", fmt) if tok)


def with_date_prelude(template: str) -> str:
    """Define today's parts first when the template prints them."""
    return DATE_PRELUDE + template if any(f"{{{{ {v} }}}}" in template for v in DATE_VARS.values()) else template


@dataclass(frozen=True)
class Dated:
    """Literal text in which today's date appears (written by strftime_now in the Jinja, currentDate in Go)."""
    parts: tuple[str | tuple[str], ...]  # a str is literal text; a 1-tuple holds a strftime format

    @classmethod
    def find(cls, text: str) -> "Dated":
        now = datetime.now()
        for fmt in DATE_FORMATS:
            today = now.strftime(fmt)
            if today in text:
                pieces = text.split(today)
                parts: list = []
                for i, p in enumerate(pieces):
                    if i:
                        parts.append((fmt,))
                    if p:
                        parts.extend(cls.find(p).parts)
                return cls(tuple(parts))
        return cls((text,) if text else ())

    @property
    def literal(self) -> str | None:
        """The text when no date is in it."""
        return "".join(self.parts) if all(isinstance(p, str) for p in self.parts) else None

    def go(self) -> str:
        return "".join(go_literal(p) if isinstance(p, str) else _go_date(p[0]) for p in self.parts)

    def py(self) -> str:
        now = datetime.now()
        return "".join(p if isinstance(p, str) else now.strftime(p[0]) for p in self.parts)


@dataclass(frozen=True)
class Text:
    """A piece of the prompt as the Jinja writes it by default and with thinking switched off."""
    default: Dated
    off: Dated

    @classmethod
    def fit(cls, default: str, off: str | None) -> "Text":
        d = Dated.find(default)
        return cls(d, d if off is None else Dated.find(off))

    @classmethod
    def plain(cls, text: str) -> "Text":
        return cls.fit(text, None)

    @property
    def literal(self) -> str | None:
        """The text when it depends on neither the date nor the think flag."""
        return self.default.literal if self.default == self.off else None

    @property
    def empty(self) -> bool:
        return self.literal == ""

    def go(self) -> str:
        if self.default == self.off:
            return self.default.go()
        head, default, off, tail = "", self.default, self.off, ""
        if default.literal is not None and off.literal is not None:  # keep what both share outside the switch
            d, o = default.literal, off.literal
            n = len(os.path.commonprefix([d, o]))
            n = d.rfind("\n", 0, n) + 1  # whole lines stay together, for whoever reads the Modelfile
            m = len(os.path.commonprefix([d[n:][::-1], o[n:][::-1]]))
            tail = d[len(d) - m:]
            m -= tail.find("\n") if "\n" in tail else m
            head, tail = d[:n], d[len(d) - m:]
            default, off = Dated.find(d[n:len(d) - m]), Dated.find(o[n:len(o) - m])
        switch = f"{{{{ if and $.IsThinkSet (not $.Think) }}}}{off.go()}"
        switch += f"{{{{ else }}}}{default.go()}{{{{ end }}}}" if default.parts else "{{ end }}"
        return go_literal(head) + switch + go_literal(tail)

    def py(self, view: OllamaView) -> str:
        return (self.off if view.thinking_off else self.default).py()


def go_literal(text: str) -> str:
    """Text as it stands in a Go template: only an action opener needs quoting."""
    return text.replace("{{", '{{ "{{" }}')


