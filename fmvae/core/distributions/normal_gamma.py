"""Normal-Gamma q(mu, alpha) = N(mu; m, 1/(s alpha)) Gamma(alpha; shape a, rate b).

One independent Normal-Gamma per (factor i, component k, dimension d). Every
function broadcasts over leading dimensions. Equation numbers refer to the paper
(and ../shared/paper/equations.md).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.special import digamma

LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# Parameterisations
# ---------------------------------------------------------------------------
def natural_from_mean(m: Tensor, s: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(m, s, a, b) -> stacked natural parameters lam[0..3] (appendix D)."""
    return torch.stack((a - 0.5, -(b + 0.5 * s * m * m), s * m, -0.5 * s))


def mean_from_natural(lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stacked natural parameters -> (m, s, a, b)."""
    s = -2.0 * lam[3]
    m = lam[2] / s
    a = lam[0] + 0.5
    b = -lam[1] - 0.5 * s * m * m
    return m, s, a, b


# ---------------------------------------------------------------------------
# Expected sufficient statistics
# ---------------------------------------------------------------------------
def expected_alpha(a: Tensor, b: Tensor) -> Tensor:
    return a / b


def expected_log_alpha(a: Tensor, b: Tensor) -> Tensor:
    return digamma(a) - torch.log(b)


def expected_alpha_mu(m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return m * a / b


def expected_alpha_mu2(m: Tensor, s: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return 1.0 / s + m * m * a / b


def ell_weights(m: Tensor, s: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(6) as an affine map of the features [mu^2 + var, mu]: returns (const (..., K), W (..., K, 2D)).

    ell_k = const_k + [mu^2 + var, mu] . W_k, with
    const_k = 1/2 sum_d (E[log alpha] - log 2 pi - 1/s - E[alpha] m^2) and W_k = [-E[alpha]/2, E[alpha] m].
    The quadratic (mu - m)^2 is expanded so that a batch costs one (B x 2D) @ (2D x K) product.
    """
    e_alpha = a / b
    const = 0.5 * (expected_log_alpha(a, b) - LOG_2PI - 1.0 / s - e_alpha * m * m).sum(-1)
    return const, torch.cat((-0.5 * e_alpha, e_alpha * m), dim=-1)


def ell_features(mu: Tensor, var: Tensor) -> Tensor:
    return torch.cat((mu * mu + var, mu), dim=-1)


def expected_log_normal(mu: Tensor, var: Tensor, m: Tensor, s: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """ell_k of (6): E_{N(z; mu, var) q(mu_k, alpha_k)}[log N(z; mu_k, 1/alpha_k)].

    mu, var: (..., B, D); m, s, a, b: (..., K, D). Returns (..., B, K).
    """
    const, weights = ell_weights(m, s, a, b)
    return const.unsqueeze(-2) + ell_features(mu, var) @ weights.transpose(-1, -2)


# ---------------------------------------------------------------------------
# KL divergence (C.1)
# ---------------------------------------------------------------------------
def kl_normal_gamma(m, s, a, b, m0, s0, a0, b0) -> Tensor:
    """KL[NG(m, s, a, b) || NG(m0, s0, a0, b0)] per dimension, broadcasting.

    The extracted paper text prints "-(psi(a) - psi(a0))" here; the correct
    Gamma part uses log-Gamma functions (checked against Monte Carlo in tests).
    """
    normal_part = 0.5 * (s0 * (a / b) * (m - m0) ** 2 + s0 / s - torch.log(s0 / s) - 1.0)
    gamma_part = (
        a0 * torch.log(b / b0)
        - torch.lgamma(a)
        + torch.lgamma(a.new_full((), a0))  # new_full, not as_tensor: no host copy (CUDA graphs)
        + (a - a0) * digamma(a)
        - (b - b0) * a / b
    )
    return normal_part + gamma_part


# ---------------------------------------------------------------------------
# Conjugate batch optimum (13)
# ---------------------------------------------------------------------------
def sufficient_statistics(mu: Tensor, var: Tensor, gamma: Tensor, n_total: float):
    """Batch statistics scaled to the data set, w = N/|B|: (Nk, S1, S2).

    mu, var: (..., B, D); gamma: (..., B, K). Nk: (..., K); S1, S2: (..., K, D).
    Computed in the inputs' precision (sums of a batch); callers combine them with
    the natural parameters in float64.
    """
    w = n_total / mu.shape[-2]
    s2_s1 = w * (gamma.transpose(-1, -2) @ ell_features(mu, var))
    s2, s1 = s2_s1.chunk(2, dim=-1)
    return w * gamma.sum(-2), s1, s2


def natural_batch_optimum(n_k: Tensor, s1: Tensor, s2: Tensor, m0, s0, a0, b0) -> Tensor:
    """lam* of (13) from the scaled statistics; stacked like natural_from_mean."""
    n_k = n_k.unsqueeze(-1).expand_as(s1)
    return torch.stack((
        a0 + 0.5 * n_k - 0.5,
        -(b0 + 0.5 * s0 * m0 * m0 + 0.5 * s2),
        s0 * m0 + s1,
        -0.5 * (s0 + n_k),
    ))


def ng_batch_optimum(mu, var, gamma, n_total, m0, s0, a0, b0):
    """The conjugate optimum (13) in mean parameters: (m, s, a, b), each (K, D)."""
    return mean_from_natural(natural_batch_optimum(*sufficient_statistics(mu, var, gamma, n_total), m0, s0, a0, b0))


# ---------------------------------------------------------------------------
# Predictive distribution (10)
# ---------------------------------------------------------------------------
def student_t_params(m: Tensor, s: Tensor, a: Tensor, b: Tensor):
    """(location, scale, dof) of the predictive t: scale^2 = (s + 1) b / (s a), dof 2a."""
    return m, torch.sqrt((s + 1.0) * b / (s * a)), 2.0 * a
