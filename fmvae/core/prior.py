"""The factorial mixture prior and its variational posterior q(xi) (sections 2.1-2.6).

Latent z = [z_1 .. z_I], z_i in R^D. Factor i is a K_i-component Gaussian mixture
whose weights pi_i have a Dirichlet posterior q(pi_i) = Dir(c_i), and whose
component means and precisions have Normal-Gamma posteriors q(mu_ikd, alpha_ikd).

All factors are stored in one padded (I, K_max, D) array so that every step is a
handful of batched tensor operations, whatever the K_i; `mask` marks the real
components. q(xi) is held in natural parameters (the SVI state) in float64: the
Normal-Gamma natural parameters cancel catastrophically in float32 when clusters
hold tens of thousands of points, and the arrays are tiny next to the networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from fmvae.core.clustering import factorial_kmeans, kmeans_plus_plus
from fmvae.core.distributions import dirichlet, normal_gamma as ng
from fmvae.core.distributions.dirichlet import expected_log_pi, kl_dirichlet
from fmvae.core.distributions.normal_gamma import (  # re-exported: the stable math API
    expected_log_normal,
    kl_normal_gamma,
    ng_batch_optimum,
    student_t_params,
)

__all__ = [
    "FactorialMixturePrior", "Hyperprior", "LocalStep", "PriorStats", "robbins_monro", "kl_normal_gamma",
    "expected_log_normal", "ng_batch_optimum", "student_t_params", "kl_dirichlet", "expected_log_pi",
    "neg_entropy_gaussian", "kmeans_plus_plus",
]


@dataclass(frozen=True)
class Hyperprior:
    """p(mu, alpha) = NG(m0, s0, a0, b0) and p(pi) = Dir(c0 * 1); the paper's values."""
    m0: float = 0.0
    s0: float = 1.0
    a0: float = 0.01
    b0: float = 0.01
    c0: float = 1.0


class PriorStats(NamedTuple):
    """What the local step needs from q(xi) (float32, see ng.ell_weights), and its validity."""
    const: Tensor    # (I, K)
    weights: Tensor  # (I, K, 2D)
    log_pi: Tensor   # (I, K), -inf on padded components
    valid: Tensor    # () bool: s, a, b, c of real components positive and finite


class LocalStep(NamedTuple):
    ell: Tensor     # (B, I, K) expected log-likelihoods (6), differentiable
    log_pi: Tensor  # (I, K) E[log pi_ik], -inf on padded components
    logits: Tensor  # (B, I, K) ell + E[log pi]: the logits of g in (8), differentiable
    gamma: Tensor   # (B, I, K) responsibilities (5), clamped to labels, detached


def robbins_monro(step, tau0: float, kappa: float):
    """SVI step size rho_t = (tau0 + t)^(-kappa), kappa in (1/2, 1]."""
    return (tau0 + step) ** (-kappa)


def neg_entropy_gaussian(logvar: Tensor) -> Tensor:
    """-H[N(mu, diag exp(logvar))], summed over the last dimension."""
    return -0.5 * (ng.LOG_2PI + 1.0 + logvar).sum(-1)


def _sum_k(terms: Tensor) -> Tensor:
    """Sum over components (the last axis), accumulated in float64: a float32 sum's rounding depends
    on how many (zero) padded components follow the real ones, the float64 one's does not reach the
    float32 result, so a trial's terms do not depend on the K of the others in its pack."""
    return terms.sum(-1, dtype=torch.float64).to(terms.dtype)


class FactorialMixturePrior(nn.Module):
    """p(z) = prod_i sum_k pi_ik N(z_i; mu_ik, diag(alpha_ik)^-1) with q(xi) in natural parameters.

    K: components per factor, e.g. (2, 2, 2, 64, 64). D: dimensions per factor.
    Factors listed in `use_gradient_factors` (the semi-supervised ones when
    Delta > 0, section 2.5) are moved by first-order gradients in a log-mean
    parameterisation instead of SVI.
    """

    def __init__(self, K: Sequence[int] | int, D: int, hyper: Hyperprior = Hyperprior()):
        super().__init__()
        K = (int(K),) if isinstance(K, int) else tuple(int(k) for k in K)
        if not K or min(K) < 1 or D < 1:
            raise ValueError(f"need K_i >= 1 for every factor and D >= 1, got K={K}, D={D}")
        self.K, self.I, self.D, self.hyper = K, len(K), int(D), hyper
        k_max = max(K)
        f64 = torch.float64
        self.register_buffer("mask", torch.arange(k_max)[None, :] < torch.tensor(K)[:, None])
        shape = (self.I, k_max, self.D)
        prior = [torch.full(shape, v, dtype=f64) for v in (hyper.m0, hyper.s0, hyper.a0, hyper.b0)]
        self.register_buffer("lam", ng.natural_from_mean(*prior))
        self.register_buffer("c", torch.full((self.I, k_max), hyper.c0, dtype=f64))
        self.register_buffer("svi_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("gradient_factors", torch.zeros(self.I, dtype=torch.bool))
        # Log-mean parameters, used only for gradient factors (log keeps s, a, b, c > 0
        # and makes Adam's step a relative change whatever their scale).
        self.grad_m = nn.Parameter(torch.zeros(shape, dtype=f64))
        self.grad_log_sab = nn.Parameter(torch.zeros((3,) + shape, dtype=f64))
        self.grad_log_c = nn.Parameter(torch.zeros(self.I, k_max, dtype=f64))
        self._has_gradient_factors = False  # host copy of gradient_factors.any(): no device sync per step
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_mode())

    def _refresh_mode(self) -> None:
        self._has_gradient_factors = bool(self.gradient_factors.any())

    # ------------------------------------------------------------------ state
    def use_gradient_factors(self, factors: Sequence[int]) -> None:
        """Switch `factors` to first-order updates, starting from the current q(xi)."""
        chosen = torch.zeros(self.I, dtype=torch.bool, device=self.lam.device)
        chosen[list(factors)] = True
        m, s, a, b = ng.mean_from_natural(self.lam)
        with torch.no_grad():
            self.grad_m.copy_(m)
            self.grad_log_sab.copy_(torch.stack((s, a, b)).log())
            self.grad_log_c.copy_(self.c.log())
            self.gradient_factors.copy_(chosen)
        self._refresh_mode()

    def gradient_parameters(self) -> list[nn.Parameter]:
        return [self.grad_m, self.grad_log_sab, self.grad_log_c]

    @property
    def has_gradient_factors(self) -> bool:
        return self._has_gradient_factors

    def mean_params(self):
        """(m, s, a, b) of shape (I, K, D) and c of shape (I, K), float64."""
        m, s, a, b = ng.mean_from_natural(self.lam)
        c = self.c
        if self.has_gradient_factors:
            g = self.gradient_factors
            gs, ga, gb = self.grad_log_sab.exp()
            pick = lambda grad, svi: torch.where(g.view(-1, *([1] * (svi.dim() - 1))), grad, svi)
            m, s, a, b = pick(self.grad_m, m), pick(gs, s), pick(ga, a), pick(gb, b)
            c = pick(self.grad_log_c.exp(), c)
        return m, s, a, b, c

    def sync_gradient_factors(self) -> None:
        """Write the gradient factors' current values back into the natural parameters."""
        if not self.has_gradient_factors:
            return
        with torch.no_grad():
            m, s, a, b, c = self.mean_params()
            self.lam.copy_(ng.natural_from_mean(m, s, a, b))
            self.c.copy_(c)

    def is_valid(self) -> Tensor:
        """Device bool: s, a, b, c of every real component positive and finite (no host sync)."""
        return self.stats().valid

    def _validity(self, m, s, a, b, c) -> Tensor:
        msk = self.mask[..., None]
        ok = (((s > 0) & (a > 0) & (b > 0) & m.isfinite() & s.isfinite() & a.isfinite() & b.isfinite()) | ~msk).all()
        return ok & ((c > 0) & c.isfinite() | ~self.mask).all()

    # ------------------------------------------------------------ local step
    def stats(self, dtype=torch.float32, cache: bool = True) -> PriorStats:
        """Expected statistics of q(xi) for the local step; differentiable for gradient factors.

        Without gradient factors they are cached until lam or c change in place (tracked by
        PyTorch's version counters), so the fused joint step computes them once per iteration.
        cache=False computes them afresh and keeps nothing: for a caller that swaps the buffers
        (torch.func.functional_call over stacked trials), where a cached value could be another's.
        """
        cache = cache and not self.has_gradient_factors
        key = (self.lam._version, self.c._version, id(self.lam), dtype, self.lam.device) if cache else None
        if cache and getattr(self, "_stats_key", None) == key:
            return self._stats
        m, s, a, b, c = self.mean_params()  # float64: b = -lam2 - s m^2 / 2 cancels
        valid = self._validity(m, s, a, b, c)
        m, s, a, b, c = (t.to(dtype) for t in (m, s, a, b, c))  # the rest is well conditioned
        const, weights = ng.ell_weights(m, s, a, b)
        out = PriorStats(const, weights, expected_log_pi(c, self.mask), valid)
        if cache:
            self._stats_key, self._stats = key, out
        return out

    def invalidate_stats(self) -> None:
        """Forget the cached statistics (after a CUDA graph wrote q(xi) behind PyTorch's back)."""
        self._stats_key = None

    def local_step(self, mu: Tensor, var: Tensor, labels: Tensor | None = None,
                   stats: PriorStats | None = None) -> LocalStep:
        """Expected log-likelihoods (6) and responsibilities (5) for every factor.

        mu, var: (B, I, D) from the encoder. labels: (B, I) long, -1 where a
        property is not observed; observed ones clamp gamma to one-hot (2.5).
        Runs in float32 even under autocast: bf16 would ruin (6)'s expanded quadratic.
        """
        with torch.autocast(mu.device.type, enabled=False):
            dtype = torch.promote_types(mu.dtype, torch.float32)
            mu, var = mu.to(dtype), var.to(dtype)
            stats = self.stats(dtype) if stats is None else stats
            features = ng.ell_features(mu, var).transpose(0, 1)  # (I, B, 2D)
            ell = (stats.const[:, None, :] + features @ stats.weights.transpose(-1, -2)).transpose(0, 1)
            logits = ell + stats.log_pi
            gamma = torch.softmax(logits.detach(), dim=-1, dtype=torch.float64).to(dtype)  # see _sum_k
            if labels is not None:
                gamma = self.clamp(gamma, labels)
        return LocalStep(ell, stats.log_pi, logits, gamma)

    def clamp(self, gamma: Tensor, labels: Tensor) -> Tensor:
        """gamma_i = y_i for observed properties (labels >= 0); unchanged where labels == -1."""
        one_hot = nn.functional.one_hot(labels.clamp(min=0), gamma.shape[-1]).to(gamma.dtype)
        return torch.where((labels >= 0)[..., None], one_hot, gamma)

    # --------------------------------------------------------- bound terms
    def kl_z(self, logvar: Tensor, step: LocalStep) -> Tensor:
        """KL[z] per point and factor (4b, C.2): sum_k gamma_ik (-H[q(z_i|x)] - ell_ik). (B, I)."""
        return _sum_k(step.gamma * (neg_entropy_gaussian(logvar)[..., None] - step.ell))

    def kl_r(self, step: LocalStep) -> Tensor:
        """KL[r] per point and factor (4c, C.3): sum_k gamma (log gamma - E[log pi]). (B, I)."""
        gamma = step.gamma
        log_pi = torch.where(self.mask, step.log_pi, torch.zeros_like(step.log_pi))
        # 0 log 0 = 0 with a finite derivative at 0 (padded components), unlike xlogy's
        log_gamma = torch.log(torch.where(gamma > 0, gamma, torch.ones_like(gamma)))
        return _sum_k(gamma * (log_gamma - log_pi))

    def cross_entropy(self, step: LocalStep, labels: Tensor) -> Tensor:
        """-sum_{observed i} log g_{i, y_i} per point (the term Delta multiplies in (8)). (B,)."""
        log_g = torch.log_softmax(step.logits, dim=-1)
        picked = log_g.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return -torch.where(labels >= 0, picked, torch.zeros_like(picked)).sum(-1)

    def global_kl(self) -> Tensor:
        """(4d) + (4e) before division by N: sum_ik KL_NG + sum_i KL_Dir, over real components."""
        h = self.hyper
        m, s, a, b, c = self.mean_params()
        kl_ng = kl_normal_gamma(m, s, a, b, h.m0, h.s0, h.a0, h.b0).sum(-1)
        return torch.where(self.mask, kl_ng, torch.zeros_like(kl_ng)).sum() + kl_dirichlet(c, h.c0, self.mask).sum()

    # ------------------------------------------------------------ global step
    @torch.no_grad()
    def svi_step(self, mu: Tensor, var: Tensor, gamma: Tensor, n_total: float, rho) -> None:
        """Natural-gradient step (12)-(14): lam <- (1 - rho) lam + rho lam*(batch), same for c.

        mu, var, gamma: (B, I, D), (B, I, D), (B, I, K), gamma recomputed after the
        network step. Gradient factors are left to their optimiser.
        """
        h = self.hyper
        f64 = torch.float64
        # in float64: exact enough that a prior padded with empty components (a pack, fmvae.pack) sums
        # to the same statistics as the unpadded one, whatever shapes the matrix product is tiled for
        n_k, s1, s2 = ng.sufficient_statistics(*(t.transpose(0, 1).to(f64) for t in (mu, var, gamma)), n_total)
        lam_star = ng.natural_batch_optimum(n_k, s1, s2, h.m0, h.s0, h.a0, h.b0)
        c_star = h.c0 + n_k
        rho = torch.as_tensor(rho, dtype=f64, device=self.lam.device)
        svi = (~self.gradient_factors).view(1, -1, 1, 1)
        self.lam.copy_(torch.where(svi, torch.lerp(self.lam, lam_star, rho), self.lam))
        self.c.copy_(torch.where(svi[0, :, :, 0], torch.lerp(self.c, c_star, rho), self.c))
        self.svi_steps += 1

    @torch.no_grad()
    def revive(self, mu: Tensor, ell: Tensor, min_share: float, n_total: float) -> Tensor:
        """Dead-component restart (joint.revive, a departure from the paper). In every SVI factor, each real
        component whose q(pi) count c_ik - c0 has fallen below n = min_share * n_total becomes the conjugate
        posterior of n points at one of the batch's encodings that the factor's other components explain
        worst (lowest max_k ell_ik), with the precision E[alpha] of the factor's most populated component,
        and c_ik = c0 + n. The other components are left as they are, to the bit.

        mu: (B, I, D) encoder means; ell: (B, I, K) their expected log-likelihoods (6). Returns (I,) long:
        the components re-seeded in each factor.
        """
        h, n = self.hyper, float(min_share) * float(n_total)
        count = self.c - h.c0
        dead = self.mask & (count < n) & ~self.gradient_factors[:, None]
        revived = dead.sum(-1)
        m, s, a, b = ng.mean_from_natural(self.lam)
        for i in dead.any(-1).nonzero().flatten().tolist():
            live = self.mask[i] & ~dead[i]
            ks = dead[i].nonzero().flatten()[: mu.shape[0]]
            if not live.any():  # nothing to compare with or to take a spread from
                revived[i] = 0
                continue
            fit = ell[:, i].masked_fill(~live, float("-inf")).amax(-1)
            worst = fit.argsort()[: len(ks)]
            donor = count[i].masked_fill(~self.mask[i], float("-inf")).argmax()
            precision = a[i, donor] / b[i, donor]  # (D,)
            a_new = torch.full_like(precision, h.a0 + n / 2)
            fresh = ng.natural_from_mean(mu[worst, i].to(m.dtype), torch.full_like(a_new, h.s0 + n).expand(len(ks), -1),
                                         a_new.expand(len(ks), -1), (a_new / precision).expand(len(ks), -1))
            self.lam[:, i, ks] = fresh
            self.c[i, ks] = h.c0 + n
            revived[i] = len(ks)
        return revived

    @torch.no_grad()
    def init_from_assignments(self, mu: Tensor, var: Tensor, assignments: Tensor, n_total: float) -> None:
        """Set q(xi) to the conjugate posterior of a hard clustering (the batch optimum (13)
        with rho = 1). assignments: (M, I) long component indices."""
        gamma = nn.functional.one_hot(assignments.to(mu.device), self.mask.shape[1]).to(mu.dtype)
        self.svi_step(mu, var, gamma, n_total, rho=1.0)
        self.svi_steps.zero_()

    @torch.no_grad()
    def init_from_encodings(self, mu: Tensor, var: Tensor, n_total: float, generator=None) -> None:
        """Break symmetry by k-means++ and Lloyd steps on each block of the encoder means, then
        initialise from that clustering. (fmvae.core.phases.init_prior also rotates the latent space.)"""
        _, assignments, _ = factorial_kmeans(mu, self.K, generator, rotate=False)
        self.init_from_assignments(mu, var, assignments, n_total)

    # ------------------------------------------------------------- sampling
    def mixture_weights(self) -> Tensor:
        """E[pi_i] under q, (I, K); zero on padded components."""
        return dirichlet.mean_pi(self.mean_params()[4], self.mask)

    def populated(self, min_count: float = 1.0) -> Tensor:
        """(I, K) bool: real components that q(pi) credits with at least `min_count` data points
        (c_ik - c0, the expected count the SVI steps accumulated)."""
        return self.mask & (self.mean_params()[4] - self.hyper.c0 >= min_count)

    @torch.no_grad()
    def sample(self, n: int, clamp: Tensor | None = None, populated_only: bool = True):
        """Draw z from the predictive (10): k_i ~ Cat(E[pi_i]), z_i ~ Student-t of component k_i.

        clamp: (n, I) long, -1 where k_i is sampled and a component index where it
        is fixed (conditional samples for the figure grids). Uses the global RNG. Returns (z (n, I*D), k (n, I)).
        populated_only: sampled k_i are drawn among the components holding data (`populated`), E[pi_i]
        renormalised over them; a factor with none keeps all. An empty component's predictive is the
        hyperprior's Student-t with 2 a0 = 0.02 degrees of freedom: no mean, draws beyond 1e30 (0.4% of
        CelebA's clamped samples hit one), for E[pi] of about 1/N. A clamped component is always used.
        """
        m, s, a, b, _ = self.mean_params()
        pi = self.mixture_weights()
        if populated_only:
            keep = self.populated()
            keep = keep | ~keep.any(-1, keepdim=True)  # nothing populated (an untrained prior): all
            pi = torch.where(keep, pi, torch.zeros_like(pi))
        k = torch.stack([torch.multinomial(pi[i], n, replacement=True)
                         for i in range(self.I)], dim=1)
        if clamp is not None:
            if (clamp >= torch.tensor(self.K, device=clamp.device)).any():
                raise ValueError(f"clamped component outside K={self.K}")
            k = torch.where(clamp >= 0, clamp, k)
        loc, scale, df = student_t_params(m, s, a, b)
        idx = torch.arange(self.I, device=k.device)
        loc, scale, df = loc[idx, k], scale[idx, k], df[idx, k]  # (n, I, D)
        normal = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
        chi2_over_df = torch._standard_gamma(df / 2) / (df / 2)
        z = loc + scale * normal / chi2_over_df.sqrt()
        return z.reshape(n, -1).float(), k

    def log_predictive(self, z: Tensor) -> Tensor:
        """log p(z | X) under the predictive (10): sum_i log sum_k E[pi_ik] prod_d t(z_d). z: (..., I, D).

        In float64, returned as float64: the Student-t's lgamma(a + 1/2) - lgamma(a) cancels
        at large a (a ~ N_k / 2, thousands), which costs float32 about 0.1 nats per point.
        """
        m, s, a, b, _ = self.mean_params()
        loc, scale, df = student_t_params(m.double(), s.double(), a.double(), b.double())
        log_t = torch.distributions.StudentT(df, loc, scale).log_prob(z.double().unsqueeze(-2)).sum(-1)  # (..., I, K)
        log_w = self.mixture_weights().double().log()
        return torch.logsumexp(torch.where(self.mask, log_t + log_w, torch.full_like(log_t, float("-inf"))), -1).sum(-1)
