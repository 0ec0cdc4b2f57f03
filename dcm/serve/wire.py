"""The array encoding of nnInteractive's HTTP protocol (written from its published description).

A packed array is::

    b"NNIA" | version u8 (1) | codec u8 (1 = zstd, 2 = lz4) | ndim u8 | len(dtype name) u8 | dtype name (ascii)
    | shape: ndim x int64 little-endian | number of chunks u32 | per chunk: raw length u64, packed length u64,
    one blosc2 frame

Each chunk holds at most 1 GiB of the array's little-endian C-order bytes. :func:`unpack_array` checks every
length against the buffer and a size limit before it allocates anything, so a malformed or oversized body is a
:class:`WireError` (the server answers 400 / 413), never a crash.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple

import blosc2
import numpy as np

__all__ = ["WireError", "ArrayTooLarge", "pack_array", "unpack_array", "MAGIC"]

MAGIC = b"NNIA"
_VERSION = 1
_CODECS = {1: blosc2.Codec.ZSTD, 2: blosc2.Codec.LZ4}
_CODEC_IDS = {v: k for k, v in _CODECS.items()}
_CHUNK_BYTES = 1 << 30
_MAX_NDIM = 8
#: dtypes an array on the wire may have (images, masks, label maps); anything else is refused.
ALLOWED_KINDS = "biuf"


class WireError(ValueError):
    """A body that is not a well-formed packed array; the message is one line."""


class ArrayTooLarge(WireError):
    """A packed array whose decoded size is over the server's limit."""


def pack_array(array: np.ndarray, codec: "blosc2.Codec" = blosc2.Codec.ZSTD, clevel: int = 3,
               nthreads: Optional[int] = None) -> bytes:
    """Encode ``array`` (any shape, a dtype of kind bool / int / uint / float) as a packed array.

    Masks and label maps compress well without a filter, which is what the server sends; ``nthreads`` is
    blosc2's thread count for this call (None: blosc2's global setting).
    """
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in ALLOWED_KINDS:
        raise WireError(f"cannot pack an array of dtype {array.dtype}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    name = array.dtype.name.encode("ascii")
    raw = memoryview(array).cast("B") if array.size else memoryview(b"")
    total = raw.nbytes
    n_chunks = (total + _CHUNK_BYTES - 1) // _CHUNK_BYTES
    extra = {} if nthreads is None else {"nthreads": int(nthreads)}
    parts = [struct.pack(f"<4sBBBB{len(name)}s", MAGIC, _VERSION, _CODEC_IDS[codec], array.ndim, len(name), name),
             struct.pack(f"<{array.ndim}q", *array.shape), struct.pack("<I", n_chunks)]
    for start in range(0, total, _CHUNK_BYTES):
        piece = raw[start:start + _CHUNK_BYTES]
        frame = blosc2.compress2(piece, typesize=array.dtype.itemsize, codec=codec, clevel=clevel,
                                 filters=[blosc2.Filter.NOFILTER], **extra)
        parts.append(struct.pack("<QQ", piece.nbytes, len(frame)))
        parts.append(frame)
    return b"".join(parts)


def peek_header(buf: bytes) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """``(dtype, shape, offset of the chunk table)`` of a packed array, checked; WireError otherwise."""
    if len(buf) < 8:
        raise WireError("body is not a packed array (too short)")
    magic, version, codec, ndim, name_len = struct.unpack_from("<4sBBBB", buf, 0)
    if magic != MAGIC:
        raise WireError("body is not a packed array (bad magic)")
    if version != _VERSION:
        raise WireError(f"packed array version {version} is not supported (expected {_VERSION})")
    if codec not in _CODECS:
        raise WireError(f"packed array codec {codec} is not supported")
    if ndim > _MAX_NDIM:
        raise WireError(f"packed array has {ndim} dimensions (at most {_MAX_NDIM})")
    offset = 8
    if len(buf) < offset + name_len + 8 * ndim + 4:
        raise WireError("packed array header is truncated")
    try:
        dtype = np.dtype(buf[offset:offset + name_len].decode("ascii"))
    except (UnicodeDecodeError, TypeError, ValueError):
        raise WireError("packed array has an unknown dtype") from None
    if dtype.kind not in ALLOWED_KINDS:
        raise WireError(f"packed array dtype {dtype} is not bool, integer or float")
    offset += name_len
    shape = struct.unpack_from(f"<{ndim}q", buf, offset)
    offset += 8 * ndim
    if any(d < 0 for d in shape):
        raise WireError(f"packed array has a negative dimension {list(shape)}")
    return dtype, tuple(int(d) for d in shape), offset


def unpack_array(buf: bytes, max_bytes: Optional[int] = None) -> np.ndarray:
    """Decode a packed array.

    Raises:
        ArrayTooLarge: its decoded size is over ``max_bytes``.
        WireError: anything else malformed (one line).
    """
    dtype, shape, offset = peek_header(buf)
    count = 1
    for d in shape:
        count *= d
    total = count * dtype.itemsize
    if max_bytes is not None and total > max_bytes:
        raise ArrayTooLarge(f"array {list(shape)} {dtype} is {total} bytes, over the limit of {max_bytes}")
    (n_chunks,) = struct.unpack_from("<I", buf, offset)
    offset += 4
    if n_chunks != (total + _CHUNK_BYTES - 1) // _CHUNK_BYTES:
        raise WireError(f"packed array has {n_chunks} chunks for {total} bytes")
    out = np.empty(count, dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    view = memoryview(buf)
    written = 0
    for _ in range(n_chunks):
        if len(buf) < offset + 16:
            raise WireError("packed array chunk table is truncated")
        raw_len, packed_len = struct.unpack_from("<QQ", buf, offset)
        offset += 16
        if packed_len > len(buf) - offset or raw_len > total - written or raw_len % dtype.itemsize:
            raise WireError("packed array chunk lengths do not fit the array")
        frame = view[offset:offset + packed_len]
        try:
            frame_len = blosc2.get_cbuffer_sizes(frame)[0]
        except Exception:
            raise WireError("packed array chunk is not a blosc2 frame") from None
        if frame_len != raw_len:
            raise WireError(f"packed array chunk says {raw_len} bytes, its frame {frame_len}")
        lo, hi = written // dtype.itemsize, (written + raw_len) // dtype.itemsize
        try:
            blosc2.decompress2(frame, dst=out[lo:hi])
        except Exception as e:
            raise WireError(f"packed array chunk does not decompress ({type(e).__name__})") from None
        written += raw_len
        offset += packed_len
    if written != total:
        raise WireError(f"packed array holds {written} bytes, its shape needs {total}")
    if offset != len(buf):
        raise WireError(f"packed array is followed by {len(buf) - offset} stray bytes")
    return out.astype(dtype, copy=False).reshape(shape)
