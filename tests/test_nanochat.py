"""NanoChat: checkpoints laid out as karpathy/nanochat writes them, held to an era-A forward pass written here from
nanochat's code description (raw keys, RoPE by -theta, QK-norm after RoPE, ReLU², softcap, F.rms_norm with
eps=None); the tiktoken-file tokenizer held to tiktoken itself; ONNX exports within 1e-4; GGUF refused.
(transformers' NanoChatForCausalLM as the oracle of the reference model: test_reference_model.py.)"""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtimes.onnxruntime import OnnxRuntime
from tests.conftest import assert_usage_error, run_cli
from tests.helpers import tiny_tokenizer
from toolkit.checkpoints import load_checkpoint
from toolkit.core.model import build_model
from toolkit.core.tiktoken_bpe import NANOCHAT_SPECIALS, NANOCHAT_SPLIT, _byte_chars

N_LAYER, N_HEAD, N_KV_HEAD, N_EMBD, SEQ_LEN = 2, 4, 2, 64, 64
TOL = 1e-4


def _ranks_from(tokenizer) -> dict[bytes, int]:
    """tiktoken mergeable ranks of a byte-level BPE: the 256 bytes, then each merge's token in merge order."""
    chars = {c: b for b, c in _byte_chars().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer.tok.to_str())["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(chars[c] for c in a + b)
        ranks.setdefault(token, len(ranks))
    return ranks


def _write_tiktoken(ranks: dict[bytes, int], file) -> None:
    file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def _era_a_state(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """nanochat's era-A state dict: wte in bf16, matrices fp32, vocab padded to a multiple of 64, torch.compile's
    `_orig_mod.` prefix as checkpoints of compiled models carry it."""
    g = torch.Generator().manual_seed(seed)
    padded = (vocab + 63) // 64 * 64
    kv = N_KV_HEAD * N_EMBD // N_HEAD
    rnd = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    state = {"transformer.wte.weight": rnd(padded, N_EMBD).to(torch.bfloat16), "lm_head.weight": rnd(padded, N_EMBD)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        state.update({p + "attn.c_q.weight": rnd(N_EMBD, N_EMBD), p + "attn.c_k.weight": rnd(kv, N_EMBD),
                      p + "attn.c_v.weight": rnd(kv, N_EMBD), p + "attn.c_proj.weight": rnd(N_EMBD, N_EMBD),
                      p + "mlp.c_fc.weight": rnd(4 * N_EMBD, N_EMBD), p + "mlp.c_proj.weight": rnd(N_EMBD, 4 * N_EMBD)})
    return {"_orig_mod." + k: v for k, v in state.items()}


def _era_a_logits(state: dict[str, torch.Tensor], vocab: int, ids: torch.Tensor) -> torch.Tensor:
    """Era-A GPT.forward on the raw keys (fp32 rotary tables)."""
    w = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    hd = N_EMBD // N_HEAD
    norm = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731  (eps=None, as nanochat calls it)
    t = torch.arange(ids.shape[1], dtype=torch.float32)
    freqs = torch.outer(t, 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)))
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rope(x):  # nanochat's apply_rotary_emb: the halves rotate by -theta
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], -1)

    B, T = ids.shape
    x = norm(F.embedding(ids, w["transformer.wte.weight"]))
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        h = norm(x)
        q = (h @ w[p + "attn.c_q.weight"].T).view(B, T, N_HEAD, hd)
        k = (h @ w[p + "attn.c_k.weight"].T).view(B, T, N_KV_HEAD, hd)
        v = (h @ w[p + "attn.c_v.weight"].T).view(B, T, N_KV_HEAD, hd)
        q, k = norm(rope(q)), norm(rope(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + y.transpose(1, 2).reshape(B, T, N_EMBD) @ w[p + "attn.c_proj.weight"].T
        x = x + F.relu(norm(x) @ w[p + "mlp.c_fc.weight"].T).square() @ w[p + "mlp.c_proj.weight"].T
    logits = (norm(x) @ w["lm_head.weight"].T)[..., :vocab]
    return 15 * torch.tanh(logits / 15)


@pytest.fixture(scope="module")
def nanochat_dir(tmp_path_factory):
    """base_dir/base_checkpoints/d2 with steps 100 and 200, and base_dir/tokenizer/tokenizer.tiktoken."""
    base = tmp_path_factory.mktemp("nanochat")
    folder = base / "base_checkpoints" / "d2"
    folder.mkdir(parents=True)
    ranks = _ranks_from(tiny_tokenizer())
    (base / "tokenizer").mkdir()
    _write_tiktoken(ranks, base / "tokenizer" / "tokenizer.tiktoken")
    vocab = len(ranks) + len(NANOCHAT_SPECIALS)
    states = {}
    for step in (100, 200):
        states[step] = _era_a_state(vocab, seed=step)
        torch.save(states[step], folder / f"model_{step:06d}.pt")
        meta = {"step": step, "val_bpb": 1.0, "model_config": {"sequence_len": SEQ_LEN, "vocab_size": vocab,
                                                               "n_layer": N_LAYER, "n_head": N_HEAD,
                                                               "n_kv_head": N_KV_HEAD, "n_embd": N_EMBD}}
        (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return folder, states, vocab


def test_checkpoint_loads_as_nanochat_computes_it(nanochat_dir):
    folder, states, vocab = nanochat_dir
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    for step, bundle in ((200, load_checkpoint(folder)), (100, load_checkpoint(folder, step=100)),
                         (100, load_checkpoint(folder / "model_000100.pt"))):
        assert bundle.provenance["step"] == step and bundle.config.vocab_size == vocab
        with torch.no_grad():
            ours = build_model(bundle)(ids)
            ref = _era_a_logits(states[step], vocab, ids)
        assert ref.abs().max() > 1.0
        assert (ours - ref).abs().max().item() <= TOL
    assert load_checkpoint(folder).tokenizer.bos_id == vocab - len(NANOCHAT_SPECIALS)  # <|bos|> after the ranks


@pytest.mark.parametrize("variant", ["portable", "ort"])
def test_onnx_export_of_a_nanochat_checkpoint(nanochat_dir, variant, tmp_path):
    folder, states, vocab = nanochat_dir
    out = tmp_path / "onnx"
    proc = run_cli("export", "onnx", folder, "-o", out, "--variant", variant)
    assert proc.returncode == 0, proc.stderr[-2000:]  # self-verified: prefill + 16 cached steps within 1e-4
    assert json.loads((out / "manifest.json").read_text())["verification"]["max_abs_diff"] <= TOL
    ids = torch.randint(0, vocab, (1, 48), generator=torch.Generator().manual_seed(1))
    ours = OnnxRuntime(out).logits(ids[0].tolist())
    ref = _era_a_logits(states[200], vocab, ids)[0].numpy()
    assert float(np.abs(ours - ref).max()) <= TOL


def test_gguf_is_refused_with_the_reason(nanochat_dir, tmp_path):
    dest = tmp_path / "m.gguf"
    proc = run_cli("export", "gguf", nanochat_dir[0], "-o", dest)
    last = assert_usage_error(proc, dest)
    assert "ReLU²" in last and "softcap" in last


def test_bad_nanochat_inputs_exit_2(nanochat_dir, tmp_path):
    folder, states, vocab = nanochat_dir
    assert "steps there: 100, 200" in assert_usage_error(run_cli("info", folder, "--step", "150"))
    # a later era's keys
    later = tmp_path / "later"
    later.mkdir()
    torch.save({**states[100], "resid_lambdas": torch.ones(N_LAYER)}, later / "model_000100.pt")
    (later / "meta_000100.json").write_text((folder / "meta_000100.json").read_text())
    (later / "tokenizer.json").write_text(tiny_tokenizer().tok.to_str())
    assert "later NanoChat era" in assert_usage_error(run_cli("info", later))
    # only the pickled tokenizer
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("model_000100.pt", "meta_000100.json"):
        (pickled / name).write_bytes((folder / name).read_bytes())
    (pickled / "tokenizer.pkl").write_bytes(b"not unpickled")
    assert "tokenizer.tiktoken" in assert_usage_error(run_cli("info", pickled))


def test_tiktoken_file_encodes_as_tiktoken(tmp_path):
    """The tokenizer built from a tiktoken BPE file gives tiktoken's ids (tiktoken as the oracle, built locally
    from the same ranks and nanochat's split pattern) on the whole embedded corpus and on mixed scripts."""
    tiktoken = pytest.importorskip("tiktoken")
    from toolkit.app.corpus import default_corpus
    from toolkit.core.tiktoken_bpe import nanochat_tokenizer
    from toolkit.core.tokenizer import Tokenizer

    text = default_corpus()
    ranks = _ranks_from(Tokenizer.train_bpe([text[: len(text) // 2]], 1500))
    specials = {s: len(ranks) + i for i, s in enumerate(NANOCHAT_SPECIALS)}
    enc = tiktoken.Encoding("nanochat-test", pat_str=NANOCHAT_SPLIT, mergeable_ranks=ranks, special_tokens=specials)
    _write_tiktoken(ranks, tmp_path / "tokenizer.tiktoken")
    ours = nanochat_tokenizer(tmp_path / "tokenizer.tiktoken")
    assert ours.encode(text, add_bos=False) == enc.encode_ordinary(text)
    mixed = "Ünïcode 中文 🎉 3.14159 don't<|bos|>  \n\n x"
    assert ours.tok.encode(mixed).ids == enc.encode(mixed, allowed_special="all")
    assert ours.decode(ours.encode(mixed, add_bos=False)) == mixed


def test_train_nanochat_and_export(tmp_path):
    out = tmp_path / "nc"
    proc = run_cli("train", "--arch", "nanochat", "-o", out, "--hidden", "64", "--layers", "2", "--heads", "4",
                   "--kv-heads", "2", "--steps", "20", "--seq-len", "64", "--batch-size", "4", "--vocab-size", "512",
                   "--eval-every", "20", "--warmup", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and cfg["intermediate_size"] == 256 and not cfg["tie_word_embeddings"]
    assert cfg["final_logit_softcapping"] == 15.0
    proc = run_cli("export", "onnx", out, "-o", tmp_path / "onnx", "--variant", "ort")
    assert proc.returncode == 0, proc.stderr[-2000:]
