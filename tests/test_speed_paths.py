"""The benchmark runs (numbers not asserted), and the optimised paths agree with the reference ones."""
import copy
import json

import torch

from fmvae.core.evaluate import evaluate_bound, supervised_accuracy
from fmvae.core.loop import make_optimizer
from fmvae.core.model import FMVAE
from fmvae.core.phases import joint_step
from fmvae.data import factorial_vectors, semi_supervised_labels
from fmvae.params import TrainConfig
from fmvae.tools import bench
from test_end_to_end import train


def test_benchmark_runs_and_writes_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--mnist-K", "2", "64", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["mnist28", "mnist28", "celeba64"]
    for r in rows:
        for key in ("K", "device", "plain_it_s", "joint_it_s", "ratio", "peak_memory_mb"):
            assert key in r
        assert r["plain_it_s"] > 0 and r["joint_it_s"] > 0
        assert abs(r["ratio"] - r["plain_it_s"] / r["joint_it_s"]) < 1e-9
    assert rows[1]["eval_images_s"] > 0 and rows[1]["iwae_images_s"] > 0


def one_joint_step(amp: bool, order: str = "fused"):
    torch.manual_seed(0)
    model = FMVAE("conv28", (1, 28, 28), K=[4, 4], D=8)
    x = (torch.rand(32, 1, 28, 28) < 0.2).float()
    with torch.no_grad():
        mu, logvar = model.encode(x)
    model.prior.init_from_encodings(mu, logvar.exp(), 1000, torch.Generator().manual_seed(0))
    cfg = TrainConfig(iters=1, lr=1e-3, bf16=amp, order=order, tau0=1.0)
    params = model.network_parameters()
    step = joint_step(model, make_optimizer(params, cfg.lr), cfg, 1000, params)
    torch.manual_seed(1)
    terms = step(0, x, None)
    return model, {k: v.item() for k, v in terms.items()}


def test_bf16_autocast_step_matches_the_float32_step():
    """Stated tolerances: 2% relative on the bound's terms; for the updated q(xi), 1e-3 absolute on
    m, 2% relative on b (it carries the encoders' bf16 rounding), 1e-5 relative on s, a, c. The
    prior's math runs in float32 inside autocast, so only the networks see bf16."""
    ref_model, ref = one_joint_step(amp=False)
    model, got = one_joint_step(amp=True)
    for k in ("bound", "recon", "kl_z", "kl_r"):
        assert abs(got[k] - ref[k]) <= 0.02 * abs(ref[k]) + 1e-3, (k, got[k], ref[k])
    (m, s, a, b, c), (m0, s0, a0, b0, c0) = model.prior.mean_params(), ref_model.prior.mean_params()
    assert torch.allclose(m, m0, rtol=0, atol=1e-3) and torch.allclose(b, b0, rtol=2e-2)
    for x, y in ((s, s0), (a, a0), (c, c0)):
        assert torch.allclose(x, y, rtol=1e-5)
    assert model.prior.lam.dtype == torch.float64


def test_the_three_orders_train_equally_well():
    x, y = factorial_vectors(3000, seed=0)
    x_test, y_test = factorial_vectors(1000, seed=1)
    labels = semi_supervised_labels(y, 0.1, 2, seed=0)
    results = {}
    import test_end_to_end as e2e
    for order in ("reuse", "fused", "paper"):
        common = copy.deepcopy(e2e.COMMON)
        e2e.COMMON["order"] = order
        try:
            model, _ = train(0, x, labels, delta=100.0, pre=1000, joint=3000, kl_z_weight=1.0)
        finally:
            e2e.COMMON.clear()
            e2e.COMMON.update(common)
        r = evaluate_bound(model, x_test, lambda t: t)
        results[order] = (r["elbo"], [supervised_accuracy(r["assignments"][:, i], y_test[:, i]) for i in range(2)])
    for order, (elbo, acc) in results.items():
        assert min(acc) >= 0.95, (order, acc)
    assert max(r[0] for r in results.values()) - min(r[0] for r in results.values()) < 1.0, results


def test_the_pack_benchmark_runs_and_writes_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--pack", "1", "2", "--profile", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["pack"], r["alone"]) for r in rows] == [(1, True), (1, False), (2, False)]
    for r in rows:
        assert r["trial_it_s"] > 0 and abs(r["trial_it_s"] * r["step_s"] - r["pack"]) < 1e-9
    assert rows[0]["vs_alone"] == 1.0
    best = max(rows[1:], key=lambda r: r["trial_it_s"])["pack"]  # profiled: the best pack's step
    profile = (tmp_path / "bench.profile.txt").read_text()
    assert profile.startswith(f"pack {best} ") and "Self CPU" in profile and "aten::" in profile


def test_the_lever_benchmark_times_each_lever_beside_the_step_without(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--levers", "--tiny", "--no-celeba", "--out", str(out)])
    assert [r["lever"] for r in rows] == list(bench.LEVERS)
    assert rows[0]["time_ratio_to_off"] == 1.0 and all(r["joint_it_s"] > 0 for r in rows)
    assert json.loads(out.read_text()) == rows
