"""IDX reading and writing: round trips, the real MNIST file, and every kind of damaged file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnnkit.data.idx import read_idx, write_idx
from cnnkit.errors import CnnkitError

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 2)])
def test_round_trip_dtypes_and_shapes(tmp_path: Path, dtype, suffix: str, shape) -> None:
    array = (np.arange(np.prod(shape)) - 5).astype(dtype).reshape(shape)
    path = tmp_path / f"data{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.flags.writeable
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == suffix.endswith(".gz")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    ),
    gz=st.booleans(),
)
def test_round_trip_generated(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = tmp_path / ("gen.idx.gz" if gz else "gen.idx")
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path), array)


def test_gzip_output_is_reproducible(tmp_path: Path) -> None:
    array = np.arange(100, dtype=np.uint8).reshape(10, 10)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_real_mnist_train_file(shared_data: Path) -> None:
    images = read_idx(shared_data / "mnist" / "train-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(shared_data / "mnist" / "train-labels-idx1-ubyte.gz", ndim=1)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert labels[0] == 5
    assert images.max() == 255 and images[0].sum() > 0


def test_raw_file_named_gz_still_reads(tmp_path: Path) -> None:
    """Someone gunzipped the file but kept the name: detection is by content, not by name."""
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "raw.idx", array)
    (tmp_path / "raw.idx.gz").write_bytes((tmp_path / "raw.idx").read_bytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.idx.gz"), array)


def test_truncated_gzip_real_mnist(tmp_path: Path, shared_data: Path) -> None:
    source = (shared_data / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    cut = tmp_path / "train-images-idx3-ubyte.gz"
    cut.write_bytes(source[: len(source) // 10])
    with pytest.raises(CnnkitError) as caught:
        read_idx(cut)
    message = str(caught.value)
    assert str(cut) in message and "\n" not in message
    assert "truncated IDX file: expected 47040000 bytes of data, found" in message


def test_truncated_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "images.idx"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CnnkitError, match=r"truncated IDX file: expected 7840 bytes of data, found 6840") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_trailing_data_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx"
    write_idx(path, np.zeros(10, np.uint8))
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(CnnkitError, match="trailing data"):
        read_idx(path)


def test_corrupt_gzip_body(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CnnkitError) as caught:
        read_idx(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "header",
    [
        b"\x01\x00\x08\x01",  # first magic byte not zero
        b"\x00\x00\x07\x01",  # unknown type code
        b"<!DOCTYPE html>",  # an HTML error page saved under the file's name
    ],
)
def test_bad_magic(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(header + b"\x00" * 64)
    with pytest.raises(CnnkitError, match="bad magic number") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_bad_magic_inside_gzip(tmp_path: Path) -> None:
    path = tmp_path / "page.gz"
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(CnnkitError, match="not an IDX file"):
        read_idx(path)


def test_zero_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "zero.idx"
    path.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(CnnkitError, match="number of dimensions is 0"):
        read_idx(path)


def test_header_cut_inside_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x0a")  # says 3 dims, has 1
    with pytest.raises(CnnkitError, match="header needs 16 bytes for 3 dimensions, found 8"):
        read_idx(path)


def test_wrong_dimension_count_for_caller(tmp_path: Path) -> None:
    """Passing the labels file where images are expected names the file and both dimension counts."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.zeros(10, np.uint8))
    with pytest.raises(CnnkitError, match=r"expected a 3-dimensional IDX file, found 1 dimension") as caught:
        read_idx(path, ndim=3)
    assert str(path) in str(caught.value)


def test_dims_disagree_with_payload(tmp_path: Path) -> None:
    """A header whose dimensions promise more data than the file holds."""
    path = tmp_path / "dims.idx"
    header = b"\x00\x00\x08\x02" + np.array([100, 100], ">u4").tobytes()
    path.write_bytes(header + b"\x00" * 50)
    with pytest.raises(CnnkitError, match="expected 10000 bytes of data, found 50"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CnnkitError, match="file not found"):
        read_idx(tmp_path / "nope.gz")


def test_write_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDX cannot store"):
        write_idx(tmp_path / "x.idx", np.zeros(3, np.uint64))
    assert list(tmp_path.iterdir()) == []
