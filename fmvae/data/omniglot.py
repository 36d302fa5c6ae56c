"""Omniglot: the paper's 28x28 chardata.mat, or the original PNG zips box-filtered to 28x28."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from .core import DataError, Dataset
from .fetch import refuse_html
from .mnist import _first, _images


def omniglot_pngs(zip_path: Path) -> np.ndarray:
    """All drawings of an Omniglot zip, resized 105 -> 28 (box filter), strokes = 1, (N, 784) uint8."""
    from PIL import Image
    refuse_html(zip_path)
    out = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((28, 28), Image.Resampling.BOX)
            out.append((np.asarray(img) < 128).reshape(-1))  # ink is dark on white
    if not out:
        raise DataError(f"{zip_path.name}: no PNG drawings inside")
    return np.stack(out).astype(np.uint8)


def load_omniglot(folder: Path, seed: int = 0) -> Dataset:
    chardata = _first(folder, "chardata.mat")
    if chardata is not None:  # the paper's 28x28 version: columns in Fortran order, grey levels
        from scipy.io import loadmat
        mat = loadmat(chardata)
        to_x = lambda a: (a.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784) > 0.5).astype(np.uint8)
        return Dataset("omniglot", _images(to_x(mat["data"])), _images(to_x(mat["testdata"])), "binary")
    background = [p for p in (_first(folder, "images_background.zip"),) if p] or \
        [p for p in (_first(folder, "images_background_small1.zip"), _first(folder, "images_background_small2.zip")) if p]
    evaluation = _first(folder, "images_evaluation.zip")
    train = np.concatenate([omniglot_pngs(p) for p in background]) if background else None
    if train is not None and evaluation is not None:
        return Dataset("omniglot", _images(train), _images(omniglot_pngs(evaluation)), "binary")
    if train is None:
        raise DataError(f"omniglot: no chardata.mat or images_*.zip in {folder}")
    perm = np.random.default_rng(seed).permutation(len(train))  # one source only: seeded 80/20 split
    cut = int(0.8 * len(train))
    return Dataset("omniglot", _images(train[perm[:cut]]), _images(train[perm[cut:]]), "binary")
