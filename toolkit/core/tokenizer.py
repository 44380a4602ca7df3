"""Tokenizer: Hugging Face `tokenizers` plus the tokenizer_config facts (special tokens, BOS rule, chat template).

Trains MiniMind's recipe (byte-level BPE with the GPT-2 split regex) and loads any tokenizer.json, including the real
MiniMind tokenizers. Chat templates render in a sandboxed Jinja environment, as transformers does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from toolkit.core.errors import ToolkitError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # MiniMind's ids 0, 1, 2: pad/unk, bos, eos

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None):
        self.tok = tok
        self.config = dict(config or {})

    # --- facts -------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # {"content": ..., ...} form of older tokenizer_config files
            value = value.get("content")
        return None if value is None else self.tok.token_to_id(value)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def add_bos(self) -> bool:
        """Whether encoding puts BOS first: tokenizer_config's add_bos_token when it says, else the tokenizer.json
        post-processor's template (Llama-3 says it only there: TemplateProcessing `<|begin_of_text|> $A`), as
        transformers encodes."""
        if "add_bos_token" in self.config or self.bos_id is None:
            return bool(self.config.get("add_bos_token", False))
        bos = self.tok.id_to_token(self.bos_id)
        post = json.loads(self.tok.to_str()).get("post_processor") or {}
        steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
        for step in steps:
            if step.get("type") == "TemplateProcessing":
                first = (step.get("single") or [{}])[0]
                return first.get("SpecialToken", {}).get("id") == bos
        return False

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def kind(self) -> str:
        return json.loads(self.tok.to_str())["model"]["type"]

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end generation: eos plus the chat end-of-turn marker when the vocabulary has one."""
        ids = [i for i in (self.eos_id, self.tok.token_to_id("<|im_end|>"), self.tok.token_to_id("<|endoftext|>"))
               if i is not None]
        return list(dict.fromkeys(ids))

    # --- use ---------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, self.config.get("bos_token"),
                                    self.config.get("eos_token"), add_generation_prompt)

    # --- files -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ToolkitError(f"no tokenizer.json in {path}",
                               "pass --tokenizer DIR with tokenizer.json (+ tokenizer_config.json); a SentencePiece "
                               "tokenizer.model can be turned into one with transformers' AutoTokenizer.save_pretrained")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses on malformed files
            raise ToolkitError(f"cannot read tokenizer {file}: {e}", "is it a Hugging Face tokenizer.json?") from None
        cfg_file = file.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ToolkitError(f"cannot parse {cfg_file}: {e}", "fix or remove the file") from None
        template_file = file.parent / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(tok, config)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        self.tok.save(str(out / "tokenizer.json"))
        cfg = {k: v for k, v in self.config.items() if k != "added_tokens_decoder"}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE with the GPT-2 split regex: MiniMind's tokenizer recipe."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ToolkitError(f"vocabulary size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} "
                               "special tokens", "use --vocab-size 512 or more")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
                  "model_max_length": 32768, "clean_up_tokenization_spaces": False,
                  "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE}
        return cls(tok, config)


def render_chat_template(template: str | None, messages: list[dict[str, str]], bos: str | None, eos: str | None,
                         add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template as transformers does (toolkit/core/chat_render.py)."""
    from toolkit.core.chat_render import TemplateError, render

    if not template:
        raise ToolkitError("this model has no chat template", "drop --chat, or add chat_template to "
                                                              "tokenizer_config.json")
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    try:
        return render(template, messages, add_generation_prompt, **special)
    except TemplateError as e:
        raise ToolkitError(f"chat template error: {e}", "check the messages given to --chat") from None
