"""Offline loaders: IDX files written here by hand, a fake CIFAR-10 pickle, the digits fallback."""
import gzip
import logging
import pickle
import struct

import pytest
import torch

from moefy import data as moedata
from moefy.data import (has_idx_dataset, load_cifar10, load_digits_dataset, load_idx_dataset, load_images,
                        read_idx)


def write_idx(path, values: torch.Tensor, type_code: int, gz: bool):
    header = bytes([0, 0, type_code, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    fmt = {0x08: "B", 0x0C: "i"}[type_code]
    body = struct.pack(f">{values.numel()}{fmt}", *values.reshape(-1).tolist())
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


def make_idx_dir(directory, gz=True):
    images = torch.arange(3 * 2 * 2, dtype=torch.uint8).reshape(3, 2, 2) * 20
    suffix = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", images, 0x08, gz)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", torch.tensor([7, 0, 3]), 0x08, gz)
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", images[:1], 0x08, gz)
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", torch.tensor([9]), 0x08, gz)
    return images


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    images = make_idx_dir(tmp_path, gz)
    assert has_idx_dataset(tmp_path)
    data = load_idx_dataset(tmp_path)
    assert data.train_x.shape == (3, 1, 2, 2) and data.train_x.dtype == torch.float32
    torch.testing.assert_close(data.train_x[:, 0], images.float() / 255)
    assert data.train_y.tolist() == [7, 0, 3] and data.test_y.tolist() == [9]
    assert data.name.startswith("mnist") and data.num_classes == 10


def test_read_idx_big_endian_int32(tmp_path):
    values = torch.tensor([[1, -2, 70000], [3, 256, -1]], dtype=torch.int32)
    write_idx(tmp_path / "x.idx", values, 0x0C, gz=False)
    got = read_idx(tmp_path / "x.idx")
    assert got.dtype == torch.int32 and torch.equal(got, values)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "junk")


def test_cifar10_pickles(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for name, n in (("data_batch_1", 4), ("data_batch_2", 3), ("test_batch", 2)):
        raw = torch.randint(0, 256, (n, 3 * 32 * 32), generator=rng, dtype=torch.uint8)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": raw.numpy(), b"labels": list(range(n))}, f)
        if name == "data_batch_1":
            first = raw[0]
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    data = load_images(tmp_path)
    assert data.train_x.shape == (7, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_y.tolist() == [0, 1, 2, 3, 0, 1, 2] and data.classes[3] == "c3"
    # channel-major rows: the first 1024 bytes are the red plane
    torch.testing.assert_close(data.train_x[0, 0].reshape(-1), first[:1024].float() / 255)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_cifar10(tmp_path / "missing")


def test_fallback_to_digits_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(moedata, "IDX_DIRS", (str(tmp_path / "none"),))
    with caplog.at_level(logging.INFO, logger="moefy.data"):
        data = load_images()
    assert data.name.startswith("sklearn digits")
    assert "falling back" in caplog.text and "sklearn digits" in caplog.text
    assert data.train_x.shape[1:] == (1, 8, 8) and len(data.train_y) + len(data.test_y) == 1797
    assert float(data.train_x.max()) == 1.0 and float(data.train_x.min()) == 0.0
    with pytest.raises(FileNotFoundError):
        load_images(fallback=False)


def test_digits_split_is_deterministic_and_subset():
    a, b = load_digits_dataset(seed=1), load_digits_dataset(seed=1)
    assert torch.equal(a.test_y, b.test_y) and len(a.test_y) == 449
    small = a.subset(train=100, test=20)
    assert len(small.train_y) == 100 and len(small.test_y) == 20 and small.classes == a.classes


def test_data_dir_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_images(tmp_path)


@pytest.mark.skipif(not has_idx_dataset("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist():
    data = load_images()
    assert data.name.startswith("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
