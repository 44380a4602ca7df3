"""llama.cpp through llama-cpp-python: logits for a sequence (F32 KV cache by default, for parity) and timed
generation. llama.cpp's log output is silenced unless --verbose."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes import Generation, RuntimeSpec, decode_loop
from toolkit.core.errors import ToolkitError
from toolkit.core.fd_redirect import redirected


def _quiet(enabled: bool):
    """llama.cpp writes to the C-level stderr; point fd 2 at /dev/null while it loads."""
    return redirected(2) if enabled else contextlib.nullcontext()


# the named special tokens transformers passes to a chat template, and the GGUF keys holding their ids
SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                     "unk_token": "tokenizer.ggml.unknown_token_id", "sep_token": "tokenizer.ggml.seperator_token_id",
                     "pad_token": "tokenizer.ggml.padding_token_id", "cls_token": "tokenizer.ggml.cls_token_id",
                     "mask_token": "tokenizer.ggml.mask_token_id"}


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

    def logits_from(self, token_ids: list[int], start: int) -> np.ndarray:
        """[len(token_ids) - start, vocab]: one decode of the whole sequence with outputs asked for positions start..
        only (llama.cpp runs the output head for those alone, and hands them over in one block, without
        llama-cpp-python's copy of every position into Llama.scores)."""
        n = len(token_ids)
        if n > self.ctx:
            raise ToolkitError(f"{n} tokens exceed the context of {self.ctx}", "raise --ctx")
        if not 0 <= start < n:
            raise ValueError(f"start {start} outside 0..{n - 1}")
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        batch = llm._batch
        batch.set_batch(batch=list(token_ids), n_past=0, logits_all=False)
        for i in range(n):
            batch.batch.logits[i] = i >= start
        llm._ctx.decode(batch)
        rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=((n - start) * llm.n_vocab(),))
        out = rows.reshape(n - start, llm.n_vocab()).copy()
        llm.input_ids[:n] = token_ids
        llm.n_tokens = n
        return out

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def metadata(self, key: str) -> str | None:
        return self.llm.metadata.get(key)

    def detokenize_special(self, token: int) -> str:
        """One token's text with special tokens written out (`<|im_end|>`), as a chat template names them."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenize(text)

    def chat_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """The file's own Jinja (`tokenizer.chat_template`) rendered as transformers' apply_chat_template renders it,
        with the file's named special tokens as template variables; tokenized with special tokens parsed and no BOS
        added (apply_chat_template's tokenization)."""
        from toolkit.core.chat_render import TemplateError, render

        template = self.metadata("tokenizer.chat_template")
        if not template:
            raise ToolkitError(f"{self.path.name} has no tokenizer.chat_template", "drop --chat")
        special = {}
        for name, key in SPECIAL_TOKEN_IDS.items():
            token = self.metadata(key)
            if token is not None and 0 <= int(token) < self.llm.n_vocab():
                special[name] = self.detokenize_special(int(token))
        try:
            text = render(template, messages, add_generation_prompt=True, **special)
        except TemplateError as e:
            raise ToolkitError(f"the chat template of {self.path.name} cannot render this conversation: {e}",
                               "check the messages given to --chat") from None
        return self.tokenize(text, special=True), self.end_of_turn_ids()

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


def load(artifact, threads: int | None = 1, device: str = "cpu", ctx: int | None = 2048, verbose: bool = False,
         **_):
    if not Path(artifact).is_file():
        raise ToolkitError(f"{artifact} does not exist", "check the path")
    return LlamaCppRuntime(artifact, threads or 1, ctx or 2048, verbose=verbose)


# llama-cpp-python is built for the CPU here: GGUF rows run there whatever the baseline's device
SPECS = (RuntimeSpec("llama_cpp", "llama.cpp via llama-cpp-python (GGUF files)", "runtimes.llama_cpp", "llama_cpp",
                     lambda artifact: str(artifact).endswith(".gguf"), describe=lambda artifact: "gguf"),)
