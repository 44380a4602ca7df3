"""The page-cache-bypassing appender (exporters/gguf/direct_write.py) writes exactly the bytes a plain file write would:
across chunk edges, with padding, on file systems that take O_DIRECT and on those that refuse it; and a GGUF written
through it is byte-identical to one written buffered."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from exporters.gguf import direct_write
from exporters.gguf.direct_write import DirectAppender


def _write_pieces(path: Path, direct: bool) -> tuple[bytes, DirectAppender]:
    """Pieces of many sizes (as bytes, uint8 arrays and 2-D float16 arrays), each started at a multiple of 32."""
    rng = np.random.default_rng(0)
    out = DirectAppender(path, start=b"GGUF-header-bytes", direct=direct)
    want = bytearray(b"GGUF-header-bytes")
    for i, size in enumerate((1, 7, 3000, 8192, 8196, 20000, 0, 5, 40000)):
        piece = rng.integers(0, 256, size, dtype=np.uint8)
        out.pad(32)
        want += bytes(-len(want) % 32)
        if i % 3 == 0:
            out.write(piece.tobytes())
        elif i % 3 == 1 or size % 4:
            out.write(piece)
        else:
            out.write(piece.view(np.float16).reshape(2, -1))
        want += piece.tobytes()
    return bytes(want), out


@pytest.mark.parametrize("direct", [True, False])
def test_appender_writes_what_a_plain_write_would(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(direct_write, "CHUNK", 8192)  # small chunks: many chunk edges, a partial last chunk
    want, out = _write_pieces(tmp_path / "f.bin", direct)
    assert out.close() == len(want)
    assert (tmp_path / "f.bin").read_bytes() == want


def test_appender_falls_back_where_o_direct_is_refused(monkeypatch):
    """tmpfs refuses O_DIRECT (EINVAL at open): the same bytes are written buffered."""
    shm = Path("/dev/shm")
    if not hasattr(os, "O_DIRECT") or not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("needs Linux with a writable /dev/shm")
    monkeypatch.setattr(direct_write, "CHUNK", 8192)
    path = shm / f"toolkit-direct-write-{os.getpid()}.bin"
    try:
        want, out = _write_pieces(path, direct=True)
        assert out.close() == len(want)
        assert path.read_bytes() == want
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("step", [None, 16])
def test_gguf_equals_gguf_py_own_writer(tmp_path, monkeypatch, step):
    """The oracle is gguf-py's writer: the same header, table and tensors written through
    GGUFWriter.write_tensor_data give the same bytes as our appender, direct and buffered, also when tensors are
    converted in 16-value steps (many steps per tensor and per buffer)."""
    gguf = pytest.importorskip("gguf")
    from exporters.gguf import writer

    if step:
        monkeypatch.setattr(writer, "CONVERT_STEP", step)
    from exporters.gguf.tensors import gguf_arch, plan
    from tests.helpers import random_bundle

    bundle = random_bundle("qwen3")
    for outtype in ("f16", "q8_0"):
        arch = gguf_arch(bundle)
        tensors = list(plan(bundle, outtype))
        w = gguf.GGUFWriter(str(tmp_path / "gguf-py.gguf"), arch)
        writer._metadata(w, bundle, arch, outtype)
        for t in tensors:
            shape = t.shape if writer._plain(t) else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            w.add_tensor_info(t.name, shape, writer._np_dtype(t), t.nbytes,
                              raw_dtype=None if writer._plain(t) else t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(t.data())
        w.close()
        want = (tmp_path / "gguf-py.gguf").read_bytes()
        for direct in (True, False):
            writer.write_gguf(bundle, tmp_path / "ours.gguf", outtype, direct=direct)
            assert (tmp_path / "ours.gguf").read_bytes() == want, (outtype, direct)


def test_a_write_that_fails_in_the_writer_thread_is_raised(tmp_path, monkeypatch):
    """The disk write runs in a second thread: its error (here ENOSPC on the second chunk) reaches the caller at
    the next hand-over or at close(), and abort() then ends without waiting forever."""
    import errno

    monkeypatch.setattr(direct_write, "CHUNK", 8192)
    real = os.pwrite
    offsets = []

    def pwrite(fd, data, offset):
        offsets.append(offset)
        if len(offsets) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    out = DirectAppender(tmp_path / "f.bin", direct=True)
    with pytest.raises(OSError) as raised:
        out.write(bytes(8192 * 5))
        out.close()
    assert raised.value.errno == errno.ENOSPC
    out.abort()
    assert out.fd == -1 and offsets[:2] == [0, 8192]
