"""A GGUF's scalar metadata and a few of its tokens, read straight from the header.

gguf-py's GGUFReader builds a Python object for every element of every array: on a 150k-token vocabulary that is
8 s to learn the chat template and two token texts. This walks the key/value section once (GGUF v2/v3, little
endian), keeps the scalars and strings, and skips arrays by their lengths."""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from toolkit.core.errors import ToolkitError

# GGUF value types (gguf-py's GGUFValueType) -> struct format; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
TOKENS = "tokenizer.ggml.tokens"


def _string(m, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", m, off)
    off += 8
    return bytes(m[off:off + n]).decode("utf-8", errors="replace"), off + n


def _skip(m, off: int, vtype: int, count: int) -> int:
    if vtype in _SCALARS:
        return off + count * struct.calcsize(_SCALARS[vtype])
    if vtype == _STRING:
        for _ in range(count):
            off += 8 + struct.unpack_from("<Q", m, off)[0]
        return off
    if vtype == _ARRAY:
        for _ in range(count):
            etype, n = struct.unpack_from("<IQ", m, off)
            off = _skip(m, off + 12, etype, n)
        return off
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: Path, token_ids: "callable[[dict], list[int]]" = lambda values: []) -> tuple[dict, dict]:
    """(scalar and string metadata by key, {token id: text} for the ids `token_ids(metadata)` names)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            version, _, n_kv = struct.unpack_from("<IQQ", m, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (a big-endian file?)")
            off, values, tokens_at = 24, {}, None
            for _ in range(n_kv):
                key, off = _string(m, off)
                (vtype,) = struct.unpack_from("<I", m, off)
                off += 4
                if vtype == _ARRAY:
                    etype, count = struct.unpack_from("<IQ", m, off)
                    if key == TOKENS and etype == _STRING:
                        tokens_at = (off + 12, count)
                    off = _skip(m, off + 12, etype, count)
                elif vtype == _STRING:
                    values[key], off = _string(m, off)
                else:
                    (values[key],) = struct.unpack_from(_SCALARS[vtype], m, off)
                    off += struct.calcsize(_SCALARS[vtype])
            tokens = {}
            wanted = {i for i in token_ids(values) if isinstance(i, int)}
            if tokens_at is not None and wanted:
                off, count = tokens_at
                for i in range(min(count, max(wanted) + 1)):
                    text, off = _string(m, off)
                    if i in wanted:
                        tokens[i] = text
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ToolkitError(f"cannot read {Path(path).name} as GGUF: {e}", "is it a complete GGUF file?") from None
    return values, tokens
