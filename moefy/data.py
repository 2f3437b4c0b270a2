"""Small offline image datasets for the examples. Nothing here downloads.

* :func:`load_idx_dataset`: MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]`` …) from a
  directory; Debian's ``dataset-fashion-mnist`` package installs them in ``/usr/share/datasets/fashion-mnist``.
* :func:`load_digits_dataset`: scikit-learn's bundled 8×8 digits (1,797 images), the fallback.
* :func:`load_cifar10`: CIFAR-10 in its python-pickle format (``data_batch_1`` … ``test_batch``) from a
  directory you give.
* :func:`load_images`: the first that is there, logging which one it used.

Images come back as float32 tensors (N, C, H, W) in [0, 1] and labels as int64 (N,).
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from .checks import check_int, check_number, check_path

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IDX_DIRS: Tuple[str, ...] = ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
               0x0E: torch.float64}


@dataclass(frozen=True)
class ImageDataset:
    """A train/test split of labelled images.

    Attributes:
        train_x, test_x: (N, C, H, W) float32 in [0, 1].
        train_y, test_y: (N,) int64 class ids.
        classes: class names, ``classes[y]``.
        name: what was loaded and from where, e.g. ``"fashion-mnist (/usr/share/datasets/fashion-mnist)"``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: Tuple[str, ...]
    name: str

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> "ImageDataset":
        """At most ``train`` / ``test`` samples of each split, drawn at random with ``seed`` (None: all)."""
        for name, n in (("train", train), ("test", test)):
            check_int(n, name, min=1, optional=True)
        gen = torch.Generator().manual_seed(check_int(seed, "seed", type_error=TypeError))

        def take(x, y, n):
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=gen)[:n]
            return x[idx], y[idx]

        train_x, train_y = take(self.train_x, self.train_y, train)
        test_x, test_y = take(self.test_x, self.test_y, test)
        return replace(self, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def read_idx(path: PathLike) -> torch.Tensor:
    """Read one IDX file (optionally gzipped) into a tensor of its stored dtype and shape."""
    path = check_path(path, "path")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dims need {4 + 4 * ndim} bytes, the file has "
                         f"{len(data)})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = bytearray(data[4 + 4 * ndim:])
    if len(body) % dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} of {dtype} but the body holds {len(body)} bytes, "
                         f"not a multiple of {dtype.itemsize}")
    raw = torch.frombuffer(body, dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    if dtype.itemsize > 1 and sys.byteorder == "little":  # IDX stores big-endian values
        raw = raw.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
    t = raw.view(dtype)
    expected = 1
    for s in shape:
        expected *= s
    if t.numel() != expected:
        raise ValueError(f"{path}: header says shape {shape} but holds {t.numel()} values")
    return t.reshape(shape)


def _find(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def has_idx_dataset(directory: PathLike) -> bool:
    """Whether ``directory`` holds the four MNIST-style IDX files."""
    d = check_path(directory, "directory")
    return d.is_dir() and all(_find(d, stem) is not None for pair in _IDX_FILES.values() for stem in pair)


def load_idx_dataset(directory: PathLike, classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """MNIST or Fashion-MNIST from the IDX files in ``directory`` (gzipped or not): (N, 1, 28, 28)."""
    d = check_path(directory, "directory")
    if not has_idx_dataset(d):
        raise FileNotFoundError(f"{d} does not hold the IDX files {[s for p in _IDX_FILES.values() for s in p]}"
                                f" (optionally .gz)")
    splits = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = read_idx(_find(d, images))
        y = read_idx(_find(d, labels)).long()
        if x.dim() != 3 or y.shape != x.shape[:1]:
            raise ValueError(f"{d}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
        splits[split] = (x.unsqueeze(1).float().div_(255.0), y)
    if classes is None:
        classes = FASHION_CLASSES if "fashion" in str(d).lower() else tuple(str(i) for i in range(10))
    name = f"{'fashion-mnist' if 'fashion' in str(d).lower() else 'mnist'} ({d})"
    return ImageDataset(*splits["train"], *splits["test"], classes=tuple(classes), name=name)


def load_digits_dataset(test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8×8 digits (no download), split at random: (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # an optional dependency: pip install 'moefy[examples]'
        raise ImportError("load_digits_dataset needs scikit-learn: pip install 'moefy[examples]'") from err
    check_number(test_fraction, "test_fraction", low=0, high=1, low_open=True, high_open=True)
    check_int(seed, "seed", type_error=TypeError)
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return ImageDataset(x[train], y[train], x[test], y[test], classes=tuple(str(i) for i in range(10)),
                        name="sklearn digits (8x8, bundled with scikit-learn)")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _key(batch: dict, name: str):
    return batch[name.encode()] if name.encode() in batch else batch[name]


def load_cifar10(directory: PathLike) -> ImageDataset:
    """CIFAR-10 from ``directory`` in the python-pickle format (``cifar-10-batches-py``): (N, 3, 32, 32).

    Only load pickles you trust: unpickling runs code.
    """
    d = check_path(directory, "directory")
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    train_files = sorted(d.glob("data_batch_*"))
    if not train_files or not (d / "test_batch").is_file():
        raise FileNotFoundError(f"{d} does not hold CIFAR-10 python batches (data_batch_1 … data_batch_5, "
                                f"test_batch)")

    def read(files):
        batches = [_unpickle(f) for f in files]
        x = torch.cat([torch.as_tensor(_key(b, "data"), dtype=torch.uint8) for b in batches])
        y = torch.cat([torch.as_tensor(list(_key(b, "labels")), dtype=torch.long) for b in batches])
        return x.reshape(-1, 3, 32, 32).float().div_(255.0), y

    classes = CIFAR10_CLASSES
    if (d / "batches.meta").is_file():
        classes = tuple(n.decode() if isinstance(n, bytes) else n
                        for n in _key(_unpickle(d / "batches.meta"), "label_names"))
    return ImageDataset(*read(train_files), *read([d / "test_batch"]), classes=classes, name=f"cifar-10 ({d})")


def load_images(data_dir: Optional[PathLike] = None, fallback: bool = True) -> ImageDataset:
    """The examples' data: IDX files or CIFAR-10 batches in ``data_dir`` if given, else the first of
    :data:`IDX_DIRS` that holds IDX files, else (``fallback``) scikit-learn's digits. Logs what it used."""
    if data_dir is not None:
        d = check_path(data_dir, "data_dir")
        if has_idx_dataset(d):
            data = load_idx_dataset(d)
        elif (d / "test_batch").is_file() or (d / "cifar-10-batches-py").is_dir():
            data = load_cifar10(d)
        else:
            raise FileNotFoundError(f"data_dir {d} holds neither MNIST-style IDX files nor CIFAR-10 batches")
    else:
        found = next((Path(p) for p in IDX_DIRS if has_idx_dataset(p)), None)
        if found is not None:
            data = load_idx_dataset(found)
        elif fallback:
            logger.warning("no IDX dataset in %s (apt-get install dataset-fashion-mnist): falling back to "
                           "scikit-learn's 8x8 digits", ", ".join(IDX_DIRS))
            data = load_digits_dataset()
        else:
            raise FileNotFoundError(f"no IDX dataset in {IDX_DIRS} and fallback=False")
    logger.info("data: %s, %d train / %d test images of shape %s", data.name, len(data.train_y),
                len(data.test_y), data.image_shape)
    return data
