"""The GGUF writer's value conversions (numpy, exporters/gguf/convert.py) against torch's own casts, bit for bit, and
the converter's torch-free path: a safetensors checkpoint exported with torch unimportable gives the same bytes as
the export that llama.cpp verified."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporters.gguf.convert import convert_into, require_finite
from exporters.gguf.exporter import export
from tests.conftest import ROOT
from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core.errors import ToolkitError


def _same_bits_or_both_nan(got: np.ndarray, want: torch.Tensor) -> None:
    want = want.numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_bf16_to_f16_equals_torch_for_every_bf16_value():
    bits = np.arange(1 << 16, dtype=np.uint16)  # all of them: normals, subnormals, +-0, +-inf, NaNs
    got = np.empty(bits.size, np.float16)
    convert_into(bits, "bfloat16", got)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float16)
    _same_bits_or_both_nan(got, want)


def test_bf16_to_f32_equals_torch_for_every_bf16_value():
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    convert_into(bits, "bfloat16", got)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _edge_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    # float16's subnormals and normals, the rounding boundary to inf (65504 / 65520), beyond, and halfway cases
    return np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 6, 100_000),
                           [65504, 65519.99, 65520, 65536, 1e6, -65520, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                            1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 0.0, -0.0, np.inf, -np.inf, np.nan]])


def test_f32_to_f16_equals_torch():
    src = _edge_values().astype(np.float32)
    got = np.empty(src.size, np.float16)
    convert_into(src, "float32", got)
    _same_bits_or_both_nan(got, torch.from_numpy(src).to(torch.float16))


def test_f64_to_f16_is_correctly_rounded():
    """float64 is rounded once, to nearest even (torch rounds through float32, twice); the oracle is Python's own
    binary16 packing (struct 'e'), for every value float16 can hold."""
    src = _edge_values()
    got = np.empty(src.size, np.float16)
    convert_into(src, "float64", got)
    finite = np.isfinite(src) & (np.abs(src) < 65520)
    want = np.frombuffer(b"".join(struct.pack("<e", x) for x in src[finite]), np.uint16)
    assert np.array_equal(got[finite].view(np.uint16), want)
    assert np.isinf(got[~finite & ~np.isnan(src)]).all() and np.isnan(got[np.isnan(src)]).all()


@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_require_finite_tells_overflow_from_nan(out_dtype):
    """Positive and negative NaN/inf are found (by the bits' signed and unsigned maxima); overflow to inf in the
    conversion to float16 is told apart from a non-finite source."""
    cases = [(70000.0, "beyond float16's range"), (-70000.0, "beyond float16's range"), (np.nan, "NaN or infinite"),
             (-np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite")]
    for bad, message in cases:
        if out_dtype == np.float32 and abs(bad) == 70000.0:
            continue  # float32 holds it
        src = np.array([1.0, -2.0, bad, 0.5], np.float32)
        out = np.empty(4, out_dtype)
        convert_into(src, "float32", out)
        with pytest.raises(ToolkitError, match=message):
            require_finite(out, src, "float32", "w")
    finite = np.array([-65504.0, -0.0, 65504.0, -6e-8], np.float32)
    require_finite(finite.astype(out_dtype), finite, "float32", "w")  # float16's extremes: no error


BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["toolkit", *sys.argv[1:]]
runpy.run_module("toolkit", run_name="__main__")
"""


def test_safetensors_checkpoint_converts_without_torch(tmp_path):
    """`toolkit export gguf --no-verify` on a bf16 safetensors folder never imports torch (it is blocked here) and
    writes the same bytes as the in-process export that llama.cpp verified (llama arch: q/k rows permuted)."""
    for family in ("llama", "qwen3_moe"):
        ckpt = tmp_path / family
        save_hf(random_bundle(family, std=0.1), ckpt, torch.bfloat16)
        bundle = load_checkpoint(ckpt)
        assert set(bundle.dtypes()) == {"bfloat16"}
        verified = tmp_path / f"{family}-verified.gguf"
        report = export(bundle, verified, "f16", verify_file=True)
        assert report.verification["passed"]
        out = tmp_path / f"{family}-no-torch.gguf"
        proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "export", "gguf", str(ckpt), "-o", str(out),
                               "--outtype", "f16", "--no-verify"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert out.read_bytes() == verified.read_bytes(), family
