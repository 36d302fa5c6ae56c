"""The FM-VAE: encoder q_phi(z|x), decoder p_theta(x|z) and the factorial mixture prior.

`bound` returns every term of (4a)-(4e) and (8) per data point; the training
phases in `fmvae.core.phases` and the evaluation in `fmvae.core.evaluate` combine them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fmvae.core.nets import latent_layers, make_networks
from fmvae.core.prior import FactorialMixturePrior, Hyperprior, LocalStep, PriorStats


@dataclass
class BoundTerms:
    """Per-point terms of the bound; shapes (B,), (B, I), (B, I), (B,)."""
    recon: Tensor   # E_q[log p(x|z)] (4a), Monte Carlo over `samples` draws
    kl_z: Tensor    # KL[z] per factor (4b)
    kl_r: Tensor    # KL[r] per factor (4c)
    ce: Tensor      # -sum_{observed i} log g_{i, y_i}, zero for unlabelled points
    step: LocalStep
    mu: Tensor
    var: Tensor

    @property
    def elbo(self) -> Tensor:
        """The per-point bound (11): recon - KL[z] - KL[r] (no global terms)."""
        return self.recon - self.kl_z.sum(-1) - self.kl_r.sum(-1)


def _full_precision(t: Tensor) -> Tensor:
    """Network outputs under bf16/fp16 autocast are upcast: the prior's math runs in >= float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class FMVAE(nn.Module):
    def __init__(self, arch: str, x_shape: Sequence[int], K: Sequence[int] | int, D: int,
                 hyper: Hyperprior = Hyperprior(), channels: Sequence[int] = ()):
        super().__init__()
        self.prior = FactorialMixturePrior(K, D, hyper)
        self.I, self.D, self.K = self.prior.I, self.prior.D, self.prior.K
        self.arch, self.x_shape, self.channels = arch, tuple(x_shape), tuple(channels)
        self.encoder, self.decoder = make_networks(arch, self.I * self.D, x_shape, self.channels)

    def network_parameters(self) -> list[nn.Parameter]:
        """theta and phi."""
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Means and log variances of q(z|x), each (B, I, D)."""
        mu, logvar = _full_precision(self.encoder(x)).chunk(2, dim=-1)
        return mu.reshape(-1, self.I, self.D), logvar.reshape(-1, self.I, self.D)

    def reconstruction(self, x: Tensor, mu: Tensor, logvar: Tensor, samples: int = 1,
                       noise: Tensor | None = None) -> Tensor:
        """E_q[log p(x|z)] by `samples` reparameterised draws, (B,). noise: the standard normal draws,
        (samples, B, I*D), when the caller keeps its own random stream (packed trials); else drawn here."""
        std = (0.5 * logvar).exp().flatten(1)
        mu = mu.flatten(1)
        total = 0.0
        for s in range(samples):
            eps = torch.randn_like(std) if noise is None else noise[s]
            z = mu + std * eps
            total = total + _full_precision(self.decoder.log_prob(x, z))
        return total / samples if samples > 1 else total

    def bound(self, x: Tensor, labels: Tensor | None = None, samples: int = 1,
              stats: PriorStats | None = None) -> BoundTerms:
        """All per-point terms with gamma from (5), clamped where labels >= 0."""
        mu, logvar = self.encode(x)
        return self.bound_from_encodings(x, mu, logvar, labels, samples, stats)

    def bound_from_encodings(self, x: Tensor, mu: Tensor, logvar: Tensor, labels: Tensor | None = None,
                             samples: int = 1, stats: PriorStats | None = None,
                             noise: Tensor | None = None) -> BoundTerms:
        var = logvar.exp()
        step = self.prior.local_step(mu, var, labels, stats)
        recon = self.reconstruction(x, mu, logvar, samples, noise)
        ce = self.prior.cross_entropy(step, labels) if labels is not None else torch.zeros_like(recon)
        return BoundTerms(recon, self.prior.kl_z(logvar, step), self.prior.kl_r(step), ce, step, mu, var)

    @torch.no_grad()
    def rotate_latent(self, rotation: Tensor) -> None:
        """Re-express encoder and decoder in the coordinates z' = z R, for an orthogonal R (I*D, I*D).

        Encoder means become mu R exactly, and the decoder maps z' to what it mapped z = z' R^T to,
        so reconstructions at the means are unchanged; so is the pre-training KL of the means, since
        N(0, I) is rotation invariant. q(z'|x) stays diagonal: its log variance j becomes
        sum_k R_kj^2 log var_k, linear in the old log variances (so it folds into the output layer)
        and, by Jensen, a lower bound on log (R^T diag(var) R)_jj, exact when var is isotropic.
        """
        head, first = latent_layers(self.encoder, self.decoder)
        latent = self.I * self.D
        r = rotation.to(head.weight)
        if r.shape != (latent, latent) or not torch.allclose(r.T @ r, torch.eye(latent, dtype=r.dtype, device=r.device),
                                                             atol=1e-4):
            raise ValueError(f"rotate_latent: expected an orthogonal ({latent}, {latent}) matrix")
        mixing = torch.block_diag(r, r * r).T  # rows: new (mean, log variance) from old
        head.weight.copy_(mixing @ head.weight)
        head.bias.copy_(mixing @ head.bias)
        first.weight.copy_(first.weight @ r)  # W z = W R z'^T since z = z' R^T

    def vae_bound(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(recon, KL) per point under a N(0, I) prior, for pre-training; noise as in reconstruction."""
        mu, logvar = self.encode(x)
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).flatten(1).sum(-1)
        return self.reconstruction(x, mu, logvar, noise=noise), kl

    @torch.no_grad()
    def importance_weighted(self, x: Tensor, samples: int, chunk: int = 100) -> Tensor:
        """log p(x) estimate (IWAE): log mean_s p(x|z_s) p(z_s|X) / q(z_s|x), z_s ~ q; (B,).

        p(z|X) is the predictive prior (10), a mixture of Student-t products.
        """
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        log_w = []
        for start in range(0, samples, chunk):
            s = min(chunk, samples - start)
            eps = torch.randn((s,) + mu.shape, device=mu.device)
            z = mu + std * eps  # (s, B, I, D)
            e64 = eps.double()  # the weights' terms in float64: log p(z|X) needs it (see log_predictive)
            log_q = (-0.5 * e64 * e64 - 0.5 * logvar.double() - 0.5 * math.log(2 * math.pi)).sum((-1, -2))
            log_pz = self.prior.log_predictive(z)
            x_rep = x.unsqueeze(0).expand((s,) + x.shape).reshape((-1,) + x.shape[1:])
            log_px = _full_precision(self.decoder.log_prob(x_rep, z.reshape(s * x.shape[0], -1))).view(s, -1)
            log_w.append(log_px.double() + log_pz - log_q)
        return torch.logsumexp(torch.cat(log_w), 0) - math.log(samples)

    @torch.no_grad()
    def decode_mean(self, z: Tensor) -> Tensor:
        return self.decoder.mean(z)

    @torch.no_grad()
    def conditional_samples(self, n: int, clamp: dict[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Decoder means of n draws with components {factor: k} clamped, the rest sampled (2.6)."""
        fixed = torch.full((n, self.I), -1, dtype=torch.long, device=self.prior.lam.device)
        for i, k in (clamp or {}).items():
            fixed[:, i] = k
        z, k = self.prior.sample(n, fixed)
        return self.decode_mean(z), k
