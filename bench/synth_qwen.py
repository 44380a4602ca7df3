"""A synthetic checkpoint of Qwen2.5-0.5B's shape (Hugging Face layout, bf16, random weights) for scale benchmarks.

Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads of 64, 2 KV heads, FFN 4864, vocab 151,936, biases on q/k/v, tied
embeddings -> 494,032,768 parameters (the real model's count). Its tokenizer: Qwen3's as the model ships it
(../shared/data/real-tokenizers/qwen3: the same byte-level BPE and 151,643 regular tokens as Qwen2.5's).
Random weights say nothing of quantization quality; this model is for time and memory at the real shape.

    python bench/synth_qwen.py OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = ROOT.parent / "shared" / "data" / "real-tokenizers" / "qwen3"
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151_936)


def write(out: Path, tokenizer: Path = QWEN_TOKENIZER, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    H, L, NH, NKV, I, V = (SHAPE[k] for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab"))
    hd = H // NH
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    # embeddings wider than the 0.02 of the layers, so the tied head gives peaked (not uniform) distributions
    sd = {"model.embed_tokens.weight": rnd(V, H, std=0.08), "model.norm.weight": ones(H)}
    for i in range(L):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = rnd(NH * hd, H)
        sd[pre + "self_attn.q_proj.bias"] = rnd(NH * hd)
        sd[pre + "self_attn.k_proj.weight"] = rnd(NKV * hd, H)
        sd[pre + "self_attn.k_proj.bias"] = rnd(NKV * hd)
        sd[pre + "self_attn.v_proj.weight"] = rnd(NKV * hd, H)
        sd[pre + "self_attn.v_proj.bias"] = rnd(NKV * hd)
        sd[pre + "self_attn.o_proj.weight"] = rnd(H, NH * hd)
        sd[pre + "mlp.gate_proj.weight"] = rnd(I, H)
        sd[pre + "mlp.up_proj.weight"] = rnd(I, H)
        sd[pre + "mlp.down_proj.weight"] = rnd(H, I)
        sd[pre + "input_layernorm.weight"] = ones(H)
        sd[pre + "post_attention_layernorm.weight"] = ones(H)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=H, num_hidden_layers=L,
               num_attention_heads=NH, num_key_value_heads=NKV, intermediate_size=I, vocab_size=V,
               rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True,
               hidden_act="silu", torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643,
               sliding_window=32768, max_window_layers=24, use_sliding_window=False, attention_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    n = sum(t.numel() for t in sd.values())
    print(f"{n:,} parameters written to {out}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    write(ap.parse_args().out)
