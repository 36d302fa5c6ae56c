"""Local step, clamping, SVI and sampling of the factorial prior."""

import pytest
import torch

from fmvae.core.distributions import normal_gamma as ng
from fmvae.core.prior import FactorialMixturePrior, Hyperprior, ng_batch_optimum, robbins_monro


def concentrated_prior(means, precisions, weights, conc=1e8):
    """A one-factor prior whose q(xi) is a near-point mass at the given GMM (I=1, D=1)."""
    prior = FactorialMixturePrior([len(means)], 1)
    m = torch.tensor(means, dtype=torch.float64)[None, :, None]
    s = torch.full_like(m, conc)
    a = torch.full_like(m, conc)
    b = a / torch.tensor(precisions, dtype=torch.float64)[None, :, None]
    prior.lam.copy_(ng.natural_from_mean(m, s, a, b))
    prior.c.copy_(conc * torch.tensor(weights, dtype=torch.float64)[None])
    return prior


def test_responsibilities_are_the_exact_posterior_over_k():
    """A GMM pi = (0.3, 0.7), means (-1, 2), precisions (1, 4); z observed exactly (var -> 0)."""
    prior = concentrated_prior([-1.0, 2.0], [1.0, 4.0], [0.3, 0.7])
    z = torch.tensor([[-1.0], [0.5], [1.2], [3.0]])
    step = prior.local_step(z[:, None, :], torch.full((4, 1, 1), 1e-12))
    lik = torch.stack([0.3 * torch.exp(-0.5 * (z[:, 0] + 1) ** 2) * 1.0,
                       0.7 * torch.exp(-0.5 * 4 * (z[:, 0] - 2) ** 2) * 2.0], -1)  # pi_k sqrt(alpha_k) exp(..)
    exact = lik / lik.sum(-1, keepdim=True)
    assert torch.allclose(step.gamma[:, 0], exact, atol=1e-5)


def test_clamping_and_missing_labels():
    prior = FactorialMixturePrior([2, 3], 2)
    torch.manual_seed(0)
    prior.init_from_encodings(torch.randn(50, 2, 2), torch.ones(50, 2, 2) * 0.1, 50)
    mu, var = torch.randn(4, 2, 2), torch.rand(4, 2, 2)
    labels = torch.tensor([[1, -1], [-1, 2], [-1, -1], [0, 0]])
    free = prior.local_step(mu, var).gamma
    clamped = prior.local_step(mu, var, labels).gamma
    assert torch.equal(clamped[0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(clamped[1, 1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(clamped[3], torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    assert torch.equal(clamped[0, 1], free[0, 1]) and torch.equal(clamped[2], free[2])  # unobserved: (5)
    assert (free[:, 0, 2] == 0).all(), "factor 0 has K=2: the padded component gets no mass"
    assert torch.allclose(free.sum(-1), torch.ones(4, 2))
    # clamped KL[r] is -E[log pi_y]; unclamped it is the usual entropy form
    st = prior.local_step(mu, var, labels)
    assert torch.allclose(prior.kl_r(st)[0, 0], -st.log_pi[0, 1])


def test_svi_step_with_rho_one_on_full_data_is_the_conjugate_posterior():
    torch.manual_seed(1)
    prior = FactorialMixturePrior([3, 2], 2, Hyperprior())
    mu, var = torch.randn(20, 2, 2, dtype=torch.float64), torch.rand(20, 2, 2, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(20, 2, 3, dtype=torch.float64), -1)
    gamma[:, 1, 2] = 0
    gamma[:, 1] /= gamma[:, 1].sum(-1, keepdim=True)
    prior.svi_step(mu, var, gamma, n_total=20, rho=1.0)
    m, s, a, b, c = prior.mean_params()
    h = prior.hyper
    for i, k in enumerate(prior.K):
        ref = ng_batch_optimum(mu[:, i].double(), var[:, i].double(), gamma[:, i, :k].double(), 20,
                               h.m0, h.s0, h.a0, h.b0)
        for got, want in zip((m, s, a, b), ref):
            assert torch.allclose(got[i, :k], want, rtol=1e-9)
        assert torch.allclose(c[i, :k], h.c0 + gamma[:, i, :k].double().sum(0))


def test_svi_step_from_float32_batches_stays_accurate_at_paper_scale():
    """Batch statistics are summed in float32 (the training dtype), lam is combined in float64:
    at N = 50,000 the result still matches the float64 computation to 1e-5 relative."""
    torch.manual_seed(5)
    mu, var = torch.randn(64, 1, 8) * 3 + 5, torch.rand(64, 1, 8) * 0.01
    gamma = torch.softmax(torch.randn(64, 1, 4) * 3, -1)
    p32, p64 = FactorialMixturePrior([4], 8), FactorialMixturePrior([4], 8)
    p32.svi_step(mu, var, gamma, 50_000, 1.0)
    p64.svi_step(mu.double(), var.double(), gamma.double(), 50_000, 1.0)
    for got, want in zip(p32.mean_params(), p64.mean_params()):
        assert torch.allclose(got, want, rtol=1e-5)


def test_svi_step_is_a_convex_combination_in_natural_parameters():
    torch.manual_seed(2)
    prior = FactorialMixturePrior([2], 3)
    prior.init_from_encodings(torch.randn(40, 1, 3) * 3, torch.full((40, 1, 3), 0.1), 1000)
    lam_old, c_old = prior.lam.clone(), prior.c.clone()
    m_old = ng.mean_from_natural(lam_old)
    mu, var = torch.randn(10, 1, 3) + 5, torch.rand(10, 1, 3)
    gamma = torch.softmax(torch.randn(10, 1, 2), -1)
    lam_star = ng.natural_batch_optimum(*ng.sufficient_statistics(
        mu.transpose(0, 1).double(), var.transpose(0, 1).double(), gamma.transpose(0, 1).double(), 1000),
        0.0, 1.0, 0.01, 0.01)
    rho = 0.3
    prior.svi_step(mu, var, gamma, 1000, rho)
    assert torch.allclose(prior.lam, (1 - rho) * lam_old + rho * lam_star)
    assert torch.allclose(prior.c, (1 - rho) * c_old + rho * (1.0 + 1000 / 10 * gamma[:, 0].double().sum(0)))
    # ... which is not the convex combination of mean parameters:
    mean_mix = [(1 - rho) * o + rho * n for o, n in zip(m_old, ng.mean_from_natural(lam_star))]
    assert not torch.allclose(ng.mean_from_natural(prior.lam)[0], mean_mix[0], rtol=1e-3)
    assert prior.svi_steps.item() == 1


def test_robbins_monro_schedule():
    assert robbins_monro(0, 2000.0, 0.7) == pytest.approx(2000 ** -0.7)
    assert robbins_monro(100, 1.0, 1.0) == pytest.approx(1 / 101)


def test_conditional_samples_follow_the_clamped_component_student_t():
    prior = concentrated_prior([-5.0, 5.0], [4.0, 4.0], [0.5, 0.5])
    torch.manual_seed(3)
    z, k = prior.sample(4000, torch.full((4000, 1), 1))
    assert (k == 1).all()
    assert abs(z.mean() - 5.0) < 0.05 and abs(z.std() - 0.5) < 0.03
    z, k = prior.sample(4000)
    assert 0.45 < (k == 1).float().mean() < 0.55
    with pytest.raises(ValueError):
        prior.sample(2, torch.tensor([[2], [0]]))


def test_log_predictive_integrates_to_one():
    prior = concentrated_prior([-1.0, 2.0], [1.0, 4.0], [0.3, 0.7], conc=5.0)
    grid = torch.linspace(-40, 40, 80001)[:, None, None]
    density = prior.log_predictive(grid).exp()
    assert abs(torch.trapezoid(density, dx=80 / 80000).item() - 1.0) < 1e-3


def test_gradient_factors_move_by_gradient_and_others_by_svi():
    torch.manual_seed(4)
    prior = FactorialMixturePrior([2, 2], 1)
    prior.init_from_encodings(torch.randn(30, 2, 1), torch.full((30, 2, 1), 0.1), 30)
    before = [t.clone() for t in prior.mean_params()]
    prior.use_gradient_factors([0])
    for got, want in zip(prior.mean_params(), before):  # switching changes nothing by itself
        assert torch.allclose(got, want)
    mu, var = torch.randn(8, 2, 1), torch.rand(8, 2, 1)
    st = prior.local_step(mu, var, torch.tensor([[0, -1]] * 8))
    prior.cross_entropy(st, torch.tensor([[0, -1]] * 8)).sum().backward()
    assert prior.grad_m.grad[0].abs().sum() > 0 and prior.grad_m.grad[1].abs().sum() == 0
    lam_before = prior.lam.clone()
    prior.svi_step(mu, var, st.gamma, 30, 0.5)
    assert torch.equal(prior.lam[:, 0], lam_before[:, 0]), "gradient factor must not take the SVI step"
    assert not torch.allclose(prior.lam[:, 1], lam_before[:, 1]), "SVI factor must take it"


def test_stats_cache_follows_every_change_of_q_xi():
    torch.manual_seed(6)
    prior = FactorialMixturePrior([3], 2)
    prior.init_from_encodings(torch.randn(30, 1, 2), torch.full((30, 1, 2), 0.1), 30)
    first = prior.stats()
    assert prior.stats() is first  # unchanged q(xi): cached
    prior.svi_step(torch.randn(8, 1, 2), torch.rand(8, 1, 2), torch.softmax(torch.randn(8, 1, 3), -1), 30, 0.5)
    second = prior.stats()
    assert second is not first and not torch.equal(second.const, first.const)
    with torch.no_grad():
        prior.lam[2] += 1.0  # any in-place edit, e.g. by a user, invalidates it too
    third = prior.stats()
    assert not torch.equal(third.weights, second.weights)
    prior.load_state_dict(FactorialMixturePrior([3], 2).state_dict())
    assert torch.equal(prior.stats().const, FactorialMixturePrior([3], 2).stats().const)
    with torch.no_grad():
        prior.c[0, 1] = -1.0
    assert not prior.is_valid()


def test_samples_come_from_populated_components_unless_clamped():
    """A component q(pi) credits with no data has the hyperprior's Student-t, 2 a0 = 0.02 degrees of
    freedom: draws beyond 1e30. The sampler leaves it out of the free draws (E[pi] renormalised over
    the populated ones), keeps it when clamped, and keeps every component of an untrained prior."""
    prior = concentrated_prior([-5.0, 5.0, 0.0], [4.0, 4.0, 1.0], [0.5, 0.5, 0.0], conc=1e4)
    m, s, a, b = ng.mean_from_natural(prior.lam)
    h = prior.hyper
    m[0, 2], s[0, 2], a[0, 2], b[0, 2] = h.m0, h.s0, h.a0, h.b0  # component 2: the hyperprior, no data
    prior.lam.copy_(ng.natural_from_mean(m, s, a, b))
    prior.c[0, 2] = h.c0
    assert prior.populated().tolist() == [[True, True, False]]
    torch.manual_seed(5)
    z, k = prior.sample(20000)
    assert (k != 2).all() and z.abs().max() < 10
    assert 0.48 < (k == 1).float().mean() < 0.52  # E[pi] over the two populated, renormalised
    z, k = prior.sample(20000, populated_only=False)  # the predictive (10) as it is
    p2 = (h.c0 / prior.c.sum()).item()
    assert (k == 2).float().mean().item() == pytest.approx(p2, abs=4 * (p2 / 20000) ** 0.5)
    z, k = prior.sample(2000, torch.full((2000, 1), 2))
    assert (k == 2).all() and z.abs().max() > 1e6  # clamped: what was asked for, heavy tails included
    fresh = FactorialMixturePrior([3], 1)
    assert not fresh.populated().any()
    _, k = fresh.sample(3000)
    assert set(k.flatten().tolist()) == {0, 1, 2}


def test_uncached_stats_equal_the_cached_and_leave_no_cache():
    torch.manual_seed(6)
    prior = FactorialMixturePrior([3], 2)
    prior.init_from_encodings(torch.randn(30, 1, 2), torch.full((30, 1, 2), 0.1), 30)
    fresh = prior.stats(cache=False)
    assert getattr(prior, "_stats_key", None) is None
    for got, want in zip(fresh, prior.stats()):
        assert torch.equal(got, want)
