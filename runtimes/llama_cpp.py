"""llama.cpp through llama-cpp-python: logits for a sequence (F32 KV cache by default, for parity) and timed
generation. llama.cpp's log output is silenced unless --verbose."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes import Generation, decode_loop
from toolkit.errors import ToolkitError
from toolkit.fd_redirect import redirected


def _quiet(enabled: bool):
    """llama.cpp writes to the C-level stderr; point fd 2 at /dev/null while it loads."""
    return redirected(2) if enabled else contextlib.nullcontext()


class LlamaCppRuntime:
    name = "llama_cpp"

    def __init__(self, path: str | Path, threads: int = 1, ctx: int = 2048, f32_kv: bool = True,
                 verbose: bool = False):
        import llama_cpp

        self.path = Path(path)
        kv = llama_cpp.GGML_TYPE_F32 if f32_kv else llama_cpp.GGML_TYPE_F16
        with _quiet(not verbose):
            try:
                self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                                           n_threads=threads, n_threads_batch=threads, logits_all=True,
                                           type_k=kv, type_v=kv, verbose=verbose)
            except ValueError as e:
                raise ToolkitError(f"llama.cpp cannot load {self.path.name}: {e}",
                                   "rerun with --verbose to see llama.cpp's reason") from None
        self.ctx = ctx
        self.label = f"llama.cpp {self.path.name}"

    def logits(self, token_ids: list[int]) -> np.ndarray:
        if len(token_ids) > self.ctx:
            raise ToolkitError(f"{len(token_ids)} tokens exceed the context of {self.ctx}", "raise --ctx")
        self.llm.reset()
        self.llm.eval(token_ids)
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def metadata(self, key: str) -> str | None:
        return self.llm.metadata.get(key)

    def end_of_turn_ids(self) -> list[int]:
        ids = [self.llm.token_eos()]
        eot = self.metadata("tokenizer.ggml.eot_token_id")
        if eot is not None:
            ids.append(int(eot))
        return list(dict.fromkeys(i for i in ids if i is not None and i >= 0))

    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(token_ids)
        nxt = sampler(np.asarray(self.llm.scores[len(token_ids) - 1]))
        t1 = time.perf_counter()

        def step(token: int) -> np.ndarray:
            self.llm.eval([token])
            return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

        out, stopped = decode_loop(nxt, step, sampler, max_new_tokens, stop_ids, on_token)
        return Generation(out, t1 - t0, time.perf_counter() - t1, len(token_ids), stopped)


def load(artifact, threads: int | None = 1, device: str = "cpu", ctx: int = 2048, verbose: bool = False, **_):
    return LlamaCppRuntime(artifact, threads or 1, ctx, verbose=verbose)
