"""GPTQ on llama.cpp's own grids (issue 21): the bytes we pack are what llama.cpp's and gguf-py's dequantization
read back exactly, the per-tensor types are llama-quantize's, the codes survive `export gguf` unchanged, and the
verifier still catches a file whose codes sit in the wrong rows."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from quant.gptq import Hessian, gptq_on_grid
from tests.conftest import assert_usage_error, run_cli
from toolkit.core import ggml_grid

pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("qtype", ggml_grid.TYPES)
def test_packed_blocks_read_back_exactly_by_gguf_py(qtype):
    """Round-to-nearest and GPTQ codes on each grid: gguf-py's dequantization of the packed bytes equals the grid's
    values bit for bit, and the byte count is the type's."""
    import gguf

    torch.manual_seed(0)
    W = torch.randn(48, 512) * 0.03
    W[3, :40] = 0  # an all-zero sub-block
    W[5, 7] = 0.9  # an outlier
    x = torch.randn(600, 512) * (torch.rand(512) * 2)
    h = Hessian(512)
    h.add(x)
    grid = ggml_grid.solve(W, qtype, torch.diag(h.H))
    for codes in (grid.codes(W), gptq_on_grid(W, h.H, grid)[0]):
        packed = ggml_grid.pack(grid, codes)
        assert packed.shape == gguf.quants.quant_shape_to_byte_shape(W.shape, ggml_grid.ggml_type(qtype))
        back = ggml_grid.dequantize_blocks(packed, qtype, tuple(W.shape))
        assert torch.equal(back, grid.values(codes))
    # GPTQ lowers the output error X(W - Ŵ) against round-to-nearest on the same grid
    rtn_err = (x @ (W - grid.values(grid.codes(W))).T).pow(2).mean()
    gptq_err = (x @ (W - grid.values(gptq_on_grid(W, h.H, grid)[0])).T).pow(2).mean()
    assert gptq_err < 0.9 * rtn_err, (float(gptq_err), float(rtn_err))


def test_q4_k_search_is_llama_cpps(trained_model, tmp_path):
    """Without importance our Q4_K scale search with llama.cpp's weights (√mean x² + |x|) is llama.cpp's
    quantize_row_q4_K_ref: the same bytes as llama.cpp's quantizer (on the trained model's f32 file) for all but
    float-summation-order ties."""
    from exporters.gguf.blocks import gguf_names, read_blocks
    from toolkit.checkpoints import load_checkpoint

    f32, out = tmp_path / "f32.gguf", tmp_path / "q4k.gguf"
    proc = run_cli("export", "gguf", trained_model, "--outtype", "f32", "-o", f32, "--no-verify")
    assert proc.returncode == 0, proc.stderr[-1500:]
    _llama_quantize(f32, out, "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    bundle = load_checkpoint(trained_model)
    hf = "model.layers.1.mlp.up_proj.weight"
    qtype, theirs = read_blocks(out)[gguf_names(bundle)[hf]]
    assert qtype == "Q4_K"
    W = bundle.load(hf, torch.float32)
    x = W.reshape(W.shape[0], -1, 32)
    weights = torch.sqrt((x * x).mean(-1, keepdim=True)) + x.abs()
    real = ggml_grid._weights
    try:
        ggml_grid._weights = lambda x_, imp: weights
        grid = ggml_grid.solve(W, "Q4_K")
    finally:
        ggml_grid._weights = real
    ours = ggml_grid.pack(grid, grid.codes(W))
    assert (ours == theirs).mean() > 0.99, (ours == theirs).mean()


def _llama_quantize(src, dst, ftype: str, allow_requantize: bool = False) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = allow_requantize
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def gguf_targets(trained_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ggml")
    out = {}
    for ftype in ("q4_0", "q4_k_m", "q5_k_m"):
        ckpt = root / f"gptq-{ftype}"
        proc = run_cli("quantize", "int4", trained_model, "--target", f"gguf:{ftype}", "--act-order",
                       "--nsamples", "32", "--seqlen", "256", "-o", ckpt, "--threads", "2", timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
        gguf_file = root / f"gptq-{ftype}.gguf"
        proc = run_cli("export", "gguf", ckpt, "--outtype", ftype, "-o", gguf_file, "--threads", "2")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "written unchanged" in proc.stderr
        out[ftype] = (ckpt, gguf_file)
    return out


def test_codes_in_the_file_are_the_gptq_solution_through_llama_cpp(gguf_targets, trained_model, tmp_path):
    """Per written block type: llama.cpp's own dequantization of our file (llama-quantize to f32) and gguf-py's
    reading of it both equal the checkpoint's dequantized GPTQ solution exactly; per-tensor types equal
    llama-quantize's for the same file type on the same model."""
    import json

    import gguf

    from exporters.gguf.blocks import from_file_rows, gguf_names, read_blocks
    from exporters.gguf.readback import tensor_types
    from toolkit.checkpoints import load_checkpoint

    seen = set()
    for ftype, (ckpt, gguf_file) in gguf_targets.items():
        bundle = load_checkpoint(ckpt)
        names = {g: hf for hf, g in gguf_names(bundle).items()}
        f32 = tmp_path / f"{ftype}-dequantized.gguf"
        _llama_quantize(gguf_file, f32, "LLAMA_FTYPE_ALL_F32", allow_requantize=True)
        llama_values = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(f32)).tensors}
        blocks = read_blocks(gguf_file)
        for gname, (qtype, data) in blocks.items():
            hf = names[gname]
            want = bundle.load(hf, torch.float32)  # the loader's dequantization of the stored GPTQ blocks
            back = ggml_grid.dequantize_blocks(from_file_rows(hf, data, bundle.config), qtype, tuple(want.shape))
            assert torch.equal(back, want), gname
            from_llama = torch.from_numpy(from_file_rows(hf, llama_values[gname].reshape(want.shape), bundle.config))
            assert torch.equal(from_llama, want), gname
            seen.add(qtype)
        # llama-quantize on the same model at the same file type: every tensor's type the same
        ref_f32 = tmp_path / f"{ftype}-source.gguf"
        proc = run_cli("export", "gguf", trained_model, "--outtype", "f32", "-o", ref_f32, "--no-verify")
        assert proc.returncode == 0, proc.stderr[-1500:]
        theirs = tmp_path / f"{ftype}-llama.gguf"
        _llama_quantize(ref_f32, theirs, {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                                          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}[ftype])
        assert tensor_types(gguf_file) == tensor_types(theirs)
        # the output head (here the tied embedding) was solved by GPTQ too, not left as llama.cpp rounded it
        assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["gptq_head"] is True
        assert not np.array_equal(blocks["token_embd.weight"][1], read_blocks(theirs)["token_embd.weight"][1])
    # the 256-wide test model makes K-quants and their fallbacks
    assert {"Q4_0", "Q4_K", "Q6_K", "Q5_K"} <= seen, seen


def test_verification_catches_codes_in_the_wrong_rows(gguf_targets, tmp_path, monkeypatch):
    """Mutation: the q/k blocks placed without llama.cpp's pair order of rows -> the export is refused."""
    from exporters.gguf import blocks, exporter
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.errors import VerificationError

    ckpt, _ = gguf_targets["q4_k_m"]
    monkeypatch.setattr(blocks, "to_file_rows", lambda name, b, cfg: b)
    with pytest.raises(VerificationError):
        exporter.export(load_checkpoint(ckpt), tmp_path / "wrong.gguf", "q4_k_m")
    assert not (tmp_path / "wrong.gguf").exists()


def test_other_outtype_re_quantizes_and_says_so(gguf_targets, tmp_path):
    import json

    ckpt, _ = gguf_targets["q4_k_m"]
    out = tmp_path / "other.gguf"
    proc = run_cli("export", "gguf", ckpt, "--outtype", "q6_k", "-o", out)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "re-quantized" in proc.stderr
    manifest = json.loads(out.with_name("other.manifest.json").read_text())
    assert manifest["quantization"]["requantized"] is True


def test_calib_rounding_and_bad_inputs(trained_model, tmp_path):
    """--calib writes importance-weighted codes (the manifest says so); a --target whose blocks the group size
    cannot map to, --calib for a float type, and an unknown target exit 2 with the sizes that would work."""
    import json

    out = tmp_path / "imat.gguf"
    proc = run_cli("export", "gguf", trained_model, "--outtype", "q4_k_m", "--calib", trained_model / "calib.txt",
                   "-o", out, "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-1500:]
    q = json.loads(out.with_name("imat.manifest.json").read_text())["quantization"]
    assert q["method"].startswith("importance-weighted") and q["tensors"] > 0

    dest = tmp_path / "bad"
    proc = run_cli("quantize", "int4", trained_model, "--target", "gguf:q4_0", "--group-size", "64", "-o", dest)
    last = assert_usage_error(proc, dest)
    assert "32" in last and "64" in last and "gptq-v1" in last
    proc = run_cli("quantize", "int4", trained_model, "--target", "gguf:q6_k", "--group-size", "32", "-o", dest)
    assert "gguf:q4_0" in assert_usage_error(proc, dest)  # groups of 32 map to the 32-block types
    proc = run_cli("quantize", "int4", trained_model, "--target", "gguf:q3_k", "-o", dest)
    assert "gguf:q4_k_m" in assert_usage_error(proc, dest)
    proc = run_cli("export", "gguf", trained_model, "--outtype", "f16", "--calib", trained_model / "calib.txt",
                   "-o", tmp_path / "f16.gguf")
    assert_usage_error(proc, tmp_path / "f16.gguf")
