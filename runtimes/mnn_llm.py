"""MNN's own LLM engine (the C++ `Llm` of llm_demo and the MNN Chat app, as the wheel's `MNN.llm`) over the
folders `toolkit export mnn` writes (`--layout engine`) and those of MNN's llmexport: the engine keeps the KV cache
and runs its fused attention, as it would on a phone.

Opened through the `mnn` runtime (runtimes/mnn.py picks this class for a folder with llm_config.json). Logits of
every position come from `all_logits`; tokens are chosen by the caller's sampler (the engine's own sampler is not
used, so every runtime gives the same tokens for a given sampler). Text in and out goes through the folder's
tokenizer.json where it has one (the toolkit's exports carry it, checked against tokenizer.mtok); a folder as MNN's
llmexport writes it has only MNN's own tokenizer.mtok, and then the engine's tokenizer encodes prompts and decodes
tokens (eval-parity's token check compares those ids with the checkpoint's); chat prompts need tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtimes import SteppedRun, TokenizerText
from toolkit.core import manifest
from toolkit.core.errors import ToolkitError
from toolkit.core.fd_redirect import redirected

ENGINE_CONFIG = "config.json"
MODEL_CONFIG = "llm_config.json"


def is_engine_folder(artifact) -> bool:
    p = Path(artifact)
    folder = p.parent if p.name == ENGINE_CONFIG else p
    return folder.is_dir() and (folder / MODEL_CONFIG).is_file() and (folder / ENGINE_CONFIG).is_file()


def weight_bits(folder: Path, meta: dict | None) -> int | str:
    """The weight bits of an MNN folder: the toolkit's manifest (`meta`) says them; a folder of MNN's llmexport has
    them in its export_args.json; '?' where neither does."""
    if meta:
        return (meta.get("quantization") or {}).get("bits", 16)
    try:
        return int(json.loads((folder / "export_args.json").read_text())["quant_bit"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


class MnnLlmRuntime(SteppedRun, TokenizerText):
    name = "mnn"

    def __init__(self, artifact, threads: int = 1, memory_mode: str | None = None):
        p = Path(artifact)
        self.dir = p.parent if p.name == ENGINE_CONFIG else p
        if not is_engine_folder(self.dir):
            raise ToolkitError(f"{self.dir} is not an MNN LLM-engine folder (no {MODEL_CONFIG} + {ENGINE_CONFIG})",
                               "export one with `toolkit export mnn`")
        with redirected(1):  # the engine prints the CPU's features and its load steps to the C-level stdout
            import MNN.llm as llm

            self.llm = llm.create(str(self.dir / ENGINE_CONFIG))
            overrides = {"thread_num": threads, "all_logits": True, "backend_type": "cpu"}
            if memory_mode:
                overrides["memory"] = memory_mode
            self.llm.set_config(overrides)
            loaded = self.llm.load()
        if loaded is False:
            raise ToolkitError(f"MNN's engine cannot load {self.dir}", "export it again with `toolkit export mnn`")
        engine = json.loads((self.dir / ENGINE_CONFIG).read_text())
        self.memory = memory_mode or engine.get("memory", "normal")
        bits = weight_bits(self.dir, manifest.read(self.dir))
        self.label = f"MNN.llm {self.dir.name} ({bits}-bit, {self.memory} memory)"
        # a folder as MNN's llmexport writes it has no tokenizer.json: text goes through the engine's tokenizer
        self.engine_text_only = not (self.dir / "tokenizer.json").is_file()

    # --- the engine's own text, for the export's checks ---
    def engine_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenizer_encode(text)]

    def engine_chat(self, messages: list[dict[str, str]]) -> str:
        return self.llm.apply_chat_template(messages)

    # --- Text: the folder's tokenizer.json, else the engine's own tokenizer (a folder of MNN's llmexport) ---
    def prompt_ids(self, text: str) -> list[int]:
        return self.engine_ids(text) if self.engine_text_only else super().prompt_ids(text)

    def detokenize(self, ids: list[int]) -> str:
        if self.engine_text_only:
            return "".join(self.llm.tokenizer_decode(int(i)) for i in ids)
        return super().detokenize(ids)

    def text_tokenizer(self):
        if self.engine_text_only:
            raise ToolkitError(f"{self.dir} has no tokenizer.json (only MNN's tokenizer.mtok), which chat prompts "
                               "need", "copy the model's tokenizer.json and tokenizer_config.json into the folder")
        return super().text_tokenizer()

    # --- Stepping: the engine's cache ---
    def reset(self) -> None:
        self.llm.reset()

    def step(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] of these tokens after the ones already in the engine's cache."""
        out = self.llm.forward([int(t) for t in token_ids])
        return np.array(out.read(), dtype=np.float32).reshape(len(token_ids), -1)
