"""Synthetic data with known factors: 28x28 shapes x positions, and vectors through a fixed map."""
from __future__ import annotations

import numpy as np
import torch

from fmvae.data.core import Dataset


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
