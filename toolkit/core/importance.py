"""Per-column importance of each linear layer (llama.cpp's imatrix idea): the mean squared input activation of
every input column over calibration text, from the full-precision model. It weights the rounding error of that
column's weights (toolkit/core/ggml_grid.py): a weight multiplying a large activation matters more."""
from __future__ import annotations

import torch

from toolkit.core.bundle import ModelBundle


def input_energy(bundle: ModelBundle, ids: torch.Tensor, device: str = "cpu",
                 progress=lambda done, total: None) -> dict[str, torch.Tensor]:
    """Weight name -> [in] mean of x² over the calibration tokens `ids` [samples, seqlen] (decoder blocks' linear
    layers and a separate lm_head)."""
    from toolkit.core.model import build_model

    model = build_model(bundle, torch.float32, device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def add(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    linears = [(f"model.{n}.weight", m) for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not bundle.config.tie_word_embeddings:
        linears.append(("lm_head.weight", model.lm_head))
    handles = [m.register_forward_hook(hook(n)) for n, m in linears]
    try:
        with torch.no_grad():
            for k in range(ids.shape[0]):
                model(ids[k:k + 1].to(device))
                progress(k + 1, ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).cpu() for n in sums}
