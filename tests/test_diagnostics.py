"""fmvae.reporting.diagnostics on cases whose answer is known: a property held in block 0 only, a decoder stub that
reads one block, a judge that reads one coordinate, a prior fitted to known clusters."""
import pytest
import torch

from fmvae.core.prior import FactorialMixturePrior
from fmvae.reporting import diagnostics as dg

N = 2000


def two_blocks(seed=0):
    """Block 0 holds the binary property (its first coordinate at +-1.5), block 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (N,), generator=g)
    mu = torch.randn(N, 2, 2, generator=g) * 0.5
    mu[:, 0, 0] += 3.0 * y - 1.5
    return mu, y


def reads(block):
    """A decoder stub whose image is block `block` of z (its two numbers)."""
    return lambda z: z[:, block]


def judge(x):
    """Logits of value 1 growing with the image's first number."""
    return torch.stack((-4 * x[:, 0], 4 * x[:, 0]), -1)


def test_the_probe_finds_the_property_in_its_block_only():
    acc = dg.block_probe(*two_blocks())
    assert acc[0] > 0.97 and 0.45 < acc[1] < 0.55, acc


@pytest.mark.parametrize("block", [0, 1])
def test_the_decoder_s_read_falls_in_the_block_it_reads(block):
    mu, y = two_blocks()
    share = dg.decoder_read(mu, y, reads(block), judge)
    assert share[block] == pytest.approx(1.0) and share[1 - block] == 0.0


def test_a_transplanted_block_carries_the_property_only_where_the_decoder_reads_it():
    mu, y = two_blocks()
    carried = dg.block_transplant(mu, y, reads(0), judge)
    assert carried[0] > 0.97 and carried[1] < 0.03, carried  # the judge follows the donor's block 0 only
    assert dg.block_transplant(mu, y, reads(1), judge)[0] < 0.6  # a decoder blind to block 0: chance


def test_moving_the_named_block_between_component_means_changes_what_is_drawn():
    mu, y = two_blocks()
    means = torch.stack([mu[y == c, 0].mean(0) for c in (0, 1)])
    assert dg.component_move(mu, y, means, 0, reads(0), judge) > 0.97
    assert dg.component_move(mu, y, means, 0, reads(1), judge) < 0.6


def fitted_prior(separation=3.0, std=0.5, seed=0):
    """A one-factor prior (K = 2, D = 2) set to the conjugate posterior of two known Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (N,), generator=g)
    mu = torch.randn(N, 1, 2, generator=g) * std
    mu[:, 0, 0] += separation * y
    prior = FactorialMixturePrior([2], 2)
    prior.init_from_assignments(mu, torch.full_like(mu, 1e-4), y[:, None], N)
    return prior, mu, y


def test_a_prior_fitted_to_the_classes_matches_their_spread_and_separation():
    prior, mu, y = fitted_prior()
    fit = dg.prior_fit(type("M", (), {"prior": prior})(), mu, y, 0)
    assert fit["predictive_rms_scale"] == pytest.approx(fit["class_rms_std"], rel=0.05)
    assert fit["prior_separation_min"] == pytest.approx(fit["class_separation_min"], rel=0.05)
    assert fit["class_separation_min"] == pytest.approx(3.0 / 0.5, rel=0.1)  # 3 apart on one axis, std 0.5


class IdentityModel:
    """Encoder and decoder the identity on z (the image is z), with a given prior: a round trip then
    recovers the clamped component exactly when the prior keeps the components apart."""

    def __init__(self, prior):
        self.prior, self.I, self.K = prior, prior.I, prior.K

    def decode_mean(self, z):
        return z

    def encode(self, x):
        mu = x.reshape(len(x), self.I, -1)
        return mu, torch.full_like(mu, -9.0)


@pytest.mark.parametrize("separation, low, high", [(6.0, 0.98, 1.0), (0.0, 0.4, 0.6)])
def test_the_round_trip_recovers_the_clamped_component_only_from_separated_components(separation, low, high):
    prior, _, _ = fitted_prior(separation)
    assert low <= dg.round_trip(IdentityModel(prior), 0, n=2000) <= high


def test_factor_usage_counts_shares_and_mutual_information():
    y = torch.arange(1000) % 10
    style = torch.arange(1000) // 100  # ten components of 10% each, independent of y
    usage = dg.factor_usage(torch.stack((y, style, torch.zeros_like(y)), 1), y, [10, 10, 10])
    assert usage[0]["nmi_with_property"] == pytest.approx(1.0) and usage[0]["components_over_2pct"] == 10
    assert usage[1]["nmi_with_property"] == pytest.approx(0.0, abs=1e-9) and usage[1]["components_over_2pct"] == 10
    assert usage[2]["components_over_2pct"] == 1 and usage[2]["shares"][0] == 1.0
