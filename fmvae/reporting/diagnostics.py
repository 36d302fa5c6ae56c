"""Where a named property lives in a trained model (before any lever is tried on it).

The named factor p of property p is clamped to the property's value in training (its component k is
the value k). A model draws what the factor names only if (1) the encoder puts the property in block p
and not elsewhere, (2) the decoder reads it from block p, and (3) the prior of factor p keeps the values
apart. Each measure below takes the blocks' encodings mu (N, I, D), the labels y (N,) of property p,
and where it needs them `decode` (z (N, I, D) -> images) and `judge` (images -> logits (N, K_p) of
property p), so that a stub decoder or judge gives a known answer (tests/test_diagnostics.py):

    block_probe        balanced accuracy of a logistic regression on each block's encodings
    decoder_read       the share of |d log judge(y | decode(z)) / dz|^2 that falls in each block
    block_transplant   decode image a with block j taken from an image b of another value: the share
                       the judge reads as b's value, per block j (the block that carries the property)
    component_move     block p moved from its value's component mean to another's: the share the judge
                       reads as the new value (fmvae.reporting.celeba.factor_swap, for any K)
    prior_fit          each component's predictive spread against its class's encodings, and the
                       Mahalanobis separation of the components against that of the classes
    round_trip         clamp factor p to k, decode, encode again: how often argmax q(r_p|x) is k
    factor_usage       per factor, the share of test images each component takes (argmax q(r|x)) and
                       its NMI with the property (a free factor should carry style, not identity)
"""
from __future__ import annotations

import torch

from fmvae.core.distributions.normal_gamma import student_t_params
from fmvae.reporting.celeba import normalized_mutual_information


def balanced_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """The mean over classes present of the recall (chance: 1 / classes, whatever their frequencies)."""
    return float(torch.stack([(pred[true == c] == c).float().mean() for c in true.unique()]).mean())


def block_probe(mu: torch.Tensor, y: torch.Tensor, steps: int = 300, seed: int = 0) -> list[float]:
    """Per block: balanced accuracy, on the second half of the points, of a multinomial logistic
    regression fitted on the first half to that block's standardised encodings."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    fit, score = order[: len(y) // 2], order[len(y) // 2:]
    classes = int(y.max()) + 1
    out = []
    for i in range(mu.shape[1]):
        h = mu[:, i].double()
        h = (h - h[fit].mean(0)) / h[fit].std(0).clamp(min=1e-8)
        linear = torch.nn.Linear(h.shape[1], classes, dtype=torch.float64)
        opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.cross_entropy(linear(h[fit]), y[fit]) + 1e-4 * linear.weight.square().sum()
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            out.append(balanced_accuracy(linear(h[score]).argmax(-1), y[score]))
    return out


def decoder_read(mu: torch.Tensor, y: torch.Tensor, decode, judge) -> list[float]:
    """Per block: the share, summed over points, of the squared gradient of the judge's log-probability
    of each point's own value, taken at its reconstruction z = mu, that lies in that block."""
    z = mu.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(judge(decode(z)), -1).gather(-1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(logp, z)
    per_block = grad.double().square().sum((0, 2))
    return (per_block / per_block.sum()).tolist()


@torch.no_grad()
def block_transplant(mu: torch.Tensor, y: torch.Tensor, decode, judge, seed: int = 0) -> list[float]:
    """Pair each point a with a point b of another value (drawn at random); per block j, decode a with
    block j replaced by b's and return the share the judge reads as b's value."""
    gen = torch.Generator().manual_seed(seed)
    donors = torch.empty_like(y)
    for v in y.unique():
        others = (y != v).nonzero().squeeze(1)
        at = (y == v).nonzero().squeeze(1)
        donors[at] = others[torch.randint(len(others), (len(at),), generator=gen)]
    out = []
    for j in range(mu.shape[1]):
        z = mu.clone()
        z[:, j] = mu[donors, j]
        out.append(float((judge(decode(z)).argmax(-1) == y[donors]).float().mean()))
    return out


@torch.no_grad()
def component_move(mu: torch.Tensor, y: torch.Tensor, means: torch.Tensor, p: int, decode, judge,
                   seed: int = 0) -> float:
    """Move block p of every point by m_target - m_own (means: factor p's component means (K, D)), the
    target a random other value; the share the judge then reads as the target."""
    gen = torch.Generator().manual_seed(seed)
    k = means.shape[0]
    target = (y + torch.randint(1, k, y.shape, generator=gen)) % k
    z = mu.clone()
    z[:, p] += (means[target] - means[y]).to(z)
    return float((judge(decode(z)).argmax(-1) == target).float().mean())


@torch.no_grad()
def prior_fit(model, mu: torch.Tensor, y: torch.Tensor, p: int) -> dict:
    """Factor p's prior against the encodings of the property's classes: per component k (= value k),
    the root mean square over dimensions of the predictive Student-t's scale and of the class's encodings'
    standard deviation; and, for each pair of values, the Mahalanobis distance between the two
    components' means under their pooled predictive variance beside the same distance between the two
    classes' mean encodings under their pooled variance (separations: min over pairs, and mean)."""
    m, s, a, b, _ = model.prior.mean_params()
    loc, scale, df = student_t_params(m[p], s[p], a[p], b[p])
    predictive_var = scale.square() * df / (df - 2).clamp(min=1e-6)  # a Student-t's variance (df > 2)
    h = mu[:, p].double()
    k = int(y.max()) + 1
    class_mean = torch.stack([h[y == c].mean(0) for c in range(k)])
    class_var = torch.stack([h[y == c].var(0) for c in range(k)])

    def separation(means, var):
        d = [float(((means[i] - means[j]).square() / ((var[i] + var[j]) / 2)).sum().sqrt())
             for i in range(k) for j in range(i + 1, k)]
        return min(d), sum(d) / len(d)

    prior_sep, class_sep = separation(loc[:k].double(), predictive_var[:k].double()), separation(class_mean, class_var)
    return {"predictive_rms_scale": predictive_var[:k].mean(-1).sqrt().tolist(),
            "class_rms_std": class_var.mean(-1).sqrt().tolist(),
            "prior_separation_min": prior_sep[0], "prior_separation_mean": prior_sep[1],
            "class_separation_min": class_sep[0], "class_separation_mean": class_sep[1]}


@torch.no_grad()
def round_trip(model, p: int, n: int = 1000, seed: int = 0) -> float:
    """Clamp factor p to a uniformly drawn k (the others sampled), decode the mean image, encode it:
    the share whose argmax q(r_p|x) is k. A judge-free agreement."""
    torch.manual_seed(seed)
    dev = model.prior.lam.device
    k = model.K[p]
    clamp = torch.full((n, model.I), -1, dtype=torch.long, device=dev)
    clamp[:, p] = torch.randint(k, (n,), device=dev)
    z, _ = model.prior.sample(n, clamp)
    x = model.decode_mean(z.to(dev))
    mu, logvar = model.encode(x)
    gamma = model.prior.local_step(mu, logvar.exp()).gamma
    return float((gamma[:, p, :k].argmax(-1) == clamp[:, p]).float().mean())


@torch.no_grad()
def factor_usage(assignments: torch.Tensor, y: torch.Tensor, K) -> list[dict]:
    """Per factor i: the share of the points whose argmax q(r_i|x) is each component, how many hold at
    least 2% of them, and the NMI of the assignment with the property."""
    out = []
    for i, k in enumerate(K):
        shares = torch.bincount(assignments[:, i], minlength=k)[:k].double() / len(assignments)
        out.append({"factor": i, "shares": shares.tolist(), "components_over_2pct": int((shares >= 0.02).sum()),
                    "nmi_with_property": normalized_mutual_information(assignments[:, i].numpy(), y.numpy())})
    return out
