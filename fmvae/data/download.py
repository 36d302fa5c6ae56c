"""Fetching: canonical address or local mirror, integrity checks, atomic install.

Files are fetched into `raw_dir/<data set>` from a mirror folder (param `data.mirror` or
$FMVAE_DATA_MIRROR) or the canonical address, checked (no HTML page posing as data; sha256
where known) and written atomically: an interrupted fetch never leaves a file under its final
name. Shapes and values are checked by the readers.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fmvae.data.core import DATASETS, HTML_HINT, DataError, looks_like_html


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

def install(src_stream, dest: Path, expected: str | None) -> None:
    """Copy a stream to dest via a temporary file; reject an HTML page or a checksum mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src_stream, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            if looks_like_html(f.read(512)):
                raise DataError(f"{dest.name} (from {getattr(src_stream, 'name', 'the download')}) is {HTML_HINT}; "
                                "nothing was installed")
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
                        install(f, raw_dir / name, spec.sha256.get(name))
                    return raw_dir / name
    if allow_download and spec.url is not None:
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                install(response, raw_dir / spec.names[0], spec.sha256.get(spec.names[0]))
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
        from fmvae.data.celeba import find_celeba
        return find_celeba(folder, mirror)
    missing = [s.names for s in FILES.get(dataset, []) if fetch_file(s, dataset, folder, mirror, allow_download) is None]
    optional = [fetch_file(s, dataset, folder, mirror, allow_download) for s in OPTIONAL.get(dataset, [])]
    if dataset == "omniglot" and not any(optional):
        missing.append(tuple(n for s in OPTIONAL["omniglot"] for n in s.names))
    if missing:
        names = "; ".join(" or ".join(m) for m in missing)
        raise DataError(f"{dataset}: could not fetch {names}. Put the files in {folder} or in a mirror "
                        f"folder (<mirror>/{dataset}/<file>) given by data.mirror or FMVAE_DATA_MIRROR.")
    return folder
