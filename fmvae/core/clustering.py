"""Symmetry breaking for prior initialisation: k-means++ and factorial k-means.

Pre-training uses the prior N(0, I), which is invariant under rotations of z, so the
orientation of the pre-trained latent space is arbitrary: a factor of the data may be
spread over several blocks z_i. The factorial mixture prior is not rotation invariant.
`factorial_kmeans` fits its hard-assignment, equal-variance limit

    min over labels k_ni, centroids c_ik, orthogonal R of  sum_n || z_n R - [c_1k_n1 .. c_Ik_nI] ||^2,

so it chooses the orientation in which the encodings look most like a product of
per-block clusterings, and the clusters to seed q(xi) with. Label steps (nearest centroid
per block) alternate with the best rotation for those labels, found by descent on the
orthogonal group (Vichi and Kiers' factorial k-means with the subspace fixed to the whole
space, but without their Procrustes update, which stalls). The objective has local optima,
hence restarts and block swaps.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None, lloyd_iters: int = 10) -> Tensor:
    """k-means++ seeding followed by a few Lloyd iterations; returns hard labels (M,)."""
    m = x.shape[0]
    first = torch.randint(m, (1,), generator=generator, device="cpu").item()
    centres = [x[first]]
    d2 = ((x - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / m)
        idx = torch.multinomial(probs.cpu(), 1, generator=generator).item()
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(-1))
    c = torch.stack(centres)
    for _ in range(lloyd_iters):
        labels = torch.cdist(x, c).argmin(-1)
        c = _centroids(x, labels, k, c)
    return torch.cdist(x, c).argmin(-1)


def _centroids(x: Tensor, labels: Tensor, k: int, previous: Tensor) -> Tensor:
    """Cluster means; an empty cluster keeps its previous centroid."""
    one_hot = nn.functional.one_hot(labels, k).to(x.dtype)
    counts = one_hot.sum(0)
    return torch.where(counts[:, None] > 0, (one_hot.T @ x) / counts.clamp(min=1)[:, None], previous)


def random_rotation(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """A Haar-distributed orthogonal (n, n) matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def factorial_kmeans(z: Tensor, K: Sequence[int], generator: torch.Generator | None = None, restarts: int = 1,
                     rotate: bool = True, iters: int = 100, clamp: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
    """Factorial k-means of encodings z (M, I, D) with K[i] clusters in block i.

    rotate=False fixes R = identity: the blocks are then clustered independently.
    clamp: (M, I) long, -1 where free; a clamped point keeps its label in every step (2.5).
    Restart 0 starts from R = identity, the others from Haar-random rotations; the best is
    retried with each pair of blocks of different K swapped; the lowest objective wins.
    Returns (R (I*D, I*D) in z's dtype and device, labels (M, I), objective per point);
    the rotated encodings are z.flatten(1) @ R.
    """
    m, n_blocks, d = z.shape
    if len(K) != n_blocks:
        raise ValueError(f"factorial_kmeans: {len(K)} cluster counts for {n_blocks} blocks")
    x = z.reshape(m, -1).double()
    run = lambda start: _factorial_kmeans_run(x, K, d, start.to(x.device), generator, rotate, iters, clamp)
    best = None
    for restart in range(max(1, restarts) if rotate else 1):
        result = run(torch.eye(n_blocks * d, dtype=torch.float64) if restart == 0 else random_rotation(n_blocks * d, generator))
        best = result if best is None or result[2] < best[2] else best
    # a typical local minimum puts a factor in a block with the wrong number of clusters:
    # retry with two such blocks' coordinates swapped, a move the descent cannot make by small steps
    for i, j in [(i, j) for i in range(n_blocks) for j in range(i + 1, n_blocks) if rotate and K[i] != K[j]]:
        order = torch.arange(n_blocks * d).view(n_blocks, d)
        order[[i, j]] = order[[j, i]]
        swapped = run(best[0].cpu()[:, order.flatten()])
        best = swapped if swapped[2] < best[2] else best
    rotation, labels, objective = best
    return rotation.to(z.dtype), labels, objective


def _factorial_kmeans_run(x: Tensor, K: Sequence[int], d: int, rotation: Tensor, generator, rotate: bool,
                          iters: int, clamp: Tensor | None) -> tuple[Tensor, Tensor, float]:
    """One descent from `rotation`, alternating rotation (best for the labels) and labels (nearest
    centroid in each block); both steps lower the objective. It stops when the rotation has
    converged and the labels repeat."""
    blocks = lambda t: [t[:, i * d:(i + 1) * d] for i in range(len(K))]
    keep_clamped = (lambda lab: torch.where(clamp >= 0, clamp, lab)) if clamp is not None else (lambda lab: lab)
    labels = keep_clamped(torch.stack([kmeans_plus_plus(b, k, generator).to(x.device)
                                       for b, k in zip(blocks(x @ rotation), K)], 1))
    for _ in range(iters):
        settled = True
        if rotate:
            rotation, settled = _best_rotation([_within_scatter(x, labels[:, i], k) for i, k in enumerate(K)], d,
                                               rotation)
        rotated = blocks(x @ rotation)
        centroids = [_centroids(b, labels[:, i], k, b[:k]) for i, (b, k) in enumerate(zip(rotated, K))]
        new = keep_clamped(torch.stack([torch.cdist(b, c).argmin(-1) for b, c in zip(rotated, centroids)], 1))
        if settled and torch.equal(new, labels):
            break
        labels = new
    scatter = [_within_scatter(x, labels[:, i], k) for i, k in enumerate(K)]
    return rotation, labels, _block_trace(torch.stack(scatter), rotation, d).item()


def _within_scatter(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """(n, n) within-cluster scatter of x under labels, per point: the k-means objective of any
    projection x P is tr(P^T W P)."""
    residual = x - _centroids(x, labels, k, x[:k])[labels]
    return residual.T @ residual / x.shape[0]


def _block_trace(scatter: Tensor, rotation: Tensor, d: int) -> Tensor:
    """sum_i tr(R_i^T W_i R_i), R_i the D columns of block i: the objective for fixed labels."""
    columns = torch.arange(rotation.shape[1], device=rotation.device)
    return (rotation * (scatter @ rotation)).sum(-2)[columns // d, columns].sum()  # (R^T W_i R)_jj, j in block i


def _best_rotation(scatter: list[Tensor], d: int, rotation: Tensor, steps: int = 25,
                   tol: float = 1e-10) -> tuple[Tensor, bool]:
    """A local minimum of sum_i tr(R_i^T W_i R_i) over orthogonal R, from `rotation`: Riemannian
    gradient descent on the orthogonal group, R <- R exp(-t A) with A = R^T G - G^T R (G the
    Euclidean gradient) and Armijo backtracking on t. At most `steps` steps (the caller alternates
    with label updates and warm-starts); returns (R, whether it converged). One orthogonal
    Procrustes step towards fixed centroids, the classic update, only creeps towards this minimum."""
    w = torch.stack(scatter)
    columns = torch.arange(rotation.shape[1], device=w.device)
    value, t = _block_trace(w, rotation, d), 1.0
    for _ in range(steps):
        gradient = 2 * (w @ rotation)[columns // d, :, columns].T  # column j: 2 W_i R e_j, j in block i
        a = rotation.T @ gradient - gradient.T @ rotation
        slope = 0.5 * (a * a).sum()  # -d/dt of the objective along R exp(-t A) at t = 0
        if slope <= tol * value ** 2:
            return rotation, True
        while t > 1e-12:
            candidate = rotation @ torch.linalg.matrix_exp(-t * a)
            new_value = _block_trace(w, candidate, d)
            if new_value <= value - 1e-4 * t * slope:
                break
            t /= 2
        else:
            return rotation, True  # no step lowers it: a minimum to numerical precision
        rotation, value, t = candidate, new_value, 2 * t
    return rotation, False
