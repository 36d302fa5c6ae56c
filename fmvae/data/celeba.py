"""CelebA as users have it: `img_align_celeba.zip` as distributed, or the extracted folder.

Layout (torchvision's): `list_attr_celeba.txt`, optional `list_eval_partition.txt`, and the
aligned images either in `img_align_celeba.zip` (read in place, no unzip step) or in the folder
`img_align_celeba/`. Images are decoded in parallel worker threads (libjpeg through
torchvision.io.decode_jpeg releases the GIL), centre-cropped to 148x148 and resized to 64x64
with antialiasing, the same code for both sources, so both give the same tensors.
"""
from __future__ import annotations

import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fmvae.data.core import DataError, Dataset, refuse_html

CELEBA_PROPERTIES = ("Male", "Eyeglasses", "Smiling")
ZIP, FOLDER, ATTRIBUTES, PARTITION = "img_align_celeba.zip", "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"


def read_celeba_attributes(path: Path, names=CELEBA_PROPERTIES) -> tuple[list[str], np.ndarray]:
    """list_attr_celeba.txt: a row count, the attribute names, then FILE v1..v40 in {-1, 1}."""
    refuse_html(path)
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


def find_celeba(folder: Path, mirror: Path | None) -> Path:
    """The first of folder, <mirror>/celeba, <mirror> holding the attributes and the images (zip or folder)."""
    for candidate in [folder] + ([mirror / "celeba", mirror] if mirror else []):
        if (candidate / ATTRIBUTES).exists() and ((candidate / ZIP).is_file() or (candidate / FOLDER).is_dir()):
            return candidate
    raise DataError(f"celeba: no folder with {ATTRIBUTES} and {ZIP} (or the extracted {FOLDER}/) found in "
                    f"{folder} or the mirror. Download them (torchvision.datasets.CelebA(root, download=True), or "
                    "by hand from the CelebA site) and point data.mirror (or FMVAE_DATA_MIRROR) at the folder "
                    "holding 'celeba/'.")


def decode(data: bytes, size: int = 64) -> torch.Tensor:
    """One aligned JPEG -> (3, size, size) uint8: centre crop 148 (the paper's), antialiased resize."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    side = min(img.shape[-2], img.shape[-1], 148)
    img = F.center_crop(img, [side, side])
    return F.resize(img, [size, size], antialias=True)


class ImageSource:
    """Read image bytes from the zip (one handle per worker thread) or from the folder."""

    def __init__(self, folder: Path):
        self.zip_path = folder / ZIP if (folder / ZIP).is_file() else None
        self.folder = folder / FOLDER
        if self.zip_path is not None:
            refuse_html(self.zip_path)
            try:
                with zipfile.ZipFile(self.zip_path) as zf:
                    self.members = {Path(n).name: n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg"))}
            except zipfile.BadZipFile as err:
                raise DataError(f"{ZIP} ({self.zip_path}): not a readable zip ({err}); download it again") from None

    def missing(self, files: list[str]) -> list[str]:
        if self.zip_path is not None:
            return [f for f in files if f not in self.members]
        return [f for f in files if not (self.folder / f).exists()]

    def reader(self):
        if self.zip_path is None:
            return lambda name: (self.folder / name).read_bytes()
        zf = zipfile.ZipFile(self.zip_path)  # a ZipFile is not safe to share between threads
        return lambda name: zf.read(self.members[name])


def decode_all(folder: Path, files: list[str], size: int = 64, workers: int | None = None,
               progress: bool = True) -> torch.Tensor:
    """(N, 3, size, size) uint8 from the zip or the folder, decoded by `workers` threads in chunks."""
    source = ImageSource(folder)
    absent = source.missing(files)
    if absent:
        where = source.zip_path or source.folder
        raise DataError(f"celeba: {len(absent)} of the {len(files)} images listed in {ATTRIBUTES} are missing from "
                        f"{where}, e.g. {absent[:3]} (an interrupted download?). To train on the {len(files) - len(absent)} "
                        "images present, set data.partial: true")
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [files[i:i + 256] for i in range(0, len(files), 256)]

    def work(chunk):
        read = source.reader()
        return torch.stack([decode(read(name), size) for name in chunk])

    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc="celeba: decoding", unit="img",
                                                   disable=not progress, mininterval=1.0) as bar:
        start = 0
        for chunk, images in zip(chunks, pool.map(work, chunks)):
            out[start:start + len(chunk)] = images
            start += len(chunk)
            bar.update(len(chunk))
    return out


def load_celeba(folder: Path, size: int = 64, progress: bool = True, partial: bool = False) -> Dataset:
    """CelebA from the zip or the folder; test = partition 2 (or a seeded 10% without the partition file).

    Every image the attribute file lists must be present, unless `partial` (data.partial): then
    exactly the images present load, and Dataset.info records how many were listed, absent, and
    kept per partition, so that a number trained on a partial set says so."""
    files, y = read_celeba_attributes(folder / ATTRIBUTES)
    partition = {}
    part_file = folder / PARTITION
    if part_file.exists():
        refuse_html(part_file)
        partition = dict(ln.split() for ln in part_file.read_text().splitlines() if ln.strip())
    listed = len(files)
    if partial:
        present = set(files) - set(ImageSource(folder).missing(files))
        keep = np.array([f in present for f in files], dtype=bool)
        if not keep.any():
            raise DataError(f"celeba: none of the {listed} images listed in {ATTRIBUTES} is present in {folder}")
        files, y = [f for f, k in zip(files, keep) if k], y[keep]
    start = time.monotonic()
    x = decode_all(folder, files, size, progress=progress)
    if progress:  # a rate, not part of the data set: the prepared file stays the same bytes on every host
        print(f"celeba: decoded {len(files)} images in {time.monotonic() - start:.1f} s "
              f"({len(files) / max(time.monotonic() - start, 1e-9):.0f} images/s, {os.cpu_count()} cores)")
    test = torch.tensor([partition.get(f, "0") == "2" for f in files])
    if not test.any():  # no partition file: seeded 90/10 split
        test = torch.zeros(len(files), dtype=torch.bool)
        test[torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[: max(1, len(files) // 10)]] = True
    counts = {name: sum(partition.get(f, "0") == code for f in files) for code, name in
              (("0", "train"), ("1", "valid"), ("2", "test"))} if partition else {}
    info = {"listed": listed, "absent": listed - len(files), "partial": partial, "loaded": len(files),
            "partition_counts": counts, "train_images": int((~test).sum()), "test_images": int(test.sum())}
    yt = torch.from_numpy(y)
    return Dataset("celeba", x[~test], x[test], "rgb", yt[~test], yt[test], list(CELEBA_PROPERTIES), [2, 2, 2], info)
