"""NanoChat checkpoints as karpathy/nanochat's checkpoint_manager writes them.

A folder (`base_checkpoints/d20`, `chatsft_checkpoints/d20`, ...) of `model_{step:06d}.pt` (the state dict, read with
weights_only=True) and `meta_{step:06d}.json` (`model_config`: sequence_len, vocab_size, n_layer, n_head,
n_kv_head, n_embd); the latest step unless `--step` names one, or a `model_*.pt` file given directly.

Era A (the original release, 2025-10 to 2026-01: RoPE base 1e4, softcap 15) is what transformers' NanoChat computes
and what is loaded here. Later eras add value embeddings, residual lambdas, sliding windows and smear; their keys are
recognised and refused, since computing them as era A would give wrong numbers.

The tokenizer: `--tokenizer` (a tiktoken BPE file or a folder with tokenizer.json), else a tokenizer.json or
tokenizer.tiktoken beside the checkpoint, in its `tokenizer/` or in nanochat's `<base_dir>/tokenizer/`. The
pickled tokenizer.pkl is refused with a recipe for the tiktoken file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from toolkit.checkpoints.sources import load_torch_state, refs_from_state
from toolkit.core.arch import NANOCHAT_EPS, ArchConfig
from toolkit.core.bundle import ModelBundle, TensorRef
from toolkit.core.errors import ToolkitError
from toolkit.core.tiktoken_bpe import PICKLE_HINT, nanochat_tokenizer
from toolkit.core.tokenizer import Tokenizer

MODEL_FILE = re.compile(r"^model_(\d+)\.pt$")
ERA_A = {"rope_theta": 1e4, "logit_softcap": 15.0}
NAMES = [  # era A key -> Hugging Face NanoChat name
    (r"^transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.c_q\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.c_k\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.c_v\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc\.weight$", r"model.layers.\1.mlp.fc1.weight"),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.weight$", r"model.layers.\1.mlp.fc2.weight"),
]
LATER_ERAS = {  # key fragment -> what it is (eras B-D)
    "resid_lambdas": "residual lambdas", "x0_lambdas": "x0 lambdas", "value_embeds": "value embeddings",
    "ve_gate": "value-embedding gates", "smear_": "smear", "backout_lambda": "backout",
}


def _steps(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): f for f in folder.glob("model_*.pt") if (m := MODEL_FILE.match(f.name))}


def detect(path: Path) -> bool:
    if path.is_file():
        m = MODEL_FILE.match(path.name)
        return bool(m) and (path.parent / f"meta_{m.group(1)}.json").is_file()
    return path.is_dir() and any(path.glob("meta_*.json")) and bool(_steps(path))


def load(path: Path, overrides: dict[str, Any]) -> ModelBundle:
    folder, model_file, step = _pick_step(path, overrides.get("step"))
    meta_file = folder / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        mc = meta["model_config"]
        n_layer, n_head, n_embd = int(mc["n_layer"]), int(mc["n_head"]), int(mc["n_embd"])
        n_kv_head, vocab, seq_len = int(mc.get("n_kv_head", n_head)), int(mc["vocab_size"]), int(mc["sequence_len"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ToolkitError(f"cannot read the model config in {meta_file}: {e}",
                           "expected nanochat's meta_<step>.json with model_config") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in load_torch_state(model_file).items()}
    later = sorted({what for k in state for frag, what in LATER_ERAS.items() if frag in k})
    if later:
        raise ToolkitError(f"{model_file.name} is from a later NanoChat era ({', '.join(later)}); only era A "
                           "(the original release, as transformers' NanoChat computes it) is supported",
                           "export a checkpoint trained with nanochat before 2026-01-11, or train one with "
                           "`toolkit train --arch nanochat`")
    refs = _rename(refs_from_state(state), model_file)
    if n_embd % n_head:
        raise ToolkitError(f"{n_head} heads do not divide n_embd {n_embd}", f"check {meta_file.name}")
    fc1 = refs.get("model.layers.0.mlp.fc1.weight")
    config = ArchConfig(family="nanochat", vocab_size=vocab, hidden_size=n_embd, num_layers=n_layer,
                        num_heads=n_head, num_kv_heads=n_kv_head, head_dim=n_embd // n_head,
                        intermediate_size=fc1.shape[0] if fc1 else 4 * n_embd, rms_norm_eps=NANOCHAT_EPS,
                        rope_theta=ERA_A["rope_theta"], max_position_embeddings=10 * seq_len,
                        tie_word_embeddings=False, logit_softcap=ERA_A["logit_softcap"],
                        extra={"nanochat_step": step, "nanochat_era": "A"})
    # since nanochat f1bf69d the embedding and head are padded to a multiple of 64 rows and the logits sliced:
    # the padding rows are never looked up or scored, so they are dropped
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ref = refs.get(name)
        if ref is not None and ref.shape[0] > vocab:
            refs[name] = ref.derive(lambda t: t[:vocab].contiguous(), (vocab, ref.shape[1]))
    tokenizer = _tokenizer(folder, overrides.get("tokenizer"))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    return ModelBundle(config, refs, tokenizer, {"format": "nanochat", "era": "A", "step": step,
                                                 "path": str(model_file)})


def _pick_step(path: Path, step: int | None) -> tuple[Path, Path, int]:
    if path.is_file():
        given = int(MODEL_FILE.match(path.name).group(1))
        if step is not None and step != given:
            raise ToolkitError(f"--step {step} contradicts the file {path.name}", "pass the folder with --step, "
                                                                                  "or the file alone")
        return path.parent, path, given
    steps = _steps(path)
    chosen = max(steps) if step is None else step
    if chosen not in steps or not (path / f"meta_{chosen:06d}.json").is_file():
        raise ToolkitError(f"{path} has no step {chosen} (model_{chosen:06d}.pt + meta_{chosen:06d}.json)",
                           f"steps there: {', '.join(str(s) for s in sorted(steps))}")
    return path, steps[chosen], chosen


def _rename(refs: dict[str, TensorRef], file: Path) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        for pattern, target in NAMES:
            if re.match(pattern, name):
                new = re.sub(pattern, target, name)
                out[new] = ref.renamed(new)
                break
        else:
            raise ToolkitError(f"{file.name} has a tensor NanoChat era A does not: {name}",
                               "is it a nanochat checkpoint? other formats are detected by their own loaders")
    return out


def _tokenizer(folder: Path, given: str | Path | None) -> Tokenizer:
    if given is not None:
        given = Path(given)
        if given.is_file() and given.suffix != ".json":
            return nanochat_tokenizer(given)
        return Tokenizer.from_dir(given)
    places = [folder, folder / "tokenizer", folder.parent.parent / "tokenizer"]
    for place in places:
        if (place / "tokenizer.json").is_file():
            return Tokenizer.from_dir(place)
        if (place / "tokenizer.tiktoken").is_file():
            return nanochat_tokenizer(place / "tokenizer.tiktoken")
    if any((place / "tokenizer.pkl").is_file() for place in places):
        raise ToolkitError("only a pickled tokenizer (tokenizer.pkl) was found for this NanoChat checkpoint",
                           PICKLE_HINT)
    raise ToolkitError(f"no tokenizer found for {folder}", "pass --tokenizer with a tiktoken BPE file or a folder "
                                                           "with tokenizer.json; " + PICKLE_HINT)


