"""Image folders larger than memory: decoded into the cache chunk by chunk, then read from disk in shuffled chunks.

Real generated image folders, the real cache files and real `cnnkit train` processes: the chunked order is a
seeded permutation that data-parallel ranks share out exactly once; a split on disk gives the images, batches,
statistics, fingerprint and scores the same split in memory gives; a streamed fit is deterministic and
resumes exactly; a decode killed half-way leaves nothing that is read or kept; and a training on a folder three
times the memory cap of its process (RLIMIT_DATA) streams through an epoch in bounded memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.disk import WINDOW_CHUNKS, ChunkWindow, DiskImages, chunked_order
from cnnkit.data.folder import load_image_folder
from cnnkit.data.tensors import Split, batches_per_epoch, load_dataset, train_batches
from cnnkit.engine.callbacks.checkpoint import Checkpoint
from cnnkit.engine.checkpoint import data_fingerprint, read_checkpoint
from cnnkit.engine.evaluate import loss_and_accuracy
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model

from checkpoints import StopAfter

ROOT = Path(__file__).resolve().parents[1]


def benchmark():
    """benchmarks/stream_memory.py, for its folder generator and tiny model (one definition of both)."""
    spec = importlib.util.spec_from_file_location("stream_memory_benchmark", ROOT / "benchmarks" / "stream_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_split_folder(root: Path, sizes: dict[str, int], side: int = 20, classes: int = 3, seed: int = 0) -> Path:
    """root/{train,val,test}/<class>/<n>.png of distinct random images (every image tells itself apart)."""
    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_split_folder(tmp_path_factory.mktemp("images"), {"train": 150, "val": 20, "test": 30})


@pytest.fixture(scope="module")
def both(folder: Path, tmp_path_factory):
    """The same folder loaded in memory and on disk (one cache)."""
    cache = tmp_path_factory.mktemp("cache")
    return (load_dataset(f"imagefolder:{folder}", str(cache), stream="no", progress=False),
            load_dataset(f"imagefolder:{folder}", str(cache), stream="yes", progress=False))


# ----------------------------------------------------------------------------------------------------
# The order


def test_chunked_order_is_a_seeded_permutation_of_shuffled_windows():
    count, chunk = 1003, 7
    order, bounds = chunked_order(count, chunk, torch.Generator().manual_seed(5))
    again, same_bounds = chunked_order(count, chunk, torch.Generator().manual_seed(5))
    other, _ = chunked_order(count, chunk, torch.Generator().manual_seed(6))
    assert torch.equal(order.sort().values, torch.arange(count))
    assert torch.equal(order, again) and bounds == same_bounds and not torch.equal(order, other)
    assert bounds[0] == 0 and bounds[-1] == count and len(bounds) - 1 == -(-count // (chunk * WINDOW_CHUNKS))
    for low, high in zip(bounds, bounds[1:]):
        window = order[low:high]
        chunks = torch.unique(window // chunk)
        assert len(chunks) <= WINDOW_CHUNKS  # a window is a few whole chunks ...
        whole = torch.cat([torch.arange(c * chunk, min((c + 1) * chunk, count)) for c in chunks.tolist()])
        assert torch.equal(window.sort().values, whole)
        assert not torch.equal(window, window.sort().values)  # ... shuffled inside


def test_two_ranks_share_a_streamed_epoch_exactly_once(both):
    memory, disk = both
    count = len(disk.train)
    # Labels replaced by row numbers, so each batch says which images it holds.
    rows = torch.arange(count)
    memory_split, disk_split = Split(memory.train.images, rows), Split(disk.train.images, rows)
    per_rank = []
    for rank in (0, 1):
        batches = list(train_batches(disk_split, 16, generator=torch.Generator().manual_seed(3), rank=rank,
                                     world_size=2))
        assert len(batches) == batches_per_epoch(count, 16, 2)
        for images, labels in batches:
            assert torch.equal(images, memory_split.images[labels])  # the images those rows hold
        per_rank.append([labels for _, labels in batches])
    # Step by step the two ranks' batches are the halves of the global batches of one chunked order.
    order, _ = chunked_order(count, disk.train.images.chunk_rows, torch.Generator().manual_seed(3))
    together = torch.cat([torch.cat(pair) for pair in zip(*per_rank)])
    assert torch.equal(together, order) and torch.equal(together.sort().values, rows)
    one_rank = torch.cat([labels for _, labels in train_batches(disk_split, 32,
                                                                generator=torch.Generator().manual_seed(3))])
    assert torch.equal(one_rank, order)


def test_a_window_carries_a_batch_over_its_edge(both):
    """Small chunks, so an epoch has several windows and batches that straddle them (one wider than a window)."""
    memory, disk = both
    count = len(disk.train)
    for chunk, batch_size in ((3, 40), (1, 50)):  # windows of 96 and of 32 images
        order, bounds = chunked_order(count, chunk, torch.Generator().manual_seed(1))
        assert len(bounds) > 2
        window = ChunkWindow(disk.train.images, order, bounds, largest_batch=batch_size)
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            assert torch.equal(window.batch(start, stop), memory.train.images[order[start:stop]])


# ----------------------------------------------------------------------------------------------------
# The same data on disk as in memory


def test_a_split_on_disk_reads_what_the_split_in_memory_holds(both):
    memory, disk = both
    assert disk.streamed and not memory.streamed and disk.input_shape == memory.input_shape
    for name in ("train", "val", "test"):
        in_memory, on_disk = getattr(memory, name), getattr(disk, name)
        assert isinstance(on_disk.images, DiskImages) and isinstance(in_memory.images, torch.Tensor)
        assert torch.equal(on_disk.labels, in_memory.labels) and on_disk.images.shape == in_memory.images.shape
        assert torch.equal(on_disk.loaded().images, in_memory.images)
    images, expected = disk.train.images, memory.train.images
    index = torch.tensor([7, 3, 3, len(expected) - 1, 0])  # unsorted, repeated
    assert torch.equal(images[index], expected[index])
    assert torch.equal(images[5:40:3], expected[5:40:3]) and torch.equal(images[-1], expected[-1])
    assert torch.equal(images.take(index)[1:], expected[index][1:])
    last = images.to("cpu", memory_format=torch.channels_last)[:4]
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected[:4])
    for got, want in zip(*(d.channel_stats() for d in (disk, memory))):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    splits = lambda d: [*(s.labels for s in (d.train, d.val, d.test)), *(s.images for s in (d.train, d.val, d.test))]
    assert data_fingerprint(*splits(disk)) == data_fingerprint(*splits(memory))  # a resume accepts either


def test_scores_on_disk_equal_scores_in_memory(both):
    memory, disk = both
    model = build_model("fast", memory.input_shape, memory.num_classes, seed=0)
    for split in ("val", "test"):
        on_disk = getattr(disk, split).to("cpu", torch.channels_last)
        in_memory = getattr(memory, split).to("cpu", torch.channels_last)
        assert loss_and_accuracy(model, on_disk, batch_size=7) == loss_and_accuracy(model, in_memory, batch_size=7)


def test_held_out_limited_and_resplit_views_match_memory(folder, tmp_path):
    """--val re-splits train + the folder's val/ together (two files as one view), --limit-* take seeded views."""
    options = dict(val=0.25, limit_train=100, limit_eval=25, progress=False)
    memory = load_dataset(f"imagefolder:{folder}", str(tmp_path), stream="no", **options)
    disk = load_dataset(f"imagefolder:{folder}", str(tmp_path), stream="yes", **options)
    assert disk.streamed
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(disk, name).loaded().images, getattr(memory, name).images)
        assert torch.equal(getattr(disk, name).labels, getattr(memory, name).labels)


def test_auto_loads_what_fits_and_stream_yes_needs_a_cache(folder, tmp_path, shared_data):
    auto = load_dataset(f"imagefolder:{folder}", str(tmp_path), progress=False)
    assert not auto.streamed and isinstance(auto.train.images, torch.Tensor)  # a few MB: loaded as before
    with pytest.raises(CnnkitError, match="only imagefolder: datasets stream"):
        load_dataset("mnist", str(shared_data), stream="yes", limit_train=100, progress=False)
    with pytest.raises(CnnkitError, match="--stream must be one of"):
        load_dataset(f"imagefolder:{folder}", str(tmp_path), stream="maybe", progress=False)


# ----------------------------------------------------------------------------------------------------
# Training from disk


def test_a_streamed_fit_repeats_and_resumes_bit_for_bit(both, tmp_path):
    _, disk = both
    options = dict(epochs=3, batch_size=32, lr=3e-3, optimizer="adamw", augment="shift=2", ema=0.9, seed=4,
                   precision="fp32", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [build_model("fast", disk.input_shape, disk.num_classes, seed=4) for _ in range(3)]
        first = fit(runs[0], disk, **options)
        second = fit(runs[1], disk, **options)
        with pytest.raises(KeyboardInterrupt):
            fit(runs[2], disk, callbacks=[Checkpoint(tmp_path), StopAfter(1)], **options)
        resumed_model = build_model("fast", disk.input_shape, disk.num_classes, seed=4)
        resumed = fit(resumed_model, disk, resume=read_checkpoint(tmp_path), **options)
    finally:
        torch.set_num_threads(threads)
    assert first.history["loss"] == second.history["loss"] == resumed.history["loss"]
    for other in (runs[1], resumed_model):
        assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), other.state_dict().values()))


# ----------------------------------------------------------------------------------------------------
# The cache: written chunk by chunk, whole or not at all


def test_a_decode_killed_half_way_leaves_no_entry_and_its_debris_is_swept(tmp_path):
    images = benchmark().make_folder(tmp_path / "images", 4000, 96, suffix=".png")
    cache = tmp_path / "cache"
    code = "import sys; from cnnkit.data.folder import load_image_folder; load_image_folder(sys.argv[1], sys.argv[2])"
    process = subprocess.Popen([sys.executable, "-c", code, str(images), str(cache)])
    deadline = time.monotonic() + 120
    while not list(cache.glob("imagefolder/*/.train_images.npy.*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline, "the decode ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)  # into the decoding
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    entry = next(cache.glob("imagefolder/*"))
    assert not (entry / "meta.json").exists() and list(entry.glob(".*.tmp"))  # debris, never an entry

    data = load_image_folder(images, cache)
    assert not data.from_cache and sorted(p.name for p in entry.iterdir()) == [
        "meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert load_image_folder(images, cache).from_cache


def test_a_failed_decode_leaves_nothing(tmp_path):
    root = write_split_folder(tmp_path / "images", {"train": 3}, classes=2)
    for path in (root / "train" / "c1").iterdir():
        path.write_bytes(b"not an image")  # one class left: nothing to train on
    with pytest.raises(CnnkitError, match="fewer than two classes"):
        load_image_folder(root, tmp_path / "cache")
    assert list((tmp_path / "cache" / "imagefolder").iterdir()) == []


def test_images_that_fail_to_decode_are_squeezed_out_of_the_files(folder, tmp_path):
    broken = tmp_path / "images"
    for path in folder.rglob("*.png"):
        target = broken / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    for name in ("train/c0/5.png", "train/c1/0.png", "val/c2/19.png"):
        (broken / name).write_bytes(b"\x89PNG broken")
    in_memory = load_image_folder(broken, None)  # decoded in memory, no cache
    on_disk = load_image_folder(broken, tmp_path / "cache", on_disk=True)
    assert in_memory.skipped == on_disk.skipped
    assert [item.file for item in in_memory.skipped] == ["train/c0/5.png", "train/c1/0.png", "val/c2/19.png"]
    # Each image's file, in the order of its arrays, from the cache as from memory: the listing less the broken
    assert in_memory.files == on_disk.files
    assert "train/c0/5.png" not in in_memory.files["train"] and "train/c0/6.png" in in_memory.files["train"]
    for split, (images, _) in in_memory.splits.items():  # the i-th file is the i-th image
        files = in_memory.files[split]
        assert len(files) == len(images)
        for index in (0, len(files) // 2, len(files) - 1):
            pixels = np.asarray(Image.open(broken / files[index]).convert("RGB")).transpose(2, 0, 1)
            np.testing.assert_array_equal(images[index], pixels)
    for split, (images, labels) in in_memory.splits.items():
        np.testing.assert_array_equal(on_disk.splits[split][0].load(), images)
        np.testing.assert_array_equal(on_disk.splits[split][1], labels)


# ----------------------------------------------------------------------------------------------------
# A real training on a folder three times its memory cap

#: RLIMIT_DATA of the training process. It counts the private writable memory of a process (heap, anonymous
#: maps: what RSS counts but shared libraries and mapped files), not the page cache its reads go through.
#: Measured: `cnnkit train` of 500 MNIST images needs 450-600 MiB of it, this test's streamed training on a
#: 0.5 GB folder ~600 MiB (its peak RSS 580 MB), so 768 MiB leaves a margin; the folder decodes to 3x it.
CAP = 768 << 20


def capped(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA counts what Linux counts")
def test_training_on_a_folder_three_times_the_memory_cap_streams_in_bounded_memory(tmp_path):
    bench = benchmark()
    side, test_images = 128, 200
    count = 3 * CAP // (3 * side * side) // bench.CLASSES * bench.CLASSES + bench.CLASSES  # just over 3x the cap
    images = tmp_path / "images"  # train/ and a small test/: the time goes into the training epoch
    bench.make_folder(images / "train", count - test_images, side, suffix=".bmp")  # uncompressed: quick to decode
    bench.make_folder(images / "test", test_images, side, seed=1, suffix=".bmp")
    (tmp_path / "tiny.py").write_text(bench.TINY_MODEL)
    train = [sys.executable, "-m", "cnnkit", "train", "--dataset", f"imagefolder:{images}", "--data-dir",
             str(tmp_path / "cache"), "--model", f"{tmp_path / 'tiny.py'}:build", "--epochs", "1", "--val", "200",
             "--batch-size", "64", "--eval-batch-size", "64", "--flip", "no", "--no-checkpoint", "--runs-dir",
             str(tmp_path / "runs"), "--threads", "1"]  # this tiny model's step: 14 ms on 1 thread, 88 ms on 2 here

    process = subprocess.Popen([*train, "--name", "streamed"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=capped(CAP))
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    peak = usage.ru_maxrss * 1024  # the largest of the training process and the decode workers it started
    decoded = count * 3 * side * side
    assert decoded > 3 * CAP
    assert "images stream from" in output  # --stream auto saw the cap
    run = tmp_path / "runs" / "streamed"
    assert json.loads((run / "config.json").read_text())["stream"] == "yes"  # recorded: a resume streams too
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_train"] + metrics["num_val"] + metrics["num_test"] == count
    assert peak < CAP and peak < decoded / 3, f"peak RSS {peak / 2**20:.0f} MiB for {decoded / 2**20:.0f} MiB"
    print(f"decoded {decoded / 2**20:.0f} MiB, cap {CAP / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB")

    # The cap is real: loading the same images into memory fails under it, with the way out named.
    loading = subprocess.run([*train, "--stream", "no", "--name", "loaded"], capture_output=True, text=True,
                             preexec_fn=capped(CAP), timeout=300)
    assert loading.returncode == 1 and "--stream auto or yes" in loading.stderr, loading.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA counts what Linux counts")
def test_an_audit_of_a_folder_larger_than_its_memory_is_one_line_naming_a_sample_that_fits(tmp_path):
    """`cnnkit audit` keeps the images it audits in memory: a folder that would not fit is refused in one line,
    after decoding into the cache chunk by chunk (bounded) and before reading the images back; the sample the
    line suggests (`--limit N`) is then audited under the same cap."""
    import re

    folder, rng = tmp_path / "images", np.random.default_rng(0)
    for label in range(2):  # 6,000 distinct 128x128 colour images: 295 MB decoded, held ~3 times by an audit
        (folder / f"c{label}").mkdir(parents=True)
        for index in range(3000):
            pixels = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{index}.bmp")
    audit = [sys.executable, "-m", "cnnkit", "audit", f"imagefolder:{folder}", "--data-dir", str(tmp_path / "cache"),
             "--out", str(tmp_path / "audit")]
    refused = subprocess.run(audit, capture_output=True, text=True, preexec_fn=capped(CAP), timeout=300)
    line = refused.stderr.strip()
    assert refused.returncode == 1 and "\n" not in line and "Traceback" not in line, refused.stderr[-2000:]
    assert line.startswith(f"cnnkit: error: imagefolder:{folder}: its 6,000 images would take") and "--limit" in line
    assert not (tmp_path / "audit").exists()  # refused before anything was written
    sample = int(re.search(r"--limit (\d+)", line).group(1))  # as a user would type it: no thousands separator
    assert 10 <= sample < 5400, line
    done = subprocess.run([*audit, "--limit", str(sample), "--only", "duplicates"], capture_output=True, text=True,
                          preexec_fn=capped(CAP), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"among {sample + 600:,} images" in done.stdout, done.stdout  # the sample and the 10% held out as test
