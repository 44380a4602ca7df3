"""llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist, fetched by `make test`) as a command line,
for benchmarks that set its files beside ours.

Its pre-tokenizer check hashes one test tokenization against a table of known tokenizers and refuses any other,
MiniMind's among them (mm26, the 413M benchmark model). `pre` names what to write instead, as the converter would
for a tokenizer in its table: MiniMind's pre-tokenizer is byte-level BPE with GPT-2's regex, llama.cpp's `gpt-2`
(what `toolkit export gguf` derives from the regex itself). Only the name in the file changes; the conversion of the
tensors and the vocabulary is the converter's own.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def command(hf: Path, outtype: str, outfile: Path, pre: str | None = None) -> list[str]:
    from tests.real_models import llama_cpp_converter

    converter = llama_cpp_converter()
    if pre is None:
        return [sys.executable, str(converter), str(hf), "--outtype", outtype, "--outfile", str(outfile)]
    told = (f"import sys, runpy; sys.path[:0] = [{str(converter.parent)!r}, {str(converter.parent / 'gguf-py')!r}]; "
            f"import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", told, str(converter), str(hf), "--outtype", outtype, "--outfile", str(outfile)]
