"""Data sets: fetching (canonical address or local mirror), integrity checks, loading.

Every data set becomes a `Dataset` of compact tensors (uint8 images, long labels)
that the training loop keeps on the device. Files are fetched into `raw_dir`
from a mirror folder (param `data.mirror` or $FMVAE_DATA_MIRROR) or the canonical
address, checked (sha256 where known, shape and values always) and written
atomically: an interrupted fetch never leaves a file under its final name.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS = ("binarized_mnist", "mnist", "omniglot", "celeba", "synthetic")
CELEBA_PROPERTIES = ("Male", "Eyeglasses", "Smiling")


class DataError(RuntimeError):
    """A data file is missing, incomplete or of the wrong shape or values."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor                 # uint8 images (N, C, H, W) or float vectors (N, P)
    x_test: torch.Tensor
    kind: str                             # "binary" | "rgb" | "vector"
    y_train: torch.Tensor | None = None   # (N, P) long ground-truth properties, -1 unknown
    y_test: torch.Tensor | None = None
    property_names: list[str] = field(default_factory=list)
    property_K: list[int] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return {"binary": "conv28", "rgb": "conv64", "vector": "mlp"}[self.kind]

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """Storage dtype -> network input: {0,1} floats, RGB in [-1, 1], vectors as they are."""
        if self.kind == "binary":
            return x.float()
        if self.kind == "rgb":
            return x.float() / 127.5 - 1.0
        return x

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "x_train", "x_test", "kind", "y_train", "y_test",
                                                "property_names", "property_K")}


def semi_supervised_labels(y: torch.Tensor | None, fraction: float, n_factors: int, seed: int) -> torch.Tensor | None:
    """(N, I) labels for training: property p clamps factor p on a seeded `fraction` of points, -1 elsewhere."""
    if y is None or fraction <= 0:
        return None
    n, p = y.shape
    if p > n_factors:
        raise ValueError(f"model.I: {p} labelled properties need at least {p} factors, got I={n_factors}")
    labels = torch.full((n, n_factors), -1, dtype=torch.long)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: int(round(fraction * n))]
    labels[chosen, :p] = y[chosen]
    return labels


# ---------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    names: tuple[str, ...]       # accepted file names, canonical first
    url: str | None
    sha256: dict = field(default_factory=dict)  # name -> digest, where known


_BMNIST = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
_SHA = {  # digests of the real files (see the mirror's README)
    "binarized_mnist_train.mat": "79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
    "binarized_mnist_valid.mat": "7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
    "binarized_mnist_test.mat": "5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "images_background_small1.zip": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/{}"
_OMNI = "https://github.com/brendenlake/omniglot/raw/master/python/{}"

FILES: dict[str, list[RemoteFile]] = {
    "binarized_mnist": [
        RemoteFile((f"binarized_mnist_{s}.amat", f"binarized_mnist_{s}.mat"), _BMNIST.format(s), _SHA)
        for s in ("train", "valid", "test")],
    "mnist": [RemoteFile((f"{n}.gz", n), _MNIST.format(f"{n}.gz"), _SHA) for n in
              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
}
OPTIONAL: dict[str, list[RemoteFile]] = {
    "mnist": [RemoteFile((f"{n}.gz", n), _MNIST.format(f"{n}.gz"), _SHA) for n in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")],
    "omniglot": [RemoteFile(("chardata.mat",), "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat")]
    + [RemoteFile((n,), _OMNI.format(n), _SHA) for n in
       ("images_background.zip", "images_evaluation.zip", "images_background_small1.zip",
        "images_background_small2.zip")],
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _install(src_stream, dest: Path, expected: str | None) -> None:
    """Copy a stream to dest via a temporary file; reject it on a checksum mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src_stream, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and sha256_file(Path(tmp)) != expected:
            raise DataError(f"{dest.name}: sha256 does not match the published digest; file rejected")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mirror_candidates(mirror: Path, dataset: str, name: str):
    return [mirror / dataset / name, mirror / name]


def fetch_file(spec: RemoteFile, dataset: str, raw_dir: Path, mirror: Path | None, allow_download: bool = True):
    """Path of a verified local copy of one file, or None if no source has it."""
    for name in spec.names:  # already fetched
        path = raw_dir / name
        if path.exists() and (name not in spec.sha256 or sha256_file(path) == spec.sha256[name]):
            return path
    if mirror is not None:
        for name in spec.names:
            for src in _mirror_candidates(mirror, dataset, name):
                if src.exists():
                    with open(src, "rb") as f:
                        _install(f, raw_dir / name, spec.sha256.get(name))
                    return raw_dir / name
    if allow_download and spec.url is not None:
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                _install(response, raw_dir / spec.names[0], spec.sha256.get(spec.names[0]))
            return raw_dir / spec.names[0]
        except DataError:
            raise
        except Exception as err:  # no network, 404, ...
            warnings.warn(f"could not download {spec.url}: {err}")
    return None


def fetch(dataset: str, raw_dir: str | os.PathLike, mirror: str | os.PathLike | None = None,
          allow_download: bool = True) -> Path:
    """Fetch every file `dataset` needs into raw_dir/dataset; raise naming the missing ones."""
    if dataset not in DATASETS:
        raise ValueError(f"data.name: unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    mirror = Path(mirror) if mirror else (Path(os.environ["FMVAE_DATA_MIRROR"]) if os.environ.get("FMVAE_DATA_MIRROR") else None)
    folder = Path(raw_dir) / dataset
    if dataset in ("synthetic",):
        return folder
    if dataset == "celeba":
        return _find_celeba(folder, mirror)
    missing = [s.names for s in FILES.get(dataset, []) if fetch_file(s, dataset, folder, mirror, allow_download) is None]
    optional = [fetch_file(s, dataset, folder, mirror, allow_download) for s in OPTIONAL.get(dataset, [])]
    if dataset == "omniglot" and not any(optional):
        missing.append(tuple(n for s in OPTIONAL["omniglot"] for n in s.names))
    if missing:
        names = "; ".join(" or ".join(m) for m in missing)
        raise DataError(f"{dataset}: could not fetch {names}. Put the files in {folder} or in a mirror "
                        f"folder (<mirror>/{dataset}/<file>) given by data.mirror or FMVAE_DATA_MIRROR.")
    return folder


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------
def _check_binary(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != 784 or (n is not None and x.shape[0] != n):
        raise DataError(f"{name}: expected ({n if n else 'N'}, 784) binary images, got shape {x.shape}")
    if not np.isin(np.unique(x), (0, 1)).all():
        raise DataError(f"{name}: values must be 0 or 1, found {np.unique(x)[:10]}")
    return x.astype(np.uint8)


def read_binarized_mnist_split(path: Path, n: int | None = None) -> np.ndarray:
    """Text .amat (784 0/1 values a line) or MATLAB file with variable X; (N, 784) uint8."""
    with open(path, "rb") as f:
        head = f.read(10)
    if head.startswith(b"MATLAB"):
        from scipy.io import loadmat
        x = loadmat(path)["X"]
    else:
        import pandas as pd
        x = pd.read_csv(path, sep=" ", header=None, dtype=np.uint8).to_numpy()
    return _check_binary(np.asarray(x), path.name, n)


def read_idx(path: Path) -> np.ndarray:
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


def _first(folder: Path, *names) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def omniglot_pngs(zip_path: Path) -> np.ndarray:
    """All drawings of an Omniglot zip, resized 105 -> 28 (box filter), strokes = 1, (N, 784) uint8."""
    from PIL import Image
    out = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((28, 28), Image.Resampling.BOX)
            out.append((np.asarray(img) < 128).reshape(-1))  # ink is dark on white
    if not out:
        raise DataError(f"{zip_path.name}: no PNG drawings inside")
    return np.stack(out).astype(np.uint8)


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------
def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).view(-1, 1, 28, 28)


def load_binarized_mnist(folder: Path) -> Dataset:
    split = lambda s, n: read_binarized_mnist_split(_first(folder, f"binarized_mnist_{s}.amat", f"binarized_mnist_{s}.mat"), n)
    return Dataset("binarized_mnist", _images(split("train", 50000)), _images(split("test", 10000)), "binary")


def load_mnist(folder: Path, seed: int = 0) -> Dataset:
    """Grey MNIST binarised once with a fixed seed; digit class as property 'digit' (K = 10)."""
    gen = torch.Generator().manual_seed(seed)
    binarise = lambda x: (torch.rand(x.shape, generator=gen) < torch.from_numpy(x.copy()).float() / 255).to(torch.uint8)
    x_test = read_idx(_first(folder, "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"))
    y_test = read_idx(_first(folder, "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")).astype(np.int64)
    if x_test.shape != (10000, 28, 28) or y_test.shape != (10000,) or y_test.max() > 9:
        raise DataError(f"mnist test set: expected (10000, 28, 28) images and 10000 labels in 0..9, got {x_test.shape}, {y_test.shape}")
    train_x = _first(folder, "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
    train_y = _first(folder, "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte")
    if train_x is not None and train_y is not None:
        x_train, y_train = read_idx(train_x), read_idx(train_y).astype(np.int64)
    else:
        warnings.warn("mnist: training images not available; using a seeded 8000/2000 split of the test set")
        perm = np.random.default_rng(seed).permutation(10000)
        x_train, y_train, x_test, y_test = x_test[perm[:8000]], y_test[perm[:8000]], x_test[perm[8000:]], y_test[perm[8000:]]
    return Dataset("mnist", binarise(x_train)[:, None], binarise(x_test)[:, None], "binary",
                   torch.from_numpy(y_train)[:, None], torch.from_numpy(y_test)[:, None], ["digit"], [10])


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


def read_celeba_attributes(path: Path, names=CELEBA_PROPERTIES) -> tuple[list[str], np.ndarray]:
    """list_attr_celeba.txt: a row count, the attribute names, then FILE v1..v40 in {-1, 1}."""
    lines = path.read_text().splitlines()
    try:
        declared = int(lines[0].strip())
    except (IndexError, ValueError):
        raise DataError(f"{path.name}: first line must be the number of rows")
    header = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(rows) != declared:
        raise DataError(f"{path.name}: header declares {declared} rows but the file holds {len(rows)} "
                        "(truncated or partial attribute file)")
    bad = [r[0] for r in rows if len(r) != len(header) + 1]
    if bad:
        raise DataError(f"{path.name}: {len(bad)} rows do not have {len(header)} values, e.g. {bad[0]}")
    missing = [n for n in names if n not in header]
    if missing:
        raise DataError(f"{path.name}: attributes {missing} not in the header")
    cols = [header.index(n) + 1 for n in names]
    values = np.array([[int(r[c]) for c in cols] for r in rows])
    if not np.isin(values, (-1, 1)).all():
        raise DataError(f"{path.name}: attribute values must be -1 or 1")
    return [r[0] for r in rows], (values > 0).astype(np.int64)


def _find_celeba(folder: Path, mirror: Path | None) -> Path:
    for candidate in [folder] + ([mirror / "celeba", mirror] if mirror else []):
        if (candidate / "list_attr_celeba.txt").exists() and (candidate / "img_align_celeba").is_dir():
            return candidate
    raise DataError("celeba: no folder with img_align_celeba/ and list_attr_celeba.txt found in "
                    f"{folder} or the mirror. Download it with torchvision.datasets.CelebA(root, download=True) "
                    "and point data.mirror (or FMVAE_DATA_MIRROR) at the folder holding 'celeba/'.")


def load_celeba(folder: Path, size: int = 64) -> Dataset:
    """torchvision layout; images centre-cropped to 148x148 and resized to 64x64, uint8 (N, 3, 64, 64)."""
    from PIL import Image
    files, y = read_celeba_attributes(folder / "list_attr_celeba.txt")
    partition = {}
    part_file = folder / "list_eval_partition.txt"
    if part_file.exists():
        partition = dict(ln.split() for ln in part_file.read_text().splitlines() if ln.strip())
    images = folder / "img_align_celeba"
    absent = [f for f in files if not (images / f).exists()]
    if absent:
        raise DataError(f"celeba: {len(absent)} images listed in list_attr_celeba.txt are missing from "
                        f"{images}, e.g. {absent[:3]}")
    xs = []
    for f in files:
        img = Image.open(images / f).convert("RGB")
        w, h = img.size
        side = min(w, h, 148)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        xs.append(np.asarray(img).transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(xs))
    test = torch.tensor([partition.get(f, "0") == "2" for f in files])
    if not test.any():  # no partition file: seeded 90/10 split
        test = torch.zeros(len(files), dtype=torch.bool)
        test[torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[: max(1, len(files) // 10)]] = True
    yt = torch.from_numpy(y)
    return Dataset("celeba", x[~test], x[test], "rgb", yt[~test], yt[test], list(CELEBA_PROPERTIES), [2, 2, 2])


# Synthetic compositional images: factor 0 = shape (square, plus, ring), factor 1 =
# horizontal position (left, centre, right); position jitter and pixel noise inside each.
def synthetic_images(n: int, seed: int, flip: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    gen = np.random.default_rng(seed)
    shape, column = gen.integers(0, 3, n), gen.integers(0, 3, n)
    x = np.zeros((n, 28, 28), np.uint8)
    yy, xx = np.mgrid[-4:5, -4:5]
    masks = [np.ones((9, 9), bool), (np.abs(yy) <= 1) | (np.abs(xx) <= 1), np.maximum(np.abs(yy), np.abs(xx)) >= 3]
    for j in range(n):
        cy = 13 + gen.integers(-6, 7)
        cx = (6, 14, 22)[column[j]] + gen.integers(-1, 2)
        x[j, cy - 4:cy + 5, cx - 4:cx + 5] = masks[shape[j]]
    x ^= (gen.random(x.shape) < flip).astype(np.uint8)
    return torch.from_numpy(x)[:, None], torch.from_numpy(np.stack((shape, column), 1)).long()


def load_synthetic(n_train: int = 6000, n_test: int = 1000, seed: int = 0) -> Dataset:
    xtr, ytr = synthetic_images(n_train, seed)
    xte, yte = synthetic_images(n_test, seed + 1)
    return Dataset("synthetic", xtr, xte, "binary", ytr, yte, ["shape", "position"], [3, 3])


def factorial_vectors(n: int, seed: int, n_factors: int = 2, k: int = 3, x_dim: int = 20, map_seed: int = 1234):
    """Vector data with known factors, pushed through a fixed random non-linear map.

    Factor i places its k cluster centres on a circle of radius 2 in its own 2-D
    block h_i (noise 0.25); x = tanh(h W1) W2 + noise, with W1, W2 fixed by map_seed.
    Returns x (n, x_dim) float32 and y (n, n_factors) long.
    """
    gen = torch.Generator().manual_seed(map_seed)
    angles = torch.arange(k) * 2 * torch.pi / k + torch.rand(n_factors, 1, generator=gen) * 2 * torch.pi
    centres = 2.0 * torch.stack((angles.cos(), angles.sin()), -1)  # (n_factors, k, 2)
    w1 = torch.randn(2 * n_factors, 64, generator=gen) / 2
    w2 = torch.randn(64, x_dim, generator=gen) / 4
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(k, (n, n_factors), generator=g)
    h = torch.cat([centres[i, y[:, i]] for i in range(n_factors)], -1) + 0.25 * torch.randn(n, 2 * n_factors, generator=g)
    x = torch.tanh(h @ w1) @ w2 + 0.05 * torch.randn(n, x_dim, generator=g)
    return x, y


def load(name: str, folder: Path | None, seed: int = 0) -> Dataset:
    if name == "binarized_mnist":
        return load_binarized_mnist(folder)
    if name == "mnist":
        return load_mnist(folder, seed)
    if name == "omniglot":
        return load_omniglot(folder, seed)
    if name == "celeba":
        return load_celeba(folder)
    if name == "synthetic":
        return load_synthetic(seed=seed)
    raise ValueError(f"data.name: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def save_prepared(ds: Dataset, path: str | os.PathLike) -> None:
    from .checkpoint import save_checked
    save_checked(ds.state(), path)


def load_prepared(path: str | os.PathLike) -> Dataset:
    from .checkpoint import load_checked
    return Dataset(**load_checked(path))
