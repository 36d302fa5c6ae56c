"""MNIST readers: the fixed binarisation (text .amat or MAT) and the labelled IDX files."""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from fmvae.data.core import DataError, Dataset, first_present, images28, refuse_html


def _check_binary(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != 784 or (n is not None and x.shape[0] != n):
        raise DataError(f"{name}: expected ({n if n else 'N'}, 784) binary images, got shape {x.shape}")
    if not np.isin(np.unique(x), (0, 1)).all():
        raise DataError(f"{name}: values must be 0 or 1, found {np.unique(x)[:10]}")
    return x.astype(np.uint8)


def read_binarized_mnist_split(path: Path, n: int | None = None) -> np.ndarray:
    """Text .amat (784 0/1 values a line) or MATLAB file with variable X; (N, 784) uint8."""
    with open(path, "rb") as f:
        head = f.read(512)
    refuse_html(path, head)
    if head.startswith(b"MATLAB"):
        from scipy.io import loadmat
        x = loadmat(path)["X"]
    else:
        import pandas as pd
        x = pd.read_csv(path, sep=" ", header=None, dtype=np.uint8).to_numpy()
    return _check_binary(np.asarray(x), path.name, n)


def read_idx(path: Path) -> np.ndarray:
    refuse_html(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path.name}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path.name}: header promises {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def load_binarized_mnist(folder: Path) -> Dataset:
    split = lambda s, n: read_binarized_mnist_split(first_present(folder, f"binarized_mnist_{s}.amat", f"binarized_mnist_{s}.mat"), n)
    return Dataset("binarized_mnist", images28(split("train", 50000)), images28(split("test", 10000)), "binary")


def load_mnist(folder: Path, seed: int = 0) -> Dataset:
    """Grey MNIST binarised once with a fixed seed; digit class as property 'digit' (K = 10)."""
    gen = torch.Generator().manual_seed(seed)
    binarise = lambda x: (torch.rand(x.shape, generator=gen) < torch.from_numpy(x.copy()).float() / 255).to(torch.uint8)
    x_test = read_idx(first_present(folder, "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"))
    y_test = read_idx(first_present(folder, "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")).astype(np.int64)
    if x_test.shape != (10000, 28, 28) or y_test.shape != (10000,) or y_test.max() > 9:
        raise DataError(f"mnist test set: expected (10000, 28, 28) images and 10000 labels in 0..9, got {x_test.shape}, {y_test.shape}")
    train_x = first_present(folder, "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
    train_y = first_present(folder, "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte")
    if train_x is not None and train_y is not None:
        x_train, y_train = read_idx(train_x), read_idx(train_y).astype(np.int64)
    else:
        warnings.warn("mnist: training images not available; using a seeded 8000/2000 split of the test set")
        perm = np.random.default_rng(seed).permutation(10000)
        x_train, y_train, x_test, y_test = x_test[perm[:8000]], y_test[perm[:8000]], x_test[perm[8000:]], y_test[perm[8000:]]
    return Dataset("mnist", binarise(x_train)[:, None], binarise(x_test)[:, None], "binary",
                   torch.from_numpy(y_train)[:, None], torch.from_numpy(y_test)[:, None], ["digit"], [10])
