"""Ollama Modelfiles: write one beside a GGUF, and validate any by Ollama's rules (parser/parser.go + api.FormatParams
as of ollama@fb30760): instructions, quoting, parameter names and types, message roles, and that a FROM path exists
(Ollama silently treats a missing file as a registry model name).

The TEMPLATE written is the family (ollama_templates.py) whose rendering equals the model's own chat template on
fixed conversations; with none, no TEMPLATE at all, so Ollama renders the GGUF's tokenizer.chat_template itself.
`validate` parses and renders a TEMPLATE with Go's text/template as Ollama does (where Go is installed) and, when
FROM is a GGUF with a chat template, compares the two renderings."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from exporters.gguf.chat_templates import CONVERSATIONS, JinjaError, TokenFacts, read_gguf_chat
from exporters.gguf.ollama_data import chat_template_capabilities
from exporters.gguf.ollama_templates import (
    DEFAULT,
    NO_CHAT_TEMPLATE,
    OLLAMA_THINK,
    THINK_OFF,
    THINK_ON,
    Choice,
    choose,
    expected_prompts,
    first_difference,
)
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.tokenizer import Tokenizer

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


@dataclass
class Instruction:
    line: int
    command: str
    args: str


@dataclass
class Validation:
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was checked beyond the grammar (the Go render)


def token_facts(tokenizer: Tokenizer, gguf_file: Path | None = None) -> TokenFacts:
    """The model's token facts: from the GGUF as written when there is one (exactly what Ollama will load)."""
    if gguf_file is not None:
        return read_gguf_chat(gguf_file).facts
    return TokenFacts.of_tokenizer(tokenizer)  # its add_bos is the rule vocab.py writes into the GGUF


def _quote(value: str) -> str:
    if "\n" in value or '"' in value:
        if '"""' in value:
            raise ToolkitError('a Modelfile value cannot contain """', "simplify the chat template")
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile_text(gguf_name: str, choice: Choice, eos: str | None, num_ctx: int) -> tuple[str, str | None]:
    """(the Modelfile, a warning when the model gets no TEMPLATE of its own)."""
    cand = choice.candidate
    if cand is not None and any('"""' in v for v in (cand.template, cand.system or "")):
        choice = Choice(None, choice.checks, 'its TEMPLATE would contain """, which a Modelfile cannot quote',
                        choice.switch)
        cand = None
    lines = [f"# Ollama: ollama create <name> -f {Path(gguf_name).stem}.Modelfile"]
    warning = None
    if cand is not None:
        states = [s for s in (DEFAULT, THINK_ON, THINK_OFF) if any(ch.state == s and ch.status == "match"
                                                                   for ch in choice.checks)]
        lines.append(f"# TEMPLATE: the {cand.family} family, chosen because it renders {len(CONVERSATIONS)} test "
                     f"conversations ({', '.join(states)}) byte for byte as the model's own chat template does;")
        lines.append("# `toolkit modelfile validate` renders it again with Go's text/template, as Ollama does.")
    elif choice.reason == NO_CHAT_TEMPLATE:
        warning = "the model has no chat template; the Modelfile passes prompts through as they are ({{ .Prompt }})"
    else:
        warning = (f"no Ollama TEMPLATE renders this model's chat template exactly ({choice.reason}); the Modelfile "
                   "has no TEMPLATE, so Ollama renders the GGUF's own tokenizer.chat_template")
        lines.append(f"# No TEMPLATE: {' '.join(choice.reason.splitlines())}.")  # one comment line, whatever it says
        lines.append("# Ollama then renders the GGUF's own tokenizer.chat_template (llama-server), or uses a bundled "
                     "template it finds close to it.")
    lines.append(f"FROM ./{gguf_name}")
    if cand is not None:
        lines.append(f"TEMPLATE {_quote(cand.template)}")
        if cand.system:
            lines.append(f"SYSTEM {_quote(cand.system)}")
    elif choice.reason == NO_CHAT_TEMPLATE:  # a base model: Ollama's own default, written out
        lines.append("TEMPLATE {{ .Prompt }}")
    stops = list(cand.stops) if cand is not None else []
    lines += [f"PARAMETER stop {_quote(s)}" for s in dict.fromkeys(stops + ([eos] if eos else []))]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n", warning


def write_modelfile(gguf_path: Path, tokenizer: Tokenizer, num_ctx: int, dest: Path,
                    gguf_file: Path | None = None) -> str | None:
    """Write the Modelfile for `gguf_path` (its FROM); `gguf_file` is the GGUF as written, when at hand, whose
    add_bos_token and special tokens then decide. Returns a warning when the model gets no TEMPLATE of its own."""
    facts = token_facts(tokenizer, gguf_file)
    choice = choose(tokenizer.chat_template, facts)
    text, warning = modelfile_text(Path(gguf_path).name, choice, facts.eos, num_ctx)
    dest.write_text(text, encoding="utf-8")
    return warning


def write_modelfile_for_gguf(gguf_file: Path, num_ctx: int, dest: Path) -> str | None:
    """The same for any GGUF, from its own tokenizer.chat_template and token facts."""
    chat = read_gguf_chat(gguf_file)
    text, warning = modelfile_text(Path(gguf_file).name, choose(chat.template, chat.facts), chat.facts.eos, num_ctx)
    dest.write_text(text, encoding="utf-8")
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
            line = lines[lineno - 1]  # unstripped: a TEMPLATE keeps the spaces that end its first line
            body = line[line.index('"""') + 3:]
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


def validate(path: Path) -> Validation:
    """Raise ToolkitError on what `ollama create` would reject (or silently misread), VerificationError when the
    TEMPLATE renders differently from the FROM GGUF's own chat template; return warnings and what was checked."""
    if not path.is_file():
        raise ToolkitError(f"{path} does not exist", "pass the path of a Modelfile")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{path} is not UTF-8 text", "save the Modelfile as UTF-8") from None
    instructions = parse(text)
    report = Validation()
    warnings = report.warnings
    gguf_file: Path | None = None
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
                gguf_file = resolved if resolved.is_file() else None
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
    templates = [ins for ins in instructions if ins.command == "template"]
    if templates:  # Ollama keeps the last of each
        systems = [ins.args for ins in instructions if ins.command == "system"]
        history = [dict(zip(("role", "content"), ins.args.strip().split(" ", 1))) for ins in instructions
                   if ins.command == "message"]
        _render_template(templates[-1], systems[-1] if systems else "", history, gguf_file, report)
    return report


def ollama_chat(system: str, history: list[dict], conversation: list[dict]) -> list[dict]:
    """The messages Ollama's chat handler renders: the Modelfile's MESSAGEs, then the chat's, with SYSTEM in
    front when the chat itself does not open with a system message."""
    msgs = history + conversation
    if system and (not conversation or conversation[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def _render_template(ins: Instruction, system: str, history: list[dict], gguf_file: Path | None,
                     report: Validation) -> None:
    from exporters.gguf import ollama_go

    where = f"(line {ins.line})"
    version = ollama_go.go_version()
    if version is None:
        _check_go_template(ins.args, where)
        report.warnings.append("Go is not installed: the TEMPLATE was checked for balanced blocks only, not parsed "
                               "or rendered by Go's text/template as Ollama does (install golang-go)")
        return
    keys = [(conv, state) for conv in CONVERSATIONS for state in (DEFAULT, THINK_OFF, THINK_ON)]
    cases = [ollama_go.Case(ollama_chat(system, history, CONVERSATIONS[c]), "", OLLAMA_THINK[s]) for c, s in keys]
    try:
        rendered = ollama_go.render([(ins.args, cases)])[0]
    except ollama_go.GoUnavailable as e:
        report.warnings.append(f"the TEMPLATE was not rendered: {e}")
        return
    if rendered.parse_error:
        line = ins.line + (rendered.parse_line or 1) - 1
        raise ToolkitError(f"(line {line}): template error: {rendered.parse_error}",
                           "fix the TEMPLATE: Ollama's `ollama create` rejects it")
    # Ollama refuses think=true for a template that never shows .Thinking: those renders do not happen
    prompts = {k: (p, e) for k, p, e in zip(keys, rendered.prompts, rendered.errors)
               if k[1] != THINK_ON or rendered.thinking}
    for (conv, state), (_, error) in prompts.items():
        if error:
            raise ToolkitError(f"{where}: template error on conversation '{conv}' ({state}): {error}",
                               "Ollama fails the same way when it renders this conversation")
    report.notes.append(f"TEMPLATE parsed and rendered by Go's text/template ({version.split()[2]}) as Ollama does, "
                        f"on {len(CONVERSATIONS)} conversations" + (", thinking on and off" if rendered.thinking
                                                                    else ""))
    if gguf_file is not None:
        _compare_with_gguf(prompts, gguf_file, where, report, rendered.thinking, rendered.tools)


def _compare_with_gguf(prompts: dict, gguf_file: Path, where: str, report: Validation, thinking: bool,
                       tools: bool) -> None:
    try:
        chat = read_gguf_chat(gguf_file)
    except ToolkitError:
        report.notes.append(f"{gguf_file.name} is not a readable GGUF: nothing to compare the TEMPLATE with")
        return
    if chat.template is None:
        report.notes.append(f"{gguf_file.name} has no chat template to compare the TEMPLATE with")
        return
    exp, switch, _ = expected_prompts(chat.template, chat.facts)
    compared = 0
    for key, (prompt, _) in prompts.items():
        # a Jinja without a thinking switch renders the same whatever Ollama's think flag says
        want = exp.get(key if switch else (key[0], DEFAULT))
        if want is None or isinstance(want, JinjaError):
            continue
        if prompt != want:
            raise VerificationError(f"{where}: the TEMPLATE renders conversation '{key[0]}' ({key[1]}) differently "
                                    f"from {gguf_file.name}'s own chat template, {first_difference(want, prompt)}",
                                    "drop the TEMPLATE (Ollama then renders the GGUF's chat template) or write the "
                                    "Modelfile again with `toolkit export gguf`")
        compared += 1
    report.notes.append(f"identical to {gguf_file.name}'s own chat template (transformers' rendering, BOS as "
                        f"llama.cpp adds it) on all {compared} renders")
    offered = {"thinking"} if thinking else set()
    offered |= {"tools"} if tools else set()
    jinja_caps = chat_template_capabilities(chat.template)
    if len(jinja_caps) > len(offered) and not tools:
        report.notes.append(f"Ollama (as of fb30760) renders {gguf_file.name}'s own chat template instead of this "
                            f"TEMPLATE unless OLLAMA_GO_TEMPLATE=1: the Jinja offers {', '.join(sorted(jinja_caps))}, "
                            f"the TEMPLATE {', '.join(sorted(offered)) or 'neither'}; older Ollama releases always "
                            "use the TEMPLATE")


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
