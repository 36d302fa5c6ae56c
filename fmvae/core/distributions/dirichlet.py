"""Dirichlet q(pi) = Dir(c) over the last dimension.

Factors with fewer components than the widest one are padded; `mask` marks the
real components (True) so that padded ones carry no mass and no KL.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.special import digamma


def _masked_sum(x: Tensor, mask: Tensor | None) -> Tensor:
    return x.sum(-1) if mask is None else torch.where(mask, x, torch.zeros_like(x)).sum(-1)


def expected_log_pi(c: Tensor, mask: Tensor | None = None) -> Tensor:
    """E[log pi_k] = psi(c_k) - psi(sum_k c_k); -inf on padded components."""
    out = digamma(c) - digamma(_masked_sum(c, mask)).unsqueeze(-1)
    return out if mask is None else out.masked_fill(~mask, float("-inf"))


def mean_pi(c: Tensor, mask: Tensor | None = None) -> Tensor:
    c = c if mask is None else torch.where(mask, c, torch.zeros_like(c))
    return c / c.sum(-1, keepdim=True)


def kl_dirichlet(c: Tensor, c0: float, mask: Tensor | None = None) -> Tensor:
    """KL[Dir(c) || Dir(c0 * 1)] over the last dimension (K = number of real components)."""
    k = c.new_full(c.shape[:-1], c.shape[-1]) if mask is None else mask.sum(-1).to(c.dtype)
    c0 = c.new_full((), c0)  # a fill, not a host copy (CUDA graphs)
    c_sum = _masked_sum(c, mask)
    per_k = -torch.lgamma(c) + (c - c0) * (digamma(c) - digamma(c_sum).unsqueeze(-1))
    return torch.lgamma(c_sum) + _masked_sum(per_k, mask) - torch.lgamma(k * c0) + k * torch.lgamma(c0)
