"""The joint step's orders, the compiled step, float64 predictive and IWAE, and the prepared GPU check (on CPU)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fmvae.core.distributions import normal_gamma as ng
from fmvae.core.loop import TrainData, make_optimizer
from fmvae.core.model import FMVAE
from fmvae.core.phases import init_prior, joint_step, joint_train, pretrain
from fmvae.core.prior import FactorialMixturePrior
from fmvae.data import factorial_vectors, semi_supervised_labels
from fmvae.params import TrainConfig
from fmvae.reporting import figure3
from fmvae.tools.gpu_check import cli as gpu_check

identity = lambda t: t


# ------------------------------------------------------------------ joint step orders
def encoding_gradient(order: str):
    """d KL[z] / d mu for one joint step from a fixed state; the batch's last point is an outlier.

    n_total / |B| = 1000 / 32 and rho_0 = 1 (tau0 = 1): the SVI step gives each batch point the
    weight of 31 data points, as early joint training does in the presets."""
    torch.manual_seed(0)
    x, _ = factorial_vectors(32, seed=3)
    x[-1] = 6.0 * x[-1]
    model = FMVAE("mlp", (20,), K=[3], D=2)
    with torch.no_grad():
        model.decoder.body[-1].weight.zero_()  # recon no longer depends on z: d loss / d mu is KL[z]'s alone
        mu, logvar = model.encode(x)
    model.prior.init_from_encodings(mu[:-1], logvar[:-1].exp(), 1000, torch.Generator().manual_seed(0))
    captured = {}
    encode = model.encode

    def recording_encode(inp):
        m, lv = encode(inp)
        if m.requires_grad and "mu" not in captured:
            m.retain_grad()
            captured["mu"] = m
        return m, lv

    model.encode = recording_encode
    cfg = TrainConfig(iters=1, lr=1e-3, order=order, tau0=1.0)
    params = model.network_parameters()
    step = joint_step(model, make_optimizer(params, cfg.lr), cfg, 1000, params)
    torch.manual_seed(1)
    step(0, x, None)
    return captured["mu"].grad


def test_default_order_takes_exactly_the_paper_s_adam_step_and_fused_does_not():
    """The default ("reuse") scores the batch against q_t, as the paper does: the gradient with
    respect to every encoding equals the paper order's exactly. "fused" scores it against a q(xi)
    that already holds the batch, which moves the outlier's gradient by far more than rounding."""
    assert TrainConfig(iters=1).order == "reuse"
    paper, reuse, fused = (encoding_gradient(o) for o in ("paper", "reuse", "fused"))
    assert torch.equal(reuse, paper)
    outlier_change = (fused[-1] - paper[-1]).norm() / paper[-1].norm()
    assert outlier_change > 0.05, outlier_change


# ------------------------------------------------------------------ compiled step
@pytest.fixture
def inductor_eager_rng(monkeypatch):
    """Compiled code draws its own random numbers unless told to use eager's: only then can a
    compiled run be compared number for number with an eager one. Recompiling after warm-up is an error."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_three_phases(compile: bool):
    x, y = factorial_vectors(600, seed=0)
    labels = semi_supervised_labels(y, 0.3, 2, seed=0)
    torch.manual_seed(0)
    model = FMVAE("mlp", (20,), K=[3, 3], D=2)
    common = dict(batch_size=32, lr=3e-3, log_every=5, progress=False, tau0=1.0, compile=compile)
    h_pre = pretrain(model, TrainData(x, identity), TrainConfig(iters=12, kl_anneal_iters=8, **common))
    init_prior(model, TrainData(x, identity, labels), TrainConfig(iters=5, init_points=300, restarts=2, **common))
    h_joint = joint_train(model, TrainData(x, identity, labels),
                          TrainConfig(iters=12, delta=10.0, kl_z_weight=5.0, kl_z_anneal_iters=8, **common),
                          gradient_factors=[0, 1])
    return model, h_pre, h_joint


def test_compiled_step_equals_the_eager_step(inductor_eager_rng):
    """Stated tolerances: 1e-4 relative on every logged term, 1e-4 absolute on every parameter after
    12 + 5 + 12 iterations (annealed KL weights, labels, gradient factors: the paths a weight or a
    shape could change on). Inductor reorders float32 sums, so bitwise equality is not expected;
    no recompilation happens after the first call of each phase (error_on_recompile)."""
    eager, pre_e, joint_e = train_three_phases(compile=False)
    compiled, pre_c, joint_c = train_three_phases(compile=True)
    for rows_e, rows_c in ((pre_e, pre_c), (joint_e, joint_c)):
        assert [r["step"] for r in rows_e] == [r["step"] for r in rows_c]
        for re, rc in zip(rows_e, rows_c):
            for k in re:
                assert rc[k] == pytest.approx(re[k], rel=1e-4, abs=1e-5), (k, re[k], rc[k])
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4), name


# ------------------------------------------------------------------ float64 predictive, IWAE
def test_log_predictive_is_exact_at_large_a():
    """At a ~ 12,500 (K = 2 on 50,000 points) float32 loses ~0.1 nats per point; float64 agrees with
    scipy's Student-t mixture to 1e-8."""
    prior = FactorialMixturePrior([2], 64)
    g = torch.Generator().manual_seed(0)
    m = torch.randn(1, 2, 64, generator=g, dtype=torch.float64)
    s = torch.full((1, 2, 64), 25000.0, dtype=torch.float64)
    a = 12500.0 + 100 * torch.rand(1, 2, 64, generator=g, dtype=torch.float64)
    b = a * (0.5 + torch.rand(1, 2, 64, generator=g, dtype=torch.float64))
    prior.lam.copy_(ng.natural_from_mean(m, s, a, b))
    prior.c.copy_(torch.tensor([[30000.0, 20000.0]], dtype=torch.float64))
    z = (m[0, 0] + torch.randn(5, 64, generator=g, dtype=torch.float64)).float()
    got = prior.log_predictive(z.view(5, 1, 64))
    assert got.dtype == torch.float64
    loc, scale, df = (t.numpy()[0] for t in ng.student_t_params(m, s, a, b))
    log_t = np.stack([stats.t.logpdf(z.double().numpy(), df[k], loc[k], scale[k]).sum(-1) for k in range(2)], -1)
    want = np.logaddexp(log_t[:, 0] + np.log(0.6), log_t[:, 1] + np.log(0.4))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-8)


def test_iwae_converges_to_log_px_by_quadrature():
    """A 1-D latent: log p(x) = log int p(x|z) p(z|X) dz on a fine grid. The predictive integrates to
    1 there, and the IWAE estimate with 200,000 samples from a broad q(z|x) is within 0.01 nats of
    log p(x) (its spread over seeds at this size is about 0.003)."""
    torch.manual_seed(0)
    model = FMVAE("mlp", (3,), K=[2], D=1)
    prior = model.prior
    m = torch.tensor([[[-1.5], [2.0]]], dtype=torch.float64)
    s, a, b = (torch.full((1, 2, 1), v, dtype=torch.float64) for v in (50.0, 20.0, 10.0))
    prior.lam.copy_(ng.natural_from_mean(m, s, a, b))
    prior.c.copy_(torch.tensor([[40.0, 60.0]], dtype=torch.float64))
    model.encode = lambda x: (torch.zeros(x.shape[0], 1, 1), torch.full((x.shape[0], 1, 1), math.log(6.0)))
    x = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.0, -1.0]])
    grid = torch.linspace(-25, 25, 200001, dtype=torch.float64)
    log_pz = prior.log_predictive(grid.view(-1, 1, 1))
    with torch.no_grad():
        log_px_z = torch.stack([model.decoder.log_prob(xi.expand(len(grid), 3), grid.float().view(-1, 1)).double()
                                for xi in x])
    log_dz = math.log(grid[1] - grid[0])
    assert abs(torch.logsumexp(log_pz, 0).item() + log_dz) < 1e-9
    quad = torch.logsumexp(log_px_z + log_pz, -1) + log_dz
    torch.manual_seed(0)
    with torch.no_grad():
        iwae = model.importance_weighted(x, samples=200000, chunk=20000)
    assert torch.all((iwae - quad).abs() < 0.01), (iwae, quad)


# ------------------------------------------------------------------ the prepared GPU check, on CPU
def test_gpu_check_tiny_runs_the_whole_check_on_cpu(mirror, tmp_path):
    out = tmp_path / "gpu"
    metrics = gpu_check.main(["--data", str(mirror / "binarized_mnist"), "--out", str(out), "--tiny"])
    for name in ("environment.json", "bench.json", "metrics.json", "summary.md", "samples_grid.png", "clusters.png",
                 "training_curves.png", "curve_pretrain.csv", "curve_prior_init.csv", "curve_joint.csv"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schedule"] == {"pretrain": 30, "prior_init": 10, "joint": 30} and saved["schedule_scale"] < 1
    for key in ("elbo", "recon", "kl_z", "kl_r", "iwae"):
        assert math.isfinite(saved[key])
    assert saved["elbo"] == pytest.approx(saved["recon"] - saved["kl_z"] - saved["kl_r"], abs=1e-4)
    assert saved["iwae"] >= saved["elbo_on_iwae_points"] - 0.5  # IWAE is the tighter bound (Monte Carlo slack)
    assert all(p["iters"] > 0 and p["it_s"] > 0 for p in saved["phases"].values())
    assert metrics["components_used"] == saved["components_used"]
    summary = (out / "summary.md").read_text()
    assert "scaled down" in summary and "Test ELBO" in summary and "-85.77" in summary
    rows = json.loads((out / "bench.json").read_text())
    assert {r["mode"] for r in rows} == {"eager"} and all(r["joint_it_s"] > 0 for r in rows)


def test_gpu_check_figure3_trains_each_data_set_s_k_grid_as_one_pack_on_cpu(mirror, tmp_path):
    """--figure3 --tiny: MNIST, K = 2 and 4 packed, 20 + 10 + 20 iterations; each member evaluated
    alone into results.csv (the sweep's columns) and the Figure 3 files."""
    out = tmp_path / "fig3"
    gpu_check.main(["--figure3", "--tiny", "--data", str(mirror / "binarized_mnist"), "--figure3-K", "2", "4",
                    "--out", str(out)])
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.columns) == figure3.RESULT_COLUMNS
    assert list(rows["K"]) == [2, 4] and (rows["status"] == "done").all() and (rows["joint_iters"] == 20).all()
    assert ((rows["elbo"] - (rows["recon"] - rows["kl_z"] - rows["kl_r"])).abs() < 1e-3).all()
    assert list(rows["components_used"].astype(str)) == ["2", "4"]  # each member: every component used
    for name in ("figure3.png", "figure3_binarized_mnist.png", "figure3_binarized_mnist.md"):
        assert (out / name).stat().st_size > 0
    assert not (out / "probe").exists()


def test_gpu_check_refuses_a_missing_data_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        gpu_check.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--tiny"])
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_gpu_check_celeba_subset_and_tiny_run_on_cpu(mirror, tmp_path):
    """--make-celeba-subset writes a complete CelebA folder of the first training and test images of
    the mirror (its attribute file lists exactly them), and --celeba --tiny runs the CelebA check's
    whole code path on it: bound, per-property accuracy, balanced accuracy, majority baseline, the
    judge's agreement, figures and summary."""
    from fmvae import data
    info = gpu_check.main(["--make-celeba-subset", str(mirror / "celeba"), str(tmp_path / "subset"),
                           "--subset-train", "100", "--subset-test", "50"])
    assert (info["train"], info["test"]) == (100, 50) and info["train_range"][0] == "000001.jpg"
    full = data.load("celeba", tmp_path / "subset")  # complete: no data.partial needed
    assert len(full.x_train) == 100 and len(full.x_test) == 50
    out = tmp_path / "gpu"
    metrics = gpu_check.main(["--celeba", str(tmp_path / "subset"), "--out", str(out), "--tiny"])
    assert metrics["elbo"] == pytest.approx(metrics["recon"] - metrics["kl_z"] - metrics["kl_r"], abs=1e-3)
    for name, p in metrics["properties"].items():
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["balanced_accuracy"] <= 1 and 0.5 <= p["majority_baseline"] <= 1
        assert 0 <= p["judged_agreement"] <= 1 and p["paper_accuracy"] > 0.9, name
    assert metrics["data"]["listed"] == 150 and metrics["data"]["absent"] == 0
    for name in ("summary.md", "metrics.json", "samples_male_smiling.png", "samples_factors_3_4.png",
                 "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| Eyeglasses |" in (out / "summary.md").read_text()
