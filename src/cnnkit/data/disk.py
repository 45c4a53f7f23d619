"""Images left on disk: a decoded cache file read in pieces, for image folders larger than memory.

An image folder is decoded once into uint8 (N, C, H, W) .npy files (cnnkit.data.cache). When the splits
would not fit comfortably in memory (`fits_in_memory`), `Split.images` is a `DiskImages` instead of a
tensor: a view (a file, or files laid end to end, and the rows it holds) that reads what is asked for with
explicit `preadv` calls into the array that needs it. Not a memory map: the pages of a mapped file count as
the process's resident memory while they stay mapped, and pile up to the file's size over an epoch; read
pages go to the kernel's page cache, which the kernel gives back under memory pressure and which no
RLIMIT or RSS counts. A frozen backbone's feature vectors of a streamed split (float32 (N, D) .npy files,
engine/features.py) are read the same way.

Training reads such a split in a chunked shuffled order (`chunked_order`, `ChunkWindow`): the rows are cut
into chunks of CHUNK_BYTES, an epoch visits the chunks in a random order, WINDOW_CHUNKS at a time, and
shuffles the images inside each window. Every chunk is read once per epoch, in one sequential read, and
batches are gathered from the window and moved to the device one by one.

Memory bound of a streamed training, in images held at once:

    window x chunk x image bytes  +  batch x image bytes     (the ChunkWindow buffer: 128 MiB + one batch)
  + batch x image bytes, and the float copies the model makes of it      (the step being trained)
  + eval batch x image bytes, and the same                               (validation, the test pass)
  + 2,000 images, only where a layer is set from data (airbench's whitening) and once at the end
    (model.json's background check), and 24 bytes per image of labels and order
  + up to a window's size of freed heap memory not yet given back (FreeMemoryLimit).

Standardisation statistics, the resume fingerprint and `load` read one chunk at a time; decoding holds a
few 8 MiB chunks (cnnkit.data.folder) and the scan ~1 KB of Python objects per file. Nothing else grows
with the number of images: benchmarks/stream_memory.py measures the peak at two dataset sizes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.fileio import pread_into

__all__ = ["CHUNK_BYTES", "WINDOW_CHUNKS", "ChunkWindow", "DiskImages", "available_memory", "chunked_order",
           "fits_in_memory", "release_free_memory", "window_bytes"]

#: One chunk: the unit of reading and of the epoch's coarse shuffle. 4 MiB reads run at a disk's sequential
#: speed (a seek costs ~0.1 ms on an SSD, ~10 ms on a spinning disk, against 4 ms / 20 ms to read 4 MiB),
#: and small enough that a window of many of them stays cheap.
CHUNK_BYTES = 4 << 20
#: Chunks shuffled together. A batch is drawn from this many random places of the dataset; an image folder's
#: cache is sorted by class, so this is also about how many class runs a batch mixes (32 places give
#: 10-class data near-uniform batches). The window (128 MiB) is the bulk of the streamed memory bound.
WINDOW_CHUNKS = 32
#: Share of the memory still available that loading a dataset may take at its peak; the rest is for the
#: model, its batches and everything else the process holds.
MEMORY_SHARE = 0.8


# ---------------------------------------------------------------------------------------------------------
# One decoded file


#: What a decoded file may hold: uint8 images (N, C, H, W), or float32 feature vectors (N, D), the pooled
#: features of a frozen backbone (engine/features.py), which stream from disk as the images they came from did.
#: Each kind as (dtype, dimensions of a row).
ROW_KINDS = frozenset({(np.dtype(np.uint8), 3), (np.dtype(np.float32), 1)})


@dataclass(frozen=True)
class ImageFile:
    """A .npy file of rows in C order, uint8 images (count, C, H, W) or float32 vectors (count, D): where its
    rows start, how many there are and their shape."""

    path: Path
    offset: int
    count: int
    item_shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.uint8)

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.item_shape)) * self.dtype.itemsize

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageFile:
        """Read and check the header; ValueError when it holds neither kind of ROW_KINDS or the file is short."""
        path = Path(path)
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"{path}: unsupported .npy version {version}")
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
        if fortran or len(shape) < 2 or (dtype, len(shape) - 1) not in ROW_KINDS:  # '>f4' is not float32 here
            raise ValueError(f"{path}: expected uint8 (N, C, H, W) images or float32 (N, D) vectors in C order, "
                             f"found {dtype} {shape}")
        image = cls(path, offset, int(shape[0]), tuple(int(side) for side in shape[1:]), np.dtype(dtype))
        if size != offset + image.count * image.item_bytes:
            raise ValueError(f"{path}: {size} bytes, but its header promises {offset + image.count * image.item_bytes}")
        return image


class _OpenFiles:
    """File descriptors of the files a family of views reads, opened once and closed with the last view.

    Open from the start: a cache entry replaced while training (another process re-decoded the folder)
    is then still read whole from the files this run opened.
    """

    def __init__(self, files: Sequence[ImageFile]) -> None:
        self.files = tuple(files)
        self.fds = [os.open(file.path, os.O_RDONLY) for file in self.files]
        self.starts = np.cumsum([0] + [file.count for file in self.files])  # global row of each file's row 0
        weakref.finalize(self, _close_all, list(self.fds))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------
# The disk-backed image array


class DiskImages:
    """uint8 (N, C, H, W) images read from disk on demand: what `Split.images` is for a streamed split (or float32
    (N, D) feature vectors: a frozen backbone's features of a streamed split, engine/features.py).

    It answers what the code that handles image tensors asks of them: `shape`, `len`, `dtype`, `device`;
    indexing with an int, a slice or an index tensor/array returns a tensor on `device` in its memory
    format (read now); `take` returns another view without reading; `to(device, memory_format=)` says where
    reads go. `load()` reads everything into one array, for splits that fit after all.
    """

    def __init__(self, opened: _OpenFiles, rows: np.ndarray, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self._opened = opened
        self.rows = rows  # int64: global rows (the files laid end to end) of this view, in its order
        self.device = torch.device(device)
        self.memory_format = memory_format
        first = opened.files[0]
        self.item_shape = first.item_shape
        self.item_bytes = first.item_bytes
        self.numpy_dtype = first.dtype

    @classmethod
    def open(cls, *paths: str | os.PathLike[str]) -> DiskImages:
        """All rows of one file, or of several with the same image shape laid end to end."""
        files = [ImageFile.open(path) for path in paths]
        if len({(file.item_shape, file.dtype) for file in files}) != 1:
            raise ValueError(f"{', '.join(map(str, paths))}: image shapes or types differ")
        opened = _OpenFiles(files)
        return cls(opened, np.arange(int(opened.starts[-1]), dtype=np.int64))

    # The tensor-like surface --------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.item_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.numpy_dtype == np.float32 else torch.uint8

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.item_bytes

    @property
    def paths(self) -> list[Path]:
        return [file.path for file in self._opened.files]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        files = ", ".join(path.name for path in self.paths)
        return f"DiskImages({len(self):,} x {self.item_shape} {self.numpy_dtype} from {files}, read to {self.device})"

    def __getitem__(self, key: int | slice | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self[slice(key, key + 1 if key != -1 else None)][0]
        return self._tensor(self._read(self.rows[_index(key)]))

    def take(self, key: slice | torch.Tensor | np.ndarray | Sequence[int]) -> DiskImages:
        """The view of the rows `key` selects (positions of this view); nothing is read."""
        return self._view(self.rows[_index(key)])

    def to(self, device: torch.device | str, *, memory_format: torch.memory_format = torch.contiguous_format,
           ) -> DiskImages:
        """This view, with reads returned on `device` in `memory_format` (the files stay where they are; vectors
        have no channels to put last)."""
        view = self._view(self.rows)
        view.device = torch.device(device)
        view.memory_format = memory_format if self.ndim == 4 else torch.contiguous_format
        return view

    def cpu(self) -> DiskImages:
        return self.to("cpu", memory_format=self.memory_format)

    def load(self) -> np.ndarray:
        """Every image of the view as one (N, C, H, W) array: one copy, read in file order."""
        return self._read(self.rows)

    def concat(self, other: DiskImages) -> DiskImages:
        """This view followed by `other` (same files, or other files of the same image shape)."""
        if other._opened is self._opened:
            return self._view(np.concatenate([self.rows, other.rows]))
        if (other.item_shape, other.numpy_dtype) != (self.item_shape, self.numpy_dtype):
            raise ValueError(f"cannot concatenate {self.numpy_dtype} {self.item_shape} rows and "
                             f"{other.numpy_dtype} {other.item_shape} ones")
        opened = _OpenFiles([*self._opened.files, *other._opened.files])
        shift = int(self._opened.starts[-1])
        return DiskImages(opened, np.concatenate([self.rows, other.rows + shift]), self.device, self.memory_format)

    def blocks(self, rows_per_block: int | None = None) -> Iterator[np.ndarray]:
        """The view's images in order, as arrays of at most `rows_per_block` (default: one chunk) images."""
        step = rows_per_block or self.chunk_rows
        for start in range(0, len(self.rows), step):
            yield self._read(self.rows[start : start + step])

    @property
    def chunk_rows(self) -> int:
        """Images per chunk (CHUNK_BYTES of them, at least one)."""
        return max(1, CHUNK_BYTES // self.item_bytes)

    def read_into(self, positions: np.ndarray, out: np.ndarray) -> None:
        """Read the images at view `positions` into `out` (len(positions), C, H, W), in that order."""
        self._read(self.rows[positions], out)

    # Reading ------------------------------------------------------------------------------------------

    def _view(self, rows: np.ndarray) -> DiskImages:
        return DiskImages(self._opened, rows, self.device, self.memory_format)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type != "cpu":
            tensor = tensor.to(self.device)
        return tensor.contiguous(memory_format=self.memory_format)

    def _read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images of global `rows` into `out` (made when None): runs of consecutive rows are one read each."""
        FREE_MEMORY.check()
        if out is None:
            out = np.empty((len(rows), *self.item_shape), self.numpy_dtype)
        if len(rows) == 0:
            return out
        if len(rows) > 1 and not bool(np.all(rows[1:] >= rows[:-1])):
            order = np.argsort(rows, kind="stable")  # read in file order, then put each where it was asked
            out[order] = self._read(rows[order])
            return out
        opened = self._opened
        file_of = np.searchsorted(opened.starts, rows, side="right") - 1
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(file_of) != 0)) + 1
        for start, stop in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            which = int(file_of[start])
            file = opened.files[which]
            local = int(rows[start] - opened.starts[which])
            if local < 0 or local + (stop - start) > file.count:
                raise IndexError(f"rows {rows[start]}..{rows[stop - 1]} are outside {file.path}")
            part = out[start:stop]
            if pread_into(opened.fds[which], part, file.offset + local * file.item_bytes) < part.nbytes:
                raise OSError(f"{file.path}: ends before the images its header promises (delete it to decode again)")
        return out


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the free pages of malloc's heap back to the system (glibc's malloc_trim; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class FreeMemoryLimit:
    """Keeps the free memory that malloc's heap holds to about `slack` bytes while images stream from disk.

    cnnkit has malloc keep freed blocks for reuse (engine/cpu.py: faster steps), so the peak RSS is the live
    memory plus every hole the heap fragments into, and that grows batch after batch of a pass: identical
    streamed trainings of a 2 GB folder peaked anywhere from 725 to 1,274 MB (128x128 images, batch 128).
    `check` (each streamed batch) reads the RSS, and once it has grown `slack` past what it was after the
    last trim, trims the heap: the same trainings then peaked at 647-649 MB, and at 617-639 MB on a 0.5 GB
    folder. A trim every batch cost 60% more time per step of a tiny model here (the next step faults its
    buffers in again); this trims only when the holes add up to a window.
    """

    def __init__(self, slack: int) -> None:
        self.slack = slack
        self.limit: int | None = None

    def check(self) -> None:
        resident = _resident_bytes()
        if resident is None:
            return
        if self.limit is None:
            self.limit = resident + self.slack
        elif resident > self.limit:
            release_free_memory()
            self.limit = (_resident_bytes() or resident) + self.slack  # live memory may have grown too


def _resident_bytes() -> int | None:
    """This process's RSS from /proc/self/statm (None where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


#: The one limit of this process (the heap is the process's).
FREE_MEMORY = FreeMemoryLimit(WINDOW_CHUNKS * CHUNK_BYTES)


def _index(key: slice | torch.Tensor | np.ndarray | Sequence[int]) -> slice | np.ndarray:
    """An index of view positions as numpy understands it (tensors moved off their device)."""
    if isinstance(key, slice):
        return key
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    key = np.asarray(key)
    if key.dtype != bool and not np.issubdtype(key.dtype, np.integer):
        raise IndexError(f"images can be indexed by ints, slices or integer/bool arrays, not {key.dtype}")
    return key


# ---------------------------------------------------------------------------------------------------------
# The chunked shuffled order of a streamed epoch


def chunked_order(count: int, chunk: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """One epoch's order of `count` images read in chunks of `chunk`: (order, window bounds).

    The chunks are permuted, then taken WINDOW_CHUNKS at a time, and the images of each window shuffled:
    `order[bounds[k]:bounds[k + 1]]` is window k, a permutation of the rows of its chunks. All of it is
    drawn from `generator` at once, so one generator state gives one order (an exact resume, and the same
    order on every data-parallel rank, whose batches then split it as they split a full permutation).
    """
    chunks = torch.randperm(-(-count // chunk), generator=generator).numpy()
    starts = chunks * chunk
    lengths = np.minimum(chunk, count - starts)
    # Rows of the permuted chunks, chunk after chunk: each chunk's start repeated, plus 0..length-1.
    ends = np.cumsum(lengths)
    rows = np.repeat(starts - (ends - lengths), lengths) + np.arange(count)
    bounds = [0, *ends[WINDOW_CHUNKS - 1 :: WINDOW_CHUNKS].tolist()]
    if bounds[-1] != count:
        bounds.append(count)
    pieces = [torch.from_numpy(rows[low:high])[torch.randperm(high - low, generator=generator)]
              for low, high in zip(bounds, bounds[1:])]
    return (torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)), bounds


class ChunkWindow:
    """The images of the current window of a chunked order, and the batches gathered from them.

    Batches must be asked for in order, each as a range [start, stop) of order positions (what a rank's
    batches of `shard_batches(arange(N))` are). When a batch reaches past the window, the next window's
    chunks are read (sorted, so each is one sequential read) into the same buffer, after the images of
    the current batch that are still needed. The buffer holds one window and one batch: the memory bound.
    """

    def __init__(self, images: DiskImages, order: torch.Tensor, bounds: list[int], largest_batch: int) -> None:
        self.images = images
        self.order = order.numpy()
        self.bounds = bounds
        widest = max((high - low for low, high in zip(bounds, bounds[1:])), default=0)
        self.buffer = torch.empty((widest + largest_batch, *images.item_shape), dtype=images.dtype)
        self.held = np.empty(0, np.int64)  # view positions held, in buffer order
        self.sorter = np.empty(0, np.int64)
        self.loaded = 0  # windows read so far: the buffer holds order positions up to bounds[loaded]

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Images at order positions [start, stop), a new CPU tensor (the buffer is reused)."""
        FREE_MEMORY.check()
        while stop > self.bounds[self.loaded]:
            self._next_window(start)
        return self.buffer[torch.from_numpy(self._slots(self.order[start:stop]))]

    def _next_window(self, start: int) -> None:
        carried = self.order[start : self.bounds[self.loaded]] if self.loaded else np.empty(0, np.int64)
        if len(carried):
            self.buffer[: len(carried)] = self.buffer[torch.from_numpy(self._slots(carried))]
        low, high = self.bounds[self.loaded], self.bounds[self.loaded + 1]
        incoming = np.sort(self.order[low:high])
        end = len(carried) + len(incoming)
        self.images.read_into(incoming, self.buffer[len(carried) : end].numpy())
        self.held = np.concatenate([carried, incoming])
        self.sorter = np.argsort(self.held, kind="stable")
        self.loaded += 1

    def _slots(self, positions: np.ndarray) -> np.ndarray:
        """Where in the buffer the images of view `positions` are."""
        return self.sorter[np.searchsorted(self.held, positions, sorter=self.sorter)]


def window_bytes(item_bytes: int, batch_size: int) -> int:
    """Bytes of images a streamed epoch holds at most (the memory bound): a window and a carried batch."""
    return (WINDOW_CHUNKS * max(1, CHUNK_BYTES // item_bytes) + batch_size + 1) * item_bytes


# ---------------------------------------------------------------------------------------------------------
# Will it fit?


def fits_in_memory(nbytes: int, processes: int = 1) -> bool:
    """Whether `processes` processes can each take `nbytes` more memory comfortably (see MEMORY_SHARE).

    True where the available memory cannot be told (not Linux): there the in-memory path is kept, as before.
    """
    room = available_memory()
    return room is None or nbytes * processes <= room * MEMORY_SHARE


def available_memory() -> int | None:
    """Bytes this process can still use: the least of the system's MemAvailable, its cgroup's limit less
    its usage (v2 memory.max, v1 memory.limit_in_bytes; page cache it could reclaim counted as free), and
    the RLIMIT_DATA / RLIMIT_AS room; None when none of them can be read."""
    rooms = [room for room in (_meminfo_available(), _cgroup_room(), _rlimit_room()) if room is not None]
    return min(rooms) if rooms else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) is None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Limit less (usage less inactive page cache) of this process's memory cgroup and its ancestors."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            names, mount = ("memory.max", "memory.current", "inactive_file"), Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):  # v1
            names, mount = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), \
                Path("/sys/fs/cgroup/memory")
        else:
            continue
        # In a container the process's own cgroup is often mounted as the root: look there as well.
        relative = Path(path.lstrip("/"))
        for folder in {mount / relative, *[mount / parent for parent in relative.parents], mount}:
            room = _cgroup_folder_room(folder, *names)
            if room is not None:
                rooms.append(room)
    return min(rooms) if rooms else None


def _cgroup_folder_room(folder: Path, limit_name: str, usage_name: str, inactive_name: str) -> int | None:
    limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
    if limit is None or usage is None or limit >= 1 << 60:  # v1 says "no limit" with a huge number
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_name:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, limit - max(0, usage - inactive))


def _rlimit_room() -> int | None:
    """RLIMIT_DATA less VmData and RLIMIT_AS less VmSize (what each limit counts), the smaller."""
    try:
        import resource

        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    except (ImportError, OSError, ValueError):
        return None
    rooms = []
    for limit, key in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and key in status:
            rooms.append(max(0, soft - int(status[key].split()[0]) * 1024))
    return min(rooms) if rooms else None
