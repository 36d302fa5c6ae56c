"""The bound (11) against an exactly integrable model, and the envelope argument."""
import math

import torch

from fmvae.core.distributions import normal_gamma as ng
from fmvae.core.model import FMVAE
from fmvae.core.prior import FactorialMixturePrior


def gmm_prior(means, precisions, weights, conc=1e9):
    """q(xi) concentrated at a GMM: I = 1, means (K, D), precisions (K, D)."""
    means = torch.tensor(means, dtype=torch.float64)
    K, D = means.shape
    prior = FactorialMixturePrior([K], D)
    s = torch.full_like(means, conc)
    a = torch.full_like(means, conc)
    b = a / torch.tensor(precisions, dtype=torch.float64)
    prior.lam.copy_(ng.natural_from_mean(means[None], s[None], a[None], b[None]))
    prior.c.copy_(conc * torch.tensor(weights, dtype=torch.float64)[None])
    return prior


def linear_gaussian_case():
    torch.manual_seed(0)
    means = [[-2.0, 1.0], [2.0, -1.0], [0.0, 3.0]]
    precisions = [[1.0, 2.0], [3.0, 0.5], [1.5, 1.5]]
    weights = [0.2, 0.5, 0.3]
    W = torch.randn(3, 2, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    sigma2 = 0.25
    return gmm_prior(means, precisions, weights), means, precisions, weights, W, bias, sigma2


def exact_log_px(x, means, precisions, weights, W, bias, sigma2):
    """log sum_k pi_k N(x; W m_k + b, W Lambda_k^-1 W^T + sigma2 I)."""
    terms = []
    for m, p, w in zip(means, precisions, weights):
        cov = W @ torch.diag(1 / torch.tensor(p, dtype=torch.float64)) @ W.T + sigma2 * torch.eye(3, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(W @ torch.tensor(m, dtype=torch.float64) + bias, cov)
        terms.append(math.log(w) + dist.log_prob(x))
    return torch.logsumexp(torch.stack(terms), 0)


def bound_11(prior, x, mu, var, W, bias, sigma2):
    """(11) with the exact E_q[log N(x; Wz + b, sigma2 I)] of a linear-Gaussian decoder."""
    resid = x - (mu @ W.T + bias)
    trace = (var[:, None, :] * W[None] ** 2).sum((-1, -2))
    recon = (-0.5 * (resid ** 2).sum(-1) / sigma2 - 0.5 * trace / sigma2 - 1.5 * math.log(2 * math.pi * sigma2))
    st = prior.local_step(mu[:, None], var[:, None])
    return recon - prior.kl_z(var.log()[:, None], st).sum(-1) - prior.kl_r(st).sum(-1)


def test_bound_never_exceeds_the_exact_log_likelihood():
    prior, means, precisions, weights, W, bias, sigma2 = linear_gaussian_case()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64) * 3
    log_px = exact_log_px(x[:, None, :].transpose(0, 1)[0], means, precisions, weights, W, bias, sigma2)
    for _ in range(20):  # arbitrary encoders
        mu = torch.randn(200, 2, generator=gen, dtype=torch.float64) * 2
        var = torch.rand(200, 2, generator=gen, dtype=torch.float64) * 2 + 1e-3
        assert (bound_11(prior, x, mu, var, W, bias, sigma2) <= log_px + 1e-6).all()


def test_bound_is_tight_at_the_optimal_encoder_of_a_single_gaussian():
    """K = 1 and W with orthogonal columns: the exact posterior is a diagonal Gaussian, so (11) = log p(x)."""
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    bias, sigma2 = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), 0.5
    means, precisions = [[0.5, -1.0]], [[2.0, 0.7]]
    prior = gmm_prior(means, precisions, [1.0])
    x = torch.randn(50, 3, dtype=torch.float64)
    lam = torch.tensor(precisions[0], dtype=torch.float64)
    post_prec = lam + (W ** 2).sum(0) / sigma2
    post_mu = (lam * torch.tensor(means[0], dtype=torch.float64) + (x - bias) @ W / sigma2) / post_prec
    got = bound_11(prior, x, post_mu, (1 / post_prec).expand_as(post_mu), W, bias, sigma2)
    want = exact_log_px(x, means, precisions, [1.0], W, bias, sigma2)
    assert torch.allclose(got, want, atol=1e-6)
    # any other encoder is strictly worse
    assert (bound_11(prior, x, post_mu + 0.3, (1 / post_prec).expand_as(post_mu), W, bias, sigma2) < want).all()


def test_gradient_wrt_encoder_is_the_same_with_gamma_detached_or_not():
    """gamma is the exact maximiser (5), so d bound / d gamma vanishes on the simplex (envelope)."""
    torch.manual_seed(2)
    model = FMVAE("mlp", (6,), K=[3, 4], D=2).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    model.prior.init_from_encodings(mu, logvar.exp(), 100)

    def grads(detach: bool):
        model.zero_grad()
        mu, logvar = model.encode(x)
        st = model.prior.local_step(mu, logvar.exp())
        if not detach:
            st = st._replace(gamma=torch.softmax(st.logits, -1))
        loss = (model.prior.kl_z(logvar, st) + model.prior.kl_r(st)).sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])

    g_detached, g_full = grads(True), grads(False)
    assert g_detached.abs().max() > 1e-3
    assert torch.allclose(g_detached, g_full, rtol=1e-7, atol=1e-9)


def test_model_bound_recon_is_monte_carlo_of_the_decoder_likelihood():
    torch.manual_seed(3)
    model = FMVAE("conv28", (1, 28, 28), K=4, D=8)
    x = (torch.rand(5, 1, 28, 28) > 0.5).float()
    t = model.bound(x, samples=4)
    assert t.recon.shape == (5,) and t.kl_z.shape == (5, 1) and t.kl_r.shape == (5, 1)
    assert torch.allclose(t.elbo, t.recon - t.kl_z[:, 0] - t.kl_r[:, 0])
    assert (t.kl_r >= -1e-5).all()
    # recon is the mean of log p(x|z) over 4 reparameterised draws z = mu + sigma * eps
    with torch.no_grad():
        mu, logvar = model.encode(x)
        torch.manual_seed(4)
        got = model.reconstruction(x, mu, logvar, samples=4)
        torch.manual_seed(4)
        std = (0.5 * logvar).exp().flatten(1)
        draws = [model.decoder.log_prob(x, mu.flatten(1) + std * torch.randn_like(std)) for _ in range(4)]
    assert torch.allclose(got, torch.stack(draws).mean(0), rtol=1e-6)
    assert not torch.allclose(draws[0], draws[1])  # the draws really differ


def test_network_sizes_are_the_paper_s_and_celeba_s_width_setting():
    """conv28 at I*D = 64: 567,745 parameters (the paper: 567,775); CelebA's conv64 at I*D = 320:
    28.1M at the paper's widths 128-256-512-1024 (the issue's flop-counter figure), 4.7M at
    model.channels [32, 64, 128, 256]; a saved model of other widths is refused naming the key."""
    import pytest
    from fmvae.core import build
    from fmvae.params import ParamError, validate
    from fmvae.core.nets import count_parameters
    size = lambda m: count_parameters(m.encoder) + count_parameters(m.decoder)
    assert size(FMVAE("conv28", (1, 28, 28), 16, 64)) == 567745
    assert size(FMVAE("conv64", (3, 64, 64), [2, 2, 2, 64, 64], 64)) == 28145158
    narrow = FMVAE("conv64", (3, 64, 64), [2, 2, 2, 64, 64], 64, channels=(32, 64, 128, 256))
    assert size(narrow) == 4714342
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert narrow.bound(x).elbo.shape == (2,) and narrow.decode_mean(torch.zeros(2, 320)).shape == (2, 3, 64, 64)
    with pytest.raises(ParamError, match="model.channels"):
        build.check_model_config(build.model_config(narrow), FMVAE("conv64", (3, 64, 64), [2, 2, 2, 64, 64], 64),
                                  "joint.pt")
    with pytest.raises(ParamError, match="model.channels"):
        validate({"model": {"channels": [8, 16]}})  # binarised MNIST's conv28 takes no widths
