"""Data sets: fetching (canonical address or local mirror), integrity checks, loading.

Every data set becomes a `Dataset` of compact tensors (uint8 images, long labels) that the
training loop keeps on the device.

    core       Dataset, DataError, semi-supervised label masks
    fetch      mirror or download, HTML pages refused, checksums, atomic install
    mnist      binarised MNIST (.amat / MAT) and labelled MNIST (IDX)
    omniglot   chardata.mat or the PNG zips
    celeba     img_align_celeba.zip (as distributed) or the extracted folder; parallel decoding
    synthetic  shapes x positions images, factorial vectors
"""
from __future__ import annotations

import os
from pathlib import Path

from fmvae.data.celeba import CELEBA_PROPERTIES, find_celeba, load_celeba, read_celeba_attributes
from fmvae.data.core import DATASETS, DataError, Dataset, refuse_html, semi_supervised_labels
from fmvae.data.download import FILES, OPTIONAL, RemoteFile, fetch, fetch_file, install, sha256_file
from fmvae.data.mnist import load_binarized_mnist, load_mnist, read_binarized_mnist_split, read_idx
from fmvae.data.omniglot import OMNIGLOT_SPLITS, load_omniglot, omniglot_pngs, split_within_characters
from fmvae.data.synthetic import factorial_vectors, load_synthetic, synthetic_images

__all__ = ["CELEBA_PROPERTIES", "DATASETS", "DataError", "Dataset", "FILES", "OPTIONAL", "RemoteFile", "factorial_vectors",
           "fetch", "fetch_file", "find_celeba", "load", "load_binarized_mnist", "load_celeba", "load_mnist",
           "load_omniglot", "load_prepared", "OMNIGLOT_SPLITS", "split_within_characters", "load_synthetic", "omniglot_pngs", "read_binarized_mnist_split",
           "read_celeba_attributes", "read_idx", "refuse_html", "save_prepared", "semi_supervised_labels",
           "sha256_file", "synthetic_images", "install"]


def load(name: str, folder: Path | None, seed: int = 0, omniglot_split: str = "characters",
         partial: bool = False) -> Dataset:
    """The data set `name` from `folder`; `omniglot_split` and `partial` are the params data.omniglot_split
    and data.partial (each read by one data set only)."""
    if name == "binarized_mnist":
        return load_binarized_mnist(folder)
    if name == "mnist":
        return load_mnist(folder, seed)
    if name == "omniglot":
        return load_omniglot(folder, seed, omniglot_split)
    if name == "celeba":
        return load_celeba(folder, partial=partial)
    if name == "synthetic":
        return load_synthetic(seed=seed)
    raise ValueError(f"data.name: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def save_prepared(ds: Dataset, path: str | os.PathLike) -> None:
    from fmvae.io import save_checked
    save_checked(ds.state(), path)


def load_prepared(path: str | os.PathLike) -> Dataset:
    from fmvae.io import load_checked
    return Dataset(**load_checked(path))
