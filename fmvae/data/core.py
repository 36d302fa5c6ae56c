"""The data set container every loader returns, the errors they raise, the refusal of an HTML page saved
under a data file's name, and the small helpers every loader uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch

DATASETS = ("binarized_mnist", "mnist", "omniglot", "celeba", "synthetic")


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
    info: dict = field(default_factory=dict)  # what a reader wants recorded: counts, splits, absent files

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
                                                "property_names", "property_K", "info")}


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


HTML_HINT = ("an HTML page, not the data file: download scripts save Google Drive's 'Quota exceeded' or "
             "sign-in page under the data file's name. Download the file again (a browser, or later), "
             "put the real file in the mirror folder, and rerun")


def looks_like_html(head: bytes) -> bool:
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<!--"))


def refuse_html(path: Path, head: bytes | None = None) -> None:
    """A DataError naming `path` if its first bytes are an HTML page."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(512)
    if looks_like_html(head):
        raise DataError(f"{Path(path).name} ({path}) is {HTML_HINT}")


def first_present(folder: Path, *names) -> Path | None:
    """The first of these files that exists in folder, or None."""
    return next((folder / n for n in names if (folder / n).exists()), None)


def images28(x: np.ndarray) -> torch.Tensor:
    """A (N, 784) or (N, 28, 28) array as (N, 1, 28, 28) images."""
    return torch.from_numpy(np.ascontiguousarray(x)).view(-1, 1, 28, 28)
