"""Append large outputs to a file without going through the page cache (O_DIRECT), where the system allows it.

Why: a buffered write of a model-sized file makes the kernel find a fresh page-cache page for every 4 KiB. On the
virtual machines this project is measured on, fresh pages are slow to get: writing 825 MB took 8-12 s buffered and
0.7-1.8 s with O_DIRECT, measured alternately in one process (docs/BENCHMARKS.md, GGUF conversion). Direct writes
need the memory address, the file offset and the length aligned to the device's block, so the bytes are staged in a
page-aligned buffer and written out in whole chunks; the last chunk is padded and the file cut back to its length.

Where O_DIRECT does not exist (macOS, Windows) or the file system refuses it (tmpfs and others answer EINVAL), the
same bytes are written buffered.
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np

CHUNK = 4 << 20  # bytes per write: 16 MiB measured no faster and 8-12 MB more peak memory
BLOCK = 4096  # O_DIRECT alignment that holds for every common block device and file system


class DirectAppender:
    """Sequential writer: `write(array_or_bytes)`, `pad(alignment)`, `close()` -> the file's length."""

    def __init__(self, path, start: bytes = b"", direct: bool = True):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.buffer = mmap.mmap(-1, CHUNK)  # anonymous: page-aligned, as O_DIRECT wants
        self.view = np.frombuffer(self.buffer, dtype=np.uint8)
        self.filled = 0  # bytes staged in the buffer
        self.written = 0  # bytes already in the file (a multiple of CHUNK)
        self.write(start)

    @property
    def length(self) -> int:
        return self.written + self.filled

    def write(self, data) -> None:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8) if not isinstance(data, np.ndarray) else \
            np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        done = 0
        while done < src.size:
            n = min(src.size - done, CHUNK - self.filled)
            self.view[self.filled:self.filled + n] = src[done:done + n]
            self.filled += n
            done += n
            if self.filled == CHUNK:
                self._flush(CHUNK)

    def pad(self, alignment: int) -> None:
        """Zeros up to the next multiple of `alignment` of the file's length."""
        n = -self.length % alignment
        if n:
            self.write(bytes(n))

    def close(self) -> int:
        """Write what is staged, cut the file to its length, close; returns the length."""
        length = self.length
        try:
            if self.filled:
                tail = -self.filled % BLOCK if self.direct else 0
                self.view[self.filled:self.filled + tail] = 0
                self._flush(self.filled + tail)
                os.ftruncate(self.fd, length)
        finally:
            self.abort()
        return length

    def abort(self) -> None:
        """Close without writing what is staged (the caller removes the partial file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            del self.view
            self.buffer.close()

    def _flush(self, n: int) -> None:
        out = memoryview(self.buffer)[:n]
        try:
            self._pwrite_all(out, self.written)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            # opened with O_DIRECT but refused at the first write: the same file, buffered, from here on
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY, 0o644)
            self.direct = False
            self._pwrite_all(out, self.written)
        finally:
            out.release()
        self.written += n
        self.filled = 0

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n
