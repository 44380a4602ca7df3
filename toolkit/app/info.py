"""`toolkit info`: what a checkpoint is, as a JSON-able report and as the rows the console prints."""
from __future__ import annotations

from pathlib import Path

from toolkit.core import rope


def describe(bundle, ckpt: Path) -> tuple[dict, list[tuple[str, str]]]:
    cfg, tok = bundle.config, bundle.tokenizer
    size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file()) if Path(ckpt).is_dir() \
        else Path(ckpt).stat().st_size
    report = {
        "path": str(ckpt), "format": bundle.provenance.get("format"), "era": bundle.provenance.get("era"),
        "arch": cfg.family, "description": cfg.fam.description, "hf_class": cfg.fam.hf_architecture,
        "parameters": bundle.num_parameters(), "dtypes": bundle.dtypes(), "size_bytes": size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "stored_types": bundle.provenance.get("gguf_tensor_types"),  # a GGUF's block types (read dequantized)
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "family")},
        "tokenizer": {"type": tok.kind, "vocab_size": tok.vocab_size, "bos": tok.bos_id, "eos": tok.eos_id,
                      "pad": tok.pad_id, "add_bos": tok.add_bos, "chat_template": bool(tok.chat_template)},
    }
    rows = [("path", report["path"]), ("format", f"{report['format']}" + (f" (era {report['era']})"
                                                                          if report["era"] else "")),
            ("arch", f"{cfg.family}: {cfg.fam.description}"),
            ("parameters", f"{report['parameters']:,} ({report['parameters'] / 1e6:.2f}M)"),
            ("dtype", ", ".join(f"{k} {v:,}" for k, v in report["dtypes"].items())
             + (f" (dequantized from GGUF {', '.join(report['stored_types'])})" if report["stored_types"] else "")),
            ("size", f"{size / 1e6:.1f} MB"),
            ("shape", f"hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
                      f"(head_dim {cfg.head_dim}), ffn {cfg.intermediate_size or cfg.moe_intermediate_size}, "
                      f"vocab {cfg.vocab_size}"),
            ("rope / norm", f"{rope.describe(cfg)}, rms eps {cfg.rms_norm_eps:g}"),
            ("tied embeddings", str(cfg.tie_word_embeddings)),
            ("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}, "
                          f"add_bos {tok.add_bos}, chat template {'yes' if tok.chat_template else 'no'}")]
    if cfg.fam.moe:
        rows.insert(5, ("experts", f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}"
                                   + (f", shared {cfg.shared_expert_intermediate_size}" if cfg.fam.shared_expert
                                      else "")))
    return report, rows
