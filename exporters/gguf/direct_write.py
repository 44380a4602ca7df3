"""Append large outputs to a file without going through the page cache (O_DIRECT), where the system allows it.

Why: a buffered write of a model-sized file makes the kernel find a fresh page-cache page for every 4 KiB. On the
virtual machines this project is measured on, fresh pages are slow to get: writing 825 MB took 8-12 s buffered and
0.7-1.8 s with O_DIRECT, measured alternately in one process (docs/BENCHMARKS.md, GGUF conversion). Direct writes
need the memory address, the file offset and the length aligned to the device's block, so the bytes are staged in a
page-aligned buffer and written out in whole chunks; the last chunk is padded and the file cut back to its length.

Two staging buffers: one is written out by a second thread (pwrite releases the GIL) while the caller fills the
other, so the disk and the conversion that feeds it overlap. A caller that produces its bytes (a dtype conversion)
writes them straight into the buffer through reserve() and commit(n) instead of building a copy first.

Where O_DIRECT does not exist (macOS, Windows) or the file system refuses it (tmpfs and others answer EINVAL), the
same bytes are written buffered.
"""
from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for

import numpy as np

CHUNK = 4 << 20  # bytes per write: 16 MiB measured no faster and 8-12 MB more peak memory
BLOCK = 4096  # O_DIRECT alignment that holds for every common block device and file system


class DirectAppender:
    """Sequential writer: `write(array_or_bytes)` or `reserve()` + `commit(n)`, `pad(alignment)`, `close()` -> the
    file's length; `abort()` on failure (the caller removes the partial file)."""

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
        self.buffers = [mmap.mmap(-1, CHUNK) for _ in range(2)]  # anonymous: page-aligned, as O_DIRECT wants
        self.views = [np.frombuffer(b, dtype=np.uint8) for b in self.buffers]
        self.current = 0  # the buffer being filled; the other may be in flight
        self.filled = 0  # bytes staged in the current buffer
        self.written = 0  # bytes handed to the writer thread (a multiple of CHUNK)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self.pending: Future | None = None
        self.write(start)

    @property
    def length(self) -> int:
        return self.written + self.filled

    def reserve(self) -> np.ndarray:
        """The current buffer's free bytes (uint8, at least one): fill a prefix of it, then commit(n). The view
        is valid until the next commit, write or pad."""
        return self.views[self.current][self.filled:]

    def commit(self, n: int) -> None:
        self.filled += n
        if self.filled == CHUNK:
            self._flush(CHUNK)

    def write(self, data) -> None:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8) if not isinstance(data, np.ndarray) else \
            np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        done = 0
        while done < src.size:
            free = self.reserve()
            n = min(src.size - done, free.size)
            free[:n] = src[done:done + n]
            done += n
            self.commit(n)

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
                self.views[self.current][self.filled:self.filled + tail] = 0
                self._flush(self.filled + tail)
            self._wait()
            os.ftruncate(self.fd, length)
        finally:
            self.abort()
        return length

    def abort(self) -> None:
        """Close without writing what is staged (the caller removes the partial file)."""
        if self.fd < 0:
            return
        if self.pending is not None:  # a write in flight still uses a buffer and the descriptor: let it end
            wait_for([self.pending])
            self.pending = None
        self.writer.shutdown(wait=True)
        os.close(self.fd)
        self.fd = -1
        del self.views
        for b in self.buffers:
            try:
                b.close()
            except BufferError:  # a view from reserve() is still alive (in an exception's traceback): the
                pass  # buffer is freed with it

    def _flush(self, n: int) -> None:
        """Hand the current buffer's first n bytes to the writer thread and switch buffers; the other buffer's
        write must have ended first (its error, if any, is raised here)."""
        self._wait()
        self.pending = self.writer.submit(self._write_out, self.buffers[self.current], n, self.written)
        self.written += n
        self.current ^= 1
        self.filled = 0

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _write_out(self, buffer: mmap.mmap, n: int, offset: int) -> None:
        out = memoryview(buffer)[:n]
        try:
            self._pwrite_all(out, offset)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            # opened with O_DIRECT but refused at the first write: the same file, buffered, from here on
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY, 0o644)
            self.direct = False
            self._pwrite_all(out, offset)
        finally:
            out.release()

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n
