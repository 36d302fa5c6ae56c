"""The data set container every loader returns, and the errors they raise."""
from __future__ import annotations

from dataclasses import dataclass, field

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
