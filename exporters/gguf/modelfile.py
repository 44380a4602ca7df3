"""Ollama Modelfiles: write one beside a GGUF, and validate any by Ollama's rules (parser/parser.go + api.FormatParams
as of ollama@fb30760): instructions, quoting, parameter names and types, message roles, and that a FROM path exists
(Ollama silently treats a missing file as a registry model name)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.tokenizer import Tokenizer

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
            "requires"}
INT_PARAMS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
              "num_thread", "draft_num_predict", "main_gpu"}
FLOAT_PARAMS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                "frequency_penalty"}
BOOL_PARAMS = {"use_mmap"}
LIST_PARAMS = {"stop"}
DEPRECATED_PARAMS = {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
                     "mirostat_tau", "mirostat_eta"}
ROLES = {"system", "user", "assistant"}

CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")
LLAMA2_TEMPLATE = ("{{- range $i, $m := .Messages }}{{- if eq $m.Role \"user\" }}[INST] {{ $m.Content }} [/INST]"
                   "{{- else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>{{- end }}{{- end }}")


@dataclass
class Instruction:
    line: int
    command: str
    args: str


def go_template_for(tokenizer: Tokenizer) -> tuple[str, list[str], str | None]:
    """(Go template, stop strings, warning) translated from the chat template's family."""
    jinja = tokenizer.chat_template or ""
    if "<|im_start|>" in jinja and "<|im_end|>" in jinja:
        return CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], None
    if "[INST]" in jinja and "[/INST]" in jinja:
        return LLAMA2_TEMPLATE, ["[INST]", "</s>"], None
    reason = "the model has no chat template" if not jinja else "its chat template is neither ChatML nor Llama-style"
    return "{{ .Prompt }}", [], f"{reason}; the Modelfile uses a plain {{{{ .Prompt }}}} template"


def _quote(value: str) -> str:
    if "\n" in value or '"' in value:
        if '"""' in value:
            raise ToolkitError('a Modelfile value cannot contain """', "simplify the chat template")
        return f'"""{value}"""'
    return f'"{value}"'


def write_modelfile(gguf_path: Path, tokenizer: Tokenizer, num_ctx: int, dest: Path) -> str | None:
    template, stops, warning = go_template_for(tokenizer)
    lines = [f"# Ollama: ollama create <name> -f {gguf_path.stem}.Modelfile", f"FROM ./{gguf_path.name}",
             f"TEMPLATE {_quote(template)}"]
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return warning


def parse(text: str) -> list[Instruction]:
    """Ollama's Modelfile grammar: `COMMAND args`, '#' comments, values bare, "quoted" or \"\"\"multi-line\"\"\"."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list[Instruction] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        raw = lines[i].strip()
        lineno = i + 1
        i += 1
        if not raw or raw.startswith("#"):
            continue
        parts = raw.split(None, 1)
        command = parts[0].lower()
        if command not in COMMANDS:
            raise ToolkitError(f"(line {lineno}): command must be one of \"from\", \"license\", \"template\", "
                               "\"system\", \"adapter\", \"draft\", \"renderer\", \"parser\", \"parameter\", "
                               "\"message\", or \"requires\"", f"'{parts[0]}' is not a Modelfile instruction")
        args = parts[1] if len(parts) > 1 else ""
        if args.startswith('"""'):
            body = args[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ToolkitError(f"(line {lineno}): unexpected EOF", 'close the """ quote')
                body += "\n" + lines[i]
                i += 1
            value, rest = body.split('"""', 1)
            if rest.strip():
                raise ToolkitError(f"(line {lineno}): text after the closing \"\"\"", "put it on its own line")
            args = value
        elif args.startswith('"') and command not in ("parameter", "message"):  # those split name/value later
            if len(args) < 2 or not args.endswith('"'):
                raise ToolkitError(f"(line {lineno}): unexpected EOF", "close the quoted value")
            args = args[1:-1]
        if not args.strip():
            raise ToolkitError(f"(line {lineno}): unexpected EOF", f"{command.upper()} needs a value")
        out.append(Instruction(lineno, command, args))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"""') and value.endswith('"""') and len(value) >= 6:
        return value[3:-3]
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return value[1:-1]
    return value


def validate(path: Path) -> list[str]:
    """Raise ToolkitError on what `ollama create` would reject (or silently misread); return warnings."""
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist", "pass the path of a Modelfile")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{path} is not UTF-8 text", "save the Modelfile as UTF-8") from None
    instructions = parse(text)
    warnings: list[str] = []
    froms = [ins for ins in instructions if ins.command == "from"]
    if not froms:
        raise ToolkitError("no FROM line", "add FROM ./model.gguf")
    for ins in instructions:
        where = f"(line {ins.line})"
        if ins.command == "from":
            target = _unquote(ins.args)
            looks_local = target.startswith(("./", "../", "/", "~")) or target.endswith((".gguf", ".safetensors"))
            if looks_local:
                resolved = Path(target).expanduser()
                if not resolved.is_absolute():
                    resolved = path.parent / resolved
                if not resolved.exists():
                    raise ToolkitError(f"{where}: FROM {target} does not exist (Ollama would silently look it up "
                                       "as a registry model name)", "export the GGUF first or fix the path")
        elif ins.command == "parameter":
            name, _, value = ins.args.strip().partition(" ")
            value = _unquote(value)
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not value:
                raise ToolkitError(f"{where}: unexpected EOF", "PARAMETER needs a name and a value")
            if name in DEPRECATED_PARAMS:
                warnings.append(f"{where}: parameter {name} is deprecated")
            elif name in INT_PARAMS:
                if not re.fullmatch(r"[+-]?\d+", value):
                    raise ToolkitError(f"{where}: invalid int value [{value}]", f"{name} takes an integer")
            elif name in FLOAT_PARAMS:
                try:
                    float(value)
                except ValueError:
                    raise ToolkitError(f"{where}: invalid float value [{value}]", f"{name} takes a number") from None
            elif name in BOOL_PARAMS:
                if value.lower() not in ("true", "false", "1", "0", "t", "f"):
                    raise ToolkitError(f"{where}: invalid bool value [{value}]", f"{name} takes true or false")
            elif name not in LIST_PARAMS:
                raise ToolkitError(f"{where}: unknown parameter '{name}'", "see Ollama's list of PARAMETER names")
        elif ins.command == "message":
            role, _, content = ins.args.strip().partition(" ")
            if role not in ROLES:
                raise ToolkitError(f'{where}: message role must be one of "system", "user", or "assistant"',
                                   f"'{role}' is not a role")
            if not content.strip():
                raise ToolkitError(f"{where}: unexpected EOF", "MESSAGE needs a role and a text")
        elif ins.command == "requires":
            if not re.fullmatch(r"v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", _unquote(ins.args)):
                raise ToolkitError(f"{where}: requires must be a valid semver (e.g. 0.14.0)", "fix the version")
        elif ins.command == "template":
            _check_go_template(ins.args, where)
    return warnings


def _check_go_template(template: str, where: str) -> None:
    """Go text/template's own parse errors that matter here: unbalanced actions and blocks."""
    depth = 0
    for action in re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", template, flags=re.S):
        word = action.split(None, 1)[0] if action.split() else ""
        if word in ("if", "range", "with", "block", "define"):
            depth += 1
        elif word == "end":
            depth -= 1
            if depth < 0:
                raise ToolkitError(f"{where}: template error: unexpected {{{{end}}}}", "balance the template blocks")
    if template.count("{{") != template.count("}}"):
        raise ToolkitError(f"{where}: template error: unclosed action", "balance {{ and }}")
    if depth:
        raise ToolkitError(f"{where}: template error: unexpected EOF", "close every {{ if }}/{{ range }} with {{ end }}")
