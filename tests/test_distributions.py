"""Normal-Gamma and Dirichlet formulas against Monte Carlo and independent closed forms."""
import math

import pytest
import torch
from scipy import stats
from torch.distributions import Dirichlet, Gamma, Normal

from fmvae.core.distributions import dirichlet, normal_gamma as ng
from fmvae.core.prior import expected_log_normal, kl_normal_gamma, ng_batch_optimum, student_t_params

N_MC = 400_000



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# (m, s, a, b) of q, then of the prior; includes the hyperprior's a0 = b0 = 0.01 and a small-a q.
CASES = [
    ((0.3, 2.0, 3.0, 1.5), (0.0, 1.0, 0.01, 0.01)),
    ((1.0, 0.5, 0.5, 0.2), (0.2, 2.0, 1.5, 0.7)),
    ((-2.0, 10.0, 0.05, 0.01), (0.0, 1.0, 0.01, 0.01)),
    ((0.1, 50.0, 40.0, 4.0), (1.0, 0.3, 2.0, 3.0)),
]


def sample_ng(m, s, a, b, n, gen):
    alpha = Gamma(torch.tensor(a), torch.tensor(b)).sample((n,))
    mu = m + torch.randn(n, generator=gen) / torch.sqrt(s * alpha)
    return mu, alpha


def log_ng(mu, alpha, m, s, a, b):
    return Gamma(torch.tensor(a), torch.tensor(b)).log_prob(alpha) + Normal(m, 1 / torch.sqrt(s * alpha)).log_prob(mu)


def assert_mc(estimate_samples, exact, z=5.0):
    mean = estimate_samples.mean()
    se = estimate_samples.std() / math.sqrt(len(estimate_samples))
    assert abs(mean - exact) < z * se + 1e-9, f"MC {mean:.5f} +- {se:.5f} vs formula {exact:.5f}"


@pytest.mark.parametrize("q,p", CASES)
def test_kl_normal_gamma_matches_monte_carlo(q, p):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mu, alpha = sample_ng(*q, N_MC, gen)
    keep = alpha > 0  # an underflowed draw has probability ~0 at these shapes
    log_ratio = (log_ng(mu, alpha, *q) - log_ng(mu, alpha, *p))[keep]
    exact = kl_normal_gamma(*(torch.tensor(v) for v in q), *(torch.tensor(v) for v in p))
    assert_mc(log_ratio, exact.item())


def test_kl_normal_gamma_rejects_the_misprinted_digamma_form():
    """The extracted text's '-(psi(a) - psi(a0))' variant differs from ours by a clear margin."""
    q, p = CASES[0]
    t = [torch.tensor(v) for v in q + p]
    m, s, a, b, m0, s0, a0, b0 = t
    ours = kl_normal_gamma(*t)
    misprint = ours + torch.lgamma(a) - torch.lgamma(a0) - (torch.special.digamma(a) - torch.special.digamma(a0))
    assert abs(ours - misprint) > 1.0
    assert ours > 0 and kl_normal_gamma(m, s, a, b, m, s, a, b).abs() < 1e-12


@pytest.mark.parametrize("q", [c[0] for c in CASES])
def test_expected_statistics_match_monte_carlo(q):
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    m, s, a, b = q
    mu, alpha = sample_ng(*q, N_MC, gen)
    tq = [torch.tensor(v) for v in q]
    assert_mc(alpha.log(), ng.expected_log_alpha(tq[2], tq[3]).item())
    if a > 0.5:  # heavy tails make the plain moments' MC error useless for tiny shapes
        assert_mc(alpha, ng.expected_alpha(tq[2], tq[3]).item())
        assert_mc(alpha * mu, ng.expected_alpha_mu(tq[0], tq[2], tq[3]).item())
        assert_mc(alpha * mu ** 2, ng.expected_alpha_mu2(*tq).item())


def test_expected_log_normal_matches_monte_carlo():
    """(6): E over z ~ N(mu, var) and (mu_k, alpha_k) ~ NG of log N(z; mu_k, 1/alpha_k), shapes (B,D),(K,D)->(B,K)."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    B, K, D = 3, 2, 2
    mu_q = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    var_q = torch.tensor([[0.3, 0.1], [1.0, 0.2], [0.05, 2.0]])
    m = torch.tensor([[0.1, 0.9], [-1.0, 2.0]])
    s = torch.tensor([[2.0, 0.5], [4.0, 1.0]])
    a = torch.tensor([[3.0, 0.8], [5.0, 2.0]])
    b = torch.tensor([[1.0, 0.4], [2.0, 3.0]])
    exact = expected_log_normal(mu_q, var_q, m, s, a, b)
    assert exact.shape == (B, K)
    n = 200_000
    for bi in range(B):
        for k in range(K):
            total = 0
            for d in range(D):
                z = mu_q[bi, d] + var_q[bi, d].sqrt() * torch.randn(n, generator=gen)
                mu_k, alpha_k = sample_ng(m[k, d].item(), s[k, d].item(), a[k, d].item(), b[k, d].item(), n, gen)
                total = total + Normal(mu_k, 1 / alpha_k.sqrt()).log_prob(z)
            assert_mc(total, exact[bi, k].item())


def conjugate_posterior(x, m0, s0, a0, b0):
    """Textbook Normal-Gamma posterior for points x (Murphy 2007, eqs. 85-89)."""
    n, xbar = len(x), x.mean()
    s = s0 + n
    m = (s0 * m0 + n * xbar) / s
    a = a0 + n / 2
    b = b0 + 0.5 * ((x - xbar) ** 2).sum() + s0 * n * (xbar - m0) ** 2 / (2 * s)
    return m, s, a, b


def test_batch_optimum_is_the_textbook_conjugate_posterior():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 3, generator=gen) * 2 + 1
    gamma = torch.zeros(40, 2)
    gamma[:25, 0] = 1
    gamma[25:, 1] = 1
    m, s, a, b = ng_batch_optimum(x, torch.zeros_like(x), gamma, 40, 0.5, 2.0, 0.01, 0.01)
    for k, rows in ((0, slice(0, 25)), (1, slice(25, 40))):
        for d in range(3):
            ref = conjugate_posterior(x[rows, d], 0.5, 2.0, 0.01, 0.01)
            for got, want in zip((m[k, d], s[k, d], a[k, d], b[k, d]), ref):
                assert torch.allclose(got, torch.as_tensor(want), rtol=1e-10)


def test_batch_optimum_is_exp_expected_log_joint_with_soft_uncertain_points():
    """log q*(mu, alpha) - [log p(mu, alpha) + sum_n w gamma_n E_q(z_n) log N(z_n; mu, 1/alpha)] is constant."""
    gen = torch.Generator().manual_seed(7)
    B, n_total = 6, 30.0
    mu_n = torch.randn(B, 1, generator=gen)
    var_n = torch.rand(B, 1, generator=gen) + 0.1
    gamma = torch.rand(B, 1, generator=gen)
    m, s, a, b = (t[0, 0].item() for t in ng_batch_optimum(mu_n, var_n, gamma, n_total, 0.3, 1.5, 0.01, 0.02))
    grid_mu = torch.linspace(-2, 2, 7).repeat_interleave(5)
    grid_alpha = torch.linspace(0.2, 3, 5).repeat(7)
    w = n_total / B
    expected_loglik = (0.5 * grid_alpha.log()[:, None] - 0.5 * math.log(2 * math.pi)
                       - 0.5 * grid_alpha[:, None] * ((mu_n[:, 0] - grid_mu[:, None]) ** 2 + var_n[:, 0]))
    target = log_ng(grid_mu, grid_alpha, 0.3, 1.5, 0.01, 0.02) + w * (gamma[:, 0] * expected_loglik).sum(-1)
    diff = log_ng(grid_mu, grid_alpha, m, s, a, b) - target
    assert diff.std() < 1e-9


def test_natural_parameters_round_trip():
    m, s, a, b = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.1]), torch.tensor([3.0, 0.02]), torch.tensor([1.5, 9.0])
    for got, want in zip(ng.mean_from_natural(ng.natural_from_mean(m, s, a, b)), (m, s, a, b)):
        assert torch.allclose(got, want)


@pytest.mark.parametrize("q", [(0.5, 2.0, 3.0, 1.5), (-1.0, 0.3, 1.2, 4.0)])
def test_student_t_is_the_predictive_of_normal_gamma(q):
    """(10): z ~ N(mu, 1/alpha) with (mu, alpha) ~ NG is Student-t(loc, scale, dof); KS test on 50k draws."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(9)
    mu, alpha = sample_ng(*q, 50_000, gen)
    z = mu + torch.randn(50_000, generator=gen) / alpha.sqrt()
    loc, scale, df = (t.item() for t in student_t_params(*(torch.tensor(v) for v in q)))
    assert stats.kstest(z.numpy(), stats.t(df=df, loc=loc, scale=scale).cdf).pvalue > 1e-3
    # and the squared-scale mistake is caught: scale^2 used as the scale fails the same test
    assert stats.kstest(z.numpy(), stats.t(df=df, loc=loc, scale=scale ** 2).cdf).pvalue < 1e-6


@pytest.mark.parametrize("c,c0", [([2.0, 0.5, 7.0], 1.0), ([30.0, 10.0], 0.3), ([0.2, 0.4, 0.1, 3.0], 1.0)])
def test_dirichlet_kl_and_expected_log_pi_match_monte_carlo(c, c0):
    torch.manual_seed(10)
    c = torch.tensor(c)
    pi = Dirichlet(c).sample((N_MC,)).clamp(min=1e-300)
    log_ratio = Dirichlet(c).log_prob(pi) - Dirichlet(torch.full_like(c, c0)).log_prob(pi)
    assert_mc(log_ratio, dirichlet.kl_dirichlet(c, c0).item())
    for k in range(len(c)):
        assert_mc(pi[:, k].log(), dirichlet.expected_log_pi(c)[k].item())


def test_dirichlet_mask_ignores_padded_components():
    c = torch.tensor([[2.0, 0.5, 7.0, 123.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert torch.allclose(dirichlet.kl_dirichlet(c, 1.0, mask), dirichlet.kl_dirichlet(c[:, :3], 1.0))
    elp = dirichlet.expected_log_pi(c, mask)
    assert torch.allclose(elp[:, :3], dirichlet.expected_log_pi(c[:, :3])) and elp[0, 3] == float("-inf")
