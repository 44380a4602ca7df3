"""Modelfiles checked by Ollama's rules (cases written here from the grammar in the research notes)."""
from __future__ import annotations

import pytest

from exporters.gguf.modelfile import validate, write_modelfile
from tests.conftest import assert_usage_error, run_cli
from tests.helpers import tiny_tokenizer
from toolkit.errors import ToolkitError


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    return tmp_path


def _check(folder, text):
    f = folder / "Modelfile"
    f.write_text(text)
    return validate(f)


def test_written_modelfile_is_valid_chatml(folder):
    write_modelfile(folder / "m.gguf", tiny_tokenizer(), 2048, folder / "m.Modelfile")
    text = (folder / "m.Modelfile").read_text()
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 2048" in text
    assert "<|im_start|>{{ .Role }}" in text
    assert validate(folder / "m.Modelfile") == []


def test_untranslatable_template_falls_back_with_a_warning(folder):
    tok = tiny_tokenizer()
    saved = dict(tok.config)
    try:
        tok.config["chat_template"] = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
        warning = write_modelfile(folder / "m.gguf", tok, 512, folder / "m.Modelfile")
    finally:
        tok.config.clear()
        tok.config.update(saved)
    assert "{{ .Prompt }}" in warning and 'TEMPLATE "{{ .Prompt }}"' in (folder / "m.Modelfile").read_text()


@pytest.mark.parametrize("text,message", [
    ("PARAMETER num_ctx 512\n", "no FROM line"),
    ("FROM ./m.gguf\nPARAMETER colour blue\n", "unknown parameter 'colour'"),
    ("FROM ./m.gguf\nPARAMETER num_ctx big\n", "invalid int value [big]"),
    ("FROM ./m.gguf\nPARAMETER temperature warm\n", "invalid float value [warm]"),
    ("FROM ./m.gguf\nPARAMETER use_mmap maybe\n", "invalid bool value [maybe]"),
    ("FROM ./missing.gguf\n", "does not exist"),
    ("FROM ./m.gguf\nINSTRUCT be nice\n", "command must be one of"),
    ("FROM ./m.gguf\nMESSAGE robot hello\n", "message role must be one of"),
    ("FROM ./m.gguf\nTEMPLATE \"\"\"{{ .Prompt }}\n", "unexpected EOF"),
    ("FROM ./m.gguf\nTEMPLATE {{ if .System }}{{ .System }}\n", "template error"),
    ("FROM ./m.gguf\nREQUIRES soon\n", "valid semver"),
    ("FROM ./m.gguf\nPARAMETER num_ctx\n", "unexpected EOF"),
])
def test_rejections(folder, text, message):
    with pytest.raises(ToolkitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _check(folder, text)


def test_accepted_forms(folder):
    text = ('# comment\nfrom ./m.gguf\nPARAMETER stop "<|im_end|>"\nPARAMETER stop <|im_start|>\n'
            'PARAMETER temperature 0.7\nPARAMETER top_k 40\nSYSTEM """You are\nterse."""\n'
            'MESSAGE user Hi\nMESSAGE assistant Hello\nREQUIRES 0.14.0\nPARAMETER mirostat 1\n'
            'FROM llama3:8b\n')
    assert _check(folder, text) == ["(line 12): parameter mirostat is deprecated"]  # SYSTEM spans lines 7-8


def test_cli_validate(folder):
    write_modelfile(folder / "m.gguf", tiny_tokenizer(), 2048, folder / "m.Modelfile")
    ok = run_cli("modelfile", "validate", folder / "m.Modelfile")
    assert ok.returncode == 0 and "valid" in ok.stdout
    (folder / "bad").write_text("FROM ./m.gguf\nPARAMETER num_ctx lots\n")
    assert "invalid int value" in assert_usage_error(run_cli("modelfile", "validate", folder / "bad"))
