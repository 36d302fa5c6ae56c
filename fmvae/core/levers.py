"""Departures from the paper that make named factors control generation (issue 34, lever 3), and one
that keeps the free factors' mixtures in use. Each is a named setting, off by default (weight 0), never
in the paper presets; with all off the joint step is the paper's, bit for bit.

    swap consistency  (semi.swap_weight)   for every image of the batch, each named block is replaced
                      by a draw from a random component of its factor, the other blocks kept; the
                      decoded image, read back through the encoder and the prior (q(r_i | x'), (5)),
                      must name that component:  w * mean CE(q(r_i | decode(z')), k_i).
                      The reader is the model's own recognition path with its weights held fixed (a
                      judge, not a student): the gradient reaches the decoder and, through the kept
                      blocks' samples, the encoder, never the reader's weights, so it cannot agree
                      by reading its own inventions.
    adversary         (semi.adversary_weight)  for each named factor i, a linear classifier reads the
                      other blocks' means and predicts the factor's responsibilities gamma_i (the
                      label where observed); it learns to predict, and the encoder is trained, with
                      weight w, to make its predictions uniform (as CSVAE, Klys et al. 2018, keeps
                      the other blocks free of the label), so the free blocks hold nothing the
                      classifier can use about the named property.
    usage             (joint.usage_weight)  for each factor trained by SVI with K_i > 1 (the free ones),
                      the entropy of its components' share of the batch, H(mean_b q(r_i | x_b)), is
                      rewarded with weight w:  -w * sum_i H(...). Why: the bound's KL[r] averaged over
                      the data is E_x KL(q(r_i|x) || pi_i) = I(x; r_i) + KL(mean_x q(r_i|x) || pi_i), and
                      I(x; r_i) = H(shares) - E_x H(q(r_i|x)): the bound charges H(shares) for spreading
                      the data over more components, so nothing in it keeps a component in use that the
                      encodings can do without. w = 1 cancels that charge; w > 1 rewards spreading
                      (IMSAT, Hu et al. 2017). Only the encoder moves: q(xi) enters as fixed statistics.

Why: the diagnostics of the composition proxy (reports/diagnostics/mnist_compose_klz1.md) found the
decoder reading a quarter of the digit from the free block (which a linear probe reads at 0.50) and
a clamped digit drawn in 45% of samples: clamping the named block did not decide what is drawn.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from fmvae.core.distributions.normal_gamma import student_t_params
from fmvae.core.prior import PriorStats


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """-sum_k target_k log softmax(logits)_k, per row."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1)


class Adversary(nn.Module):
    """One linear classifier per named factor i: the other blocks' means (I - 1) * D -> K_i logits."""

    # The classifiers' logits are SPEED x a linear map whose initial weights are divided by SPEED: under Adam,
    # whose steps do not scale with the gradient, they then learn SPEED times faster than the encoder with
    # the one step size. A classifier as fast as the encoder is outrun: on tests/test_levers.py's known case
    # it is confused (cross-entropy log K) while a fresh probe still reads the label at 0.97; 10x: 0.65.
    SPEED = 10.0

    def __init__(self, I: int, D: int, K: Sequence[int], named: Sequence[int]):
        super().__init__()
        if I < 2:
            raise ValueError("semi.adversary_weight: the adversary reads the blocks other than the named "
                             "one; it needs model.I >= 2")
        self.named = list(named)
        self.heads = nn.ModuleList(nn.Linear((I - 1) * D, K[i]) for i in self.named)
        with torch.no_grad():
            for head in self.heads:
                head.weight /= self.SPEED
                head.bias /= self.SPEED

    def forward(self, mu: Tensor, gamma: Tensor, weight) -> tuple[Tensor, Tensor]:
        """(loss, the classifiers' cross-entropy). The classifiers learn to predict gamma_i (detached) from
        the other blocks of mu (detached); the encoder, through the classifiers with their weights held
        fixed, is asked for predictions uniform over the K_i components, times weight (domain confusion,
        Tzeng et al. 2015). Reversing the classifiers' gradient instead (Ganin & Lempitsky 2015) was
        measured here to make the free block anti-predictive, not uninformative: on the entangled synthetic
        case a probe read the property from it better than without (tests/test_levers.py)."""
        loss, judged = 0.0, 0.0
        for head, i in zip(self.heads, self.named):
            others = torch.cat((mu[:, :i], mu[:, i + 1:]), dim=1).flatten(1)
            k = head.out_features
            ce = soft_cross_entropy(self.SPEED * head(others.detach()), gamma[:, i, :k].detach()).mean()
            fixed = self.SPEED * nn.functional.linear(others, head.weight.detach(), head.bias.detach())
            confusion = -torch.log_softmax(fixed, dim=-1).mean(-1).mean()  # CE against uniform
            loss, judged = loss + ce + weight * confusion, judged + ce.detach()
        return loss, judged


def read_back(model, x: Tensor, stats: PriorStats) -> Tensor:
    """The logits of q(r | x) (5) with the encoder's weights and q(xi) held fixed, (B, I, K):
    differentiable in x only."""
    weights = {name: p.detach() for name, p in model.encoder.named_parameters()}
    weights |= dict(model.encoder.named_buffers())
    out = torch.func.functional_call(model.encoder, weights, (x,))
    mu, logvar = out.float().chunk(2, dim=-1)
    mu, logvar = mu.reshape(-1, model.I, model.D), logvar.reshape(-1, model.I, model.D)
    fixed = PriorStats(*(t.detach() for t in stats))
    return model.prior.local_step(mu, logvar.exp(), None, fixed).logits


def swap_consistency(model, mu: Tensor, logvar: Tensor, named: Sequence[int], stats: PriorStats) -> Tensor:
    """The swap term's mean cross-entropy, summed over named factors (module docstring).

    z ~ q(z|x) (reparameterised); each named block i is replaced by loc + scale * eps of a uniformly
    drawn component k_i's predictive (10) (the Student-t's Gaussian core: the tails add nothing here
    but rare, huge draws), reparameterised, so that the labelled factors' gradient-trained components
    learn from it too; decode to the mean image; read back."""
    prior, n = model.prior, mu.shape[0]
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    # differentiable for the labelled factors trained by gradient (section 2.5): the term also shapes
    # their components, whose predictive spread the diagnostics found 2.5x the class's (a constant for SVI's)
    m, s, a, b, _ = prior.mean_params()
    loc, scale, _ = student_t_params(m, s, a, b)
    loc, scale = loc.to(mu.dtype), scale.to(mu.dtype)
    blocks, targets = list(z.unbind(1)), []
    for i in named:
        k = torch.randint(prior.K[i], (n,), device=mu.device)
        blocks[i] = loc[i, k] + scale[i, k] * torch.randn_like(blocks[i])
        targets.append(k)
    moved = torch.stack(blocks, dim=1).flatten(1)
    logits = read_back(model, model.decoder.mean(moved), stats)
    return sum(nn.functional.cross_entropy(logits[:, i, :prior.K[i]], k) for i, k in zip(named, targets))


def usage_entropy(logits: Tensor, factors: Sequence[int], K: Sequence[int]) -> Tensor:
    """sum over `factors` of H(mean_b softmax(logits_b,i)), the entropy of the batch's share of each
    component, from the logits of q(r | x) (5), (B, I, K_max), differentiable. In log space: a component
    whose share underflows to 0 has a finite gradient (0), not 0 * log 0's NaN."""
    total = logits.new_zeros(())
    for i in factors:
        log_r = torch.log_softmax(logits[:, i, :K[i]], dim=-1)
        log_share = torch.logsumexp(log_r, dim=0) - math.log(logits.shape[0])
        total = total - (log_share.exp() * log_share).sum()
    return total
