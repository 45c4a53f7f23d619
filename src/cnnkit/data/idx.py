"""Read and write IDX files, the format of MNIST, Fashion-MNIST and KMNIST.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the raw big-endian payload. Downloads get cut, mirrors serve HTML error pages
and people gunzip files by hand, so every one of those fields is checked and a bad file is reported as a
CnnkitError naming the file, never as a reshape error deep inside numpy.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write

__all__ = ["read_idx", "write_idx"]

# Type code -> big-endian dtype, as listed in the format description on the MNIST page.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Return the array stored in an IDX file, gzipped or raw, in native byte order and writable.

    Gzip is detected from the file's first bytes rather than its name, so a hand-unzipped file that kept
    its `.gz` name still reads. `ndim`, when given, is the number of dimensions the caller needs (3 for
    images, 1 for labels), so swapping the image and label files gives a clear message.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CnnkitError(f"{path}: file not found") from None
    data = _gunzip(path, raw) if raw[:2] == _GZIP_MAGIC else raw
    dtype, dims, offset = _parse_header(path, data)
    if ndim is not None and len(dims) != ndim:
        raise CnnkitError(
            f"{path}: expected a {ndim}-dimensional IDX file, found {len(dims)} dimension(s) {tuple(dims)}"
        )
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - offset
    if found != expected:
        problem = "truncated IDX file" if found < expected else "IDX file has trailing data"
        raise CnnkitError(f"{path}: {problem}: expected {expected} bytes of data, found {found}")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=offset).reshape(dims)
    # astype copies, which both fixes the byte order and gives a writable array torch can wrap.
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Atomically write `array` as an IDX file, gzipped when `path` ends in `.gz`.

    The gzip header carries no file name and mtime 0, so the same array always gives the same bytes.
    """
    array = np.asarray(array)
    code = _type_code(array.dtype)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got an array of shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with atomic_write(path, "wb") as handle:
        handle.write(payload)


def _type_code(dtype: np.dtype) -> int:
    """Map a numpy dtype to its IDX type code, rejecting ones IDX cannot hold."""
    for code, idx_dtype in _DTYPES.items():
        if idx_dtype.kind == dtype.kind and idx_dtype.itemsize == dtype.itemsize:
            return code
    raise ValueError(f"IDX cannot store dtype {dtype}; use uint8, int8, int16, int32, float32 or float64")


def _gunzip(path: Path, compressed: bytes) -> bytes:
    """Decompress every gzip member, turning a cut or corrupt stream into a one-line CnnkitError.

    Never inflates more than the IDX header announces (plus one byte, to tell trailing data): a small
    file that inflates to gigabytes (a gzip bomb, or a header whose dimensions promise terabytes) is
    refused before that memory is taken. A truncated stream still yields the bytes before the cut, so
    the caller can say how many of the expected bytes arrived; that is why this decompresses by hand
    instead of calling gzip.decompress.
    """
    pieces = bytearray()
    limit = _LONGEST_HEADER  # until the header has arrived; then the size it announces
    known = False
    rest = compressed
    try:
        while rest:
            decompressor = zlib.decompressobj(wbits=31)
            pending = rest
            while not decompressor.eof:
                chunk = decompressor.decompress(pending, limit + 1 - len(pieces))
                pieces += chunk
                pending = decompressor.unconsumed_tail
                if not known and _header_arrived(pieces):
                    limit, known = _announced_size(path, bytes(pieces[:_LONGEST_HEADER])), True
                if len(pieces) > limit:
                    raise CnnkitError(f"{path}: IDX file has trailing data: expected {limit - _offset(pieces)} "
                                      "bytes of data, found more; delete the file and download it again")
                if not chunk and not pending:
                    break
            if not decompressor.eof:
                return _truncated_gzip(path, bytes(pieces))
            rest = decompressor.unused_data.lstrip(b"\0")
    except zlib.error as error:
        raise CnnkitError(f"{path}: corrupt gzip data ({error}); delete the file and download it again") from None
    return bytes(pieces)


#: The longest IDX header: the magic and 255 dimensions.
_LONGEST_HEADER = 4 + 4 * 255
#: The largest IDX payload read: far above any dataset of the format (EMNIST's largest split is 0.6 GB),
#: so a header promising more is refused before anything that size is inflated or allocated.
MAX_PAYLOAD = 1 << 32


def _header_arrived(data: bytearray) -> bool:
    return len(data) >= 4 and len(data) >= _offset(data)


def _offset(data: bytearray | bytes) -> int:
    return 4 + 4 * data[3] if len(data) >= 4 else 4


def _announced_size(path: Path, header: bytes) -> int:
    """Header plus payload bytes the header announces (at most MAX_PAYLOAD: _parse_header refuses more)."""
    dtype, dims, offset = _parse_header(path, header)
    return offset + math.prod(dims) * dtype.itemsize


def _truncated_gzip(path: Path, partial: bytes) -> bytes:
    """Raise for a gzip stream that ends early, reporting expected versus found sizes when the header says."""
    dtype, dims, offset = _parse_header(path, partial, truncated=True)
    expected = math.prod(dims) * dtype.itemsize
    raise CnnkitError(
        f"{path}: truncated IDX file: expected {expected} bytes of data, found {len(partial) - offset} "
        "(the gzip stream ends early; delete the file and download it again)"
    )


def _parse_header(path: Path, data: bytes, *, truncated: bool = False) -> tuple[np.dtype, list[int], int]:
    """Check the magic and dimension fields; return the dtype, the dimensions and the payload offset."""
    if len(data) < 4:
        problem = "truncated IDX file" if truncated else "not an IDX file"
        raise CnnkitError(f"{path}: {problem}: only {len(data)} bytes, too short for the 4-byte header")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\0\0" or code not in _DTYPES:
        raise CnnkitError(
            f"{path}: not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 then a type code 08/09/0B/0C/0D/0E)"
        )
    if ndim == 0:
        raise CnnkitError(f"{path}: bad IDX header: the number of dimensions is 0")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise CnnkitError(
            f"{path}: truncated IDX file: the header needs {offset} bytes for {ndim} dimensions, found {len(data)}"
        )
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    # Bounded with every zero dimension counted as one: (0, 2**21, 2**21, 2**21) holds no data, but numpy
    # cannot even describe an array of that shape.
    largest = math.prod(max(1, d) for d in dims) * _DTYPES[code].itemsize
    if largest > MAX_PAYLOAD:
        raise CnnkitError(f"{path}: the IDX header announces dimensions {tuple(dims)}, more than the "
                          f"{MAX_PAYLOAD:,} bytes cnnkit reads; the file is damaged or not a dataset file")
    return _DTYPES[code], dims, offset
