"""What an MNN file's weights are, computed here, so the export is verified against the reference model run on the
very weights the file holds (as the GGUF export is), not on the fp32 ones.

Measured on MNN 3.6.1's converter (a one-MatMul graph fed an identity matrix reads the weights back):
- `--fp16` truncates every float constant toward zero (weights, norm weights, folded constants). We round the
  bundle's tensors to nearest ourselves first, so the file holds exactly the rounded values (truncating a value
  that is already fp16 changes nothing); RoPE's tables are runtime inputs, never constants.
- `--weightQuantBits B --weightQuantBlock G` (no other flag) is an asymmetric min/max grid per block of G input
  columns of each output row: scale = (max - min) / (2^B - 1), code = round((w - min) / scale), w' = code * scale +
  min, scales kept in fp32. (Its help text calls the default "symmetric"; the numbers say otherwise.)
- `--hqq` refines scales and offsets iteratively; that is not reproduced here (see exporters.mnn.verify).
At 8/4 bits only MatMul weights are converted (to Convolution) and quantized; norms stay fp32. The embedding table is not in the
graph at all: the runtime reads rows from a 16-bit file.
"""
from __future__ import annotations

import dataclasses

import torch

from toolkit.core.bundle import ModelBundle, TensorRef

EMBEDDING = "model.embed_tokens.weight"


def matmul_weights(bundle: ModelBundle) -> list[str]:
    """Names of the weights the graph multiplies by (what MNN quantizes), the head included."""
    names = [n for n, t in bundle.tensors.items() if len(t.shape) == 2 and n != EMBEDDING]
    if bundle.config.tie_word_embeddings:
        names.append(EMBEDDING)  # as the lm_head constant
    return names


def fp16_nearest(w: torch.Tensor) -> torch.Tensor:
    return w.float().half().float()


def mnn_block_grid(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """MNN's default weight quantization, dequantized: asymmetric min/max per block of `group_size` columns."""
    w = w.float()
    rows, cols = w.shape
    block = group_size or cols
    blocks = w.reshape(rows, cols // block, block)
    lo = blocks.amin(-1, keepdim=True)
    hi = blocks.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((blocks - lo) / safe), 0, qmax)
    return torch.where(scale > 0, codes * scale + lo, lo.expand_as(blocks)).reshape(rows, cols)


def _with(bundle: ModelBundle, changed: dict[str, TensorRef], untie: bool) -> ModelBundle:
    cfg = dataclasses.replace(bundle.config, tie_word_embeddings=False) if untie else bundle.config
    return ModelBundle(cfg, {**bundle.tensors, **changed}, bundle.tokenizer, dict(bundle.provenance))


def graph_bundle(bundle: ModelBundle, bits: int) -> ModelBundle:
    """The weights handed to the converter: for 16 bits all already rounded to fp16 (nearest), else as they are."""
    if bits != 16:
        return bundle
    return _with(bundle, {n: t.derive(fp16_nearest) for n, t in bundle.tensors.items()}, untie=False)


def file_bundle(bundle: ModelBundle, bits: int, group_size: int) -> ModelBundle:
    """The model the MNN folder computes: 16-bit embedding rows, and the head and every other MatMul weight as
    the converter stores it. A tied head is quantized apart from the embedding, so the result is untied."""
    tied = bundle.config.tie_word_embeddings
    changed: dict[str, TensorRef] = {}
    if bits == 16:
        changed = {n: t.derive(fp16_nearest) for n, t in bundle.tensors.items()}
    for name in matmul_weights(bundle):
        ref = bundle.tensors[name]
        fn = fp16_nearest if bits == 16 else (lambda w, b=bits: mnn_block_grid(w, b, group_size))
        target = "lm_head.weight" if (tied and name == EMBEDDING) else name
        changed[target] = ref.derive(fn, name=target)
    changed[EMBEDDING] = bundle.tensors[EMBEDDING].derive(fp16_nearest)
    return _with(bundle, changed, untie=tied)


def read_back(bundle: ModelBundle, flags: list[str], workdir) -> dict[str, torch.Tensor]:
    """The MatMul weights as MNN stores them, read out of MNN itself: every weight goes through the converter with
    the export's flags in a probe graph (identity @ W^T, one MatMul per weight) and is multiplied by the identity
    in MNN. Exact for any grid, HQQ's included; it costs one fp32 copy of the weights."""
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporters.mnn.converter import convert
    from toolkit.core.fd_redirect import redirected

    names = matmul_weights(bundle)
    widths = sorted({bundle.tensors[n].shape[-1] for n in names})
    nodes, inits, outputs = [], [], []
    for i, name in enumerate(names):
        w = bundle.load(name, torch.float32).numpy()
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"eye{w.shape[1]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [w.shape[1], w.shape[0]]))
    inputs = [helper.make_tensor_value_info(f"eye{k}", TensorProto.FLOAT, [k, k]) for k in widths]
    model = helper.make_model(helper.make_graph(nodes, "probe", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    workdir = Path(workdir)
    onnx.save_model(model, str(workdir / "probe.onnx"), save_as_external_data=True, location="probe.onnx.data")
    convert(workdir / "probe.onnx", workdir / "probe.mnn", flags)
    with redirected(1):  # MNN prints the CPU's feature flags to the C-level stdout on first import
        import MNN.expr as F
        import MNN.nn as nn
    module = nn.load_module_from_file(str(workdir / "probe.mnn"), [f"eye{k}" for k in widths],
                                      [f"y{i}" for i in range(len(names))])
    eyes = [F.const(np.eye(k, dtype=np.float32), [k, k], F.NCHW, F.float) for k in widths]
    got = module.forward(eyes)
    return {name: torch.from_numpy(np.array(v.read(), np.float32).T.copy()) for name, v in zip(names, got)}


def read_back_bundle(bundle: ModelBundle, flags: list[str], workdir) -> ModelBundle:
    """file_bundle's model, with the MatMul weights read back from MNN instead of computed here."""
    tied = bundle.config.tie_word_embeddings
    changed: dict[str, TensorRef] = {}
    for name, w in read_back(bundle, flags, workdir).items():
        target = "lm_head.weight" if (tied and name == EMBEDDING) else name
        changed[target] = TensorRef(target, tuple(w.shape), torch.float32, (lambda w=w: w))
    changed[EMBEDDING] = bundle.tensors[EMBEDDING].derive(fp16_nearest)
    return _with(bundle, changed, untie=tied)
