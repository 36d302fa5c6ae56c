"""Test-time evaluation: the bound (11) and its parts, IWAE, assignment accuracies."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fmvae.core.model import FMVAE


@torch.no_grad()
def evaluate_bound(model: FMVAE, x: torch.Tensor, to_float, batch: int = 1000, samples: int = 1) -> dict:
    """Mean of (11) and its parts over x (gamma from (5), nothing clamped), plus per-point
    argmax_k q(r_i|x) as `assignments` (N, I) and per-factor KLs."""
    model.eval()
    sums = {"elbo": 0.0, "recon": 0.0, "kl_z": 0.0, "kl_r": 0.0}
    kl_z_f = torch.zeros(model.I, dtype=torch.float64)
    kl_r_f = torch.zeros(model.I, dtype=torch.float64)
    assignments = []
    for start in range(0, x.shape[0], batch):
        t = model.bound(to_float(x[start:start + batch]), samples=samples)
        for k, v in (("elbo", t.elbo), ("recon", t.recon), ("kl_z", t.kl_z.sum(-1)), ("kl_r", t.kl_r.sum(-1))):
            sums[k] += v.double().sum().item()
        kl_z_f += t.kl_z.double().sum(0).cpu()
        kl_r_f += t.kl_r.double().sum(0).cpu()
        assignments.append(t.step.gamma.argmax(-1).cpu())
    model.train()
    n = x.shape[0]
    out = {k: v / n for k, v in sums.items()}
    out["kl_z_per_factor"] = (kl_z_f / n).tolist()
    out["kl_r_per_factor"] = (kl_r_f / n).tolist()
    out["assignments"] = torch.cat(assignments)
    return out


@torch.no_grad()
def importance_weighted_log_likelihood(model: FMVAE, x: torch.Tensor, to_float, samples: int,
                                       batch: int = 100) -> float:
    """Mean IWAE estimate of log p(x) over x with `samples` importance samples per point."""
    model.eval()
    total = 0.0
    for start in range(0, x.shape[0], batch):
        total += model.importance_weighted(to_float(x[start:start + batch]), samples).double().sum().item()
    model.train()
    return total / x.shape[0]


def components_in_use(model: FMVAE, min_points: float = 1.0) -> list[int]:
    """Per factor, the components whose q(pi) holds at least `min_points` effective training points."""
    c = model.prior.mean_params()[4]
    used = ((c - model.prior.hyper.c0) >= min_points) & model.prior.mask
    return used.sum(-1).tolist()


def matched_accuracy(pred, true) -> float:
    """Accuracy of pred after the best one-to-one matching of its labels to true's (Hungarian).

    Predicted clusters left unmatched (more clusters than classes) count as errors.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    keep = true >= 0
    pred, true = pred[keep], true[keep]
    if len(true) == 0:
        return float("nan")
    counts = np.zeros((pred.max() + 1, true.max() + 1))
    np.add.at(counts, (pred, true), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(true))


def supervised_accuracy(pred, true) -> float:
    """Plain accuracy of argmax q(r_i|x) against the property it was clamped to in training."""
    pred, true = np.asarray(pred), np.asarray(true)
    keep = true >= 0
    return float((pred[keep] == true[keep]).mean()) if keep.any() else float("nan")
