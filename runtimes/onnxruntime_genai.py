"""onnxruntime-genai: how ONNX decoders are deployed on devices. Runs any folder with a genai_config.json (the
`--variant ort` exports and their int8/int4 forms, onnxruntime-genai's own model builder's folders) through
`og.Model` / `og.Generator`: genai keeps the KV cache and runs the graph as it would on the device.

Chosen by name (`--runtime onnxruntime_genai`): plain ONNX Runtime opens the same folders by default. eval-parity
scores such folders in both, as two rows (`beside`).
Its telemetry events are switched off before a model is opened.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes import Generation, RuntimeSpec, TokenizerText, decode_loop
from toolkit.core import manifest
from toolkit.core.errors import ToolkitError

CONFIG_FILE = "genai_config.json"


class GenaiRuntime(TokenizerText):
    name = "onnxruntime_genai"

    def __init__(self, folder, threads: int = 1, device: str = "cpu"):
        import onnxruntime_genai as og

        og.disable_telemetry_events()
        self.og, self.dir = og, Path(folder)
        if not (self.dir / CONFIG_FILE).is_file():
            raise ToolkitError(f"no {CONFIG_FILE} in {self.dir}", "export with `toolkit export onnx --variant ort`")
        config = og.Config(str(self.dir))
        session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        config.clear_providers()
        if device == "cuda":
            if not og.is_cuda_available():
                raise ToolkitError("this onnxruntime-genai has no CUDA support", "install onnxruntime-genai-cuda, or "
                                                                                 "use --device cpu")
            config.append_provider("cuda")
        try:
            self.model = og.Model(config)
        except Exception as e:  # genai raises plain exceptions for folders it cannot run
            raise ToolkitError(f"onnxruntime-genai cannot load {self.dir}: {str(e).splitlines()[0][:300]}",
                               "re-export with `toolkit export onnx --variant ort`") from None
        self.context = int(json.loads((self.dir / CONFIG_FILE).read_text())["model"]["context_length"])
        meta = manifest.read(self.dir) or {}  # a folder of another tool's has none
        self.label = (f"onnxruntime-genai {meta.get('details', {}).get('variant', '')} {meta.get('dtype', '')} "
                      f"{device}").replace("  ", " ")

    def _generator(self, total: int):
        if total > self.context:
            raise ToolkitError(f"{total} tokens exceed the folder's context_length {self.context}",
                               "score shorter chunks (--ctx) or re-export with a longer context")
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=total)
        return self.og.Generator(self.model, params)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[len(token_ids), vocab]: the whole prompt in one append, every position's logits."""
        generator = self._generator(len(token_ids))
        generator.append_tokens(np.asarray(token_ids, np.int32))
        return np.array(generator.get_output("logits"), np.float32)[0]

    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        """Our sampler over genai's logits (the same tokens as every other runtime for a given sampler); genai
        holds the cache, one append per new token."""
        generator = self._generator(len(token_ids) + max_new_tokens)

        def feed(ids: list[int]) -> np.ndarray:
            generator.append_tokens(np.asarray(ids, np.int32))
            return np.array(generator.get_logits(), np.float32).reshape(-1)

        t0 = time.perf_counter()
        first = sampler(feed(list(token_ids)))
        t1 = time.perf_counter()
        out, stopped = decode_loop(first, lambda token: feed([token]), sampler, max_new_tokens, stop_ids, on_token)
        return Generation(out, t1 - t0, time.perf_counter() - t1, len(token_ids), stopped)

    def genai_ids(self, text: str) -> list[int]:
        """genai's own tokenizer (what runs on the device), for the check that it agrees with tokenizer.json's."""
        return [int(t) for t in self.og.Tokenizer(self.model).encode(text)]


def load(artifact, threads: int | None = None, device: str = "cpu", **_):
    return GenaiRuntime(artifact, threads or 1, device)


def _is_genai_folder(artifact) -> bool:
    return Path(artifact).is_dir() and (Path(artifact) / CONFIG_FILE).is_file()


def _describe(artifact) -> str:
    info = manifest.read(artifact) or {}
    return f"onnx-genai {info.get('details', {}).get('variant', '')} {info.get('dtype', '')}".strip()


def _on_cuda() -> bool:
    import onnxruntime_genai as og

    return og.is_cuda_available()


SPECS = (RuntimeSpec("onnxruntime_genai", "onnxruntime-genai (folders with genai_config.json)",
                     "runtimes.onnxruntime_genai", "onnxruntime_genai", _is_genai_folder, describe=_describe,
                     on_cuda=_on_cuda, beside=True),)
