"""Report code on hand-made tables, and the property table on a labelled data set."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fmvae.core.evaluate import matched_accuracy
from fmvae.core.model import FMVAE
from fmvae.data import load_synthetic
from fmvae.reporting import figure3, judge


BUDGET = {"pretrain_iters": 2000, "prior_init_iters": 300, "joint_iters": 1500, "batch_size": 64}


def results_table():
    rows = []
    for K, elbos in ((2, [-100.0, -102.0, -101.0]), (8, [-95.0, -97.0, None])):
        for seed, e in enumerate(elbos):
            rows.append({"dataset": "binarized_mnist", "K": K, "I": 1, "seed": seed, "elbo": e,
                         "recon": None if e is None else e + 10, "kl_z": 8.0, "kl_r": 2.0,
                         "status": "failed" if e is None else "done", "train_points": 50000, "test_points": 10000,
                         **BUDGET})
    rows.append({"dataset": "omniglot", "K": 2, "I": 1, "seed": 0, "elbo": -120.0, "recon": -110.0, "kl_z": 9.0,
                 "kl_r": 1.0, "status": "done", "train_points": 4672, "test_points": 1168, **BUDGET})
    return pd.DataFrame(rows)


def test_aggregate_means_stds_and_counts_over_seeds_of_finished_trials():
    agg = figure3.aggregate(results_table())
    mnist = agg[agg["dataset"] == "binarized_mnist"].set_index("K")
    assert mnist.loc[2, "elbo_mean"] == pytest.approx(-101.0)
    assert mnist.loc[2, "elbo_std"] == pytest.approx(np.std([-100, -102, -101]))
    assert mnist.loc[2, "seeds"] == 3
    assert mnist.loc[8, "elbo_mean"] == pytest.approx(-96.0) and mnist.loc[8, "seeds"] == 2  # failed one left out
    assert mnist.loc[8, "recon_mean"] == pytest.approx(-86.0)
    assert len(agg[agg["dataset"] == "omniglot"]) == 1


def test_aggregate_band_is_the_min_max_over_seeds():
    mnist = figure3.aggregate(results_table()).set_index(["dataset", "K"]).loc["binarized_mnist"]
    assert (mnist.loc[2, "elbo_min"], mnist.loc[2, "elbo_max"]) == (-102.0, -100.0)


def test_paired_change_removes_each_seeds_offset():
    """Seeds 5 nats apart at every K, each gaining 1 nat from K = 2 to 8: the unpaired band is 5
    nats wide, the paired one 0, and the paired mean is the K effect."""
    rows = [{"dataset": "d", "I": 1, "K": K, "seed": seed, "elbo": -100.0 - 5 * seed + (K == 8), "recon": 0.0,
             "kl_z": 0.0, "kl_r": 0.0, "status": "done"} for K in (8, 2) for seed in (0, 1)]
    agg = figure3.aggregate(pd.DataFrame(rows)).set_index("K")
    assert agg.loc[8, "elbo_band"] == pytest.approx(5.0) and agg.loc[8, "elbo_change_band"] == pytest.approx(0.0)
    assert agg.loc[8, "elbo_change_mean"] == pytest.approx(1.0) and agg.loc[2, "elbo_change_mean"] == 0.0


def test_budget_line_names_every_phase_and_the_data_sizes():
    line = figure3.budget(results_table()[lambda d: d["dataset"] == "binarized_mnist"])
    assert line == ("pre-train 2,000 + prior init 300 + joint 1,500 iterations, batch 64; "
                    "50,000 training, 10,000 test images")


def test_figure3_writes_per_dataset_files_and_one_figure_with_both(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = []

    def keep(fig, path):  # the figure objects, to read their axes back
        figures.append(fig)
        path.write_bytes(b"png")
        return path
    monkeypatch.setattr(figure3, "_save_png", keep)
    written = figure3.figure3(results_table(), tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted([f"figure3_{d}.{e}" for d in ("binarized_mnist", "omniglot") for e in ("png", "csv", "md")]
                           + ["figure3.png"])
    md = (tmp_path / "figure3_binarized_mnist.md").read_text()
    assert "-101.000" in md and "-96.000" in md
    both = figures[-1]  # figure3.png: one row per data set, four terms and the paired ELBO each
    axes = both.get_axes()
    assert len(axes) == 10
    assert [a.get_title() for a in axes[:5]] == [f"binarized_mnist: {t.format(k=2)}" for t in figure3.TERM_TITLES.values()]
    assert axes[5].get_title().startswith("omniglot")
    paired = axes[4].get_lines()[0]  # seeds 0, 1 change by +5 from K = 2 to 8 (seed 2 failed at K = 8)
    assert list(paired.get_xdata()) == [2, 8] and list(paired.get_ydata()) == [0.0, 5.0]
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_ylabel() == "nats per image"
        assert [t.get_text() for t in ax.get_xticklabels()] in (["2", "8"], ["2"])
    elbo = axes[0]
    mean = elbo.get_lines()[0]
    assert list(mean.get_xdata()) == [2, 8] and list(mean.get_ydata()) == [-101.0, -96.0]
    assert any("paper: -85.77 at K = 512" in t.get_text() for t in elbo.get_legend().get_texts())
    title = both._suptitle.get_text()
    assert "pre-train 2,000 + prior init 300 + joint 1,500" in title and "4,672 training" in title
    for fig in figures:
        plt.close(fig)


def test_property_table_columns_and_paper_reference():
    t = judge.property_table(["Male", "Eyeglasses"], [0.9, 0.8], [0.7, 0.6], [0.95, 0.99], "celeba")
    assert list(t["paper_accuracy"]) == [0.97, 0.99] and list(t["paper_human_judgement"]) == [0.94, 0.85]
    t = judge.property_table(["shape"], [0.9], [0.7], [0.95], "synthetic")
    assert t["paper_accuracy"].isna().all()


def test_judge_learns_the_synthetic_properties():
    ds = load_synthetic(n_train=2000, n_test=500, seed=0)
    _, acc = judge.train_judge(ds, iters=300, seed=0)
    assert min(acc) > 0.9


def test_a_cached_judge_is_trained_once_per_data_steps_seed_threads_and_cpu_kernels(tmp_path, monkeypatch):
    """cached_judge reads back the judge train_judge gave (the same weights and accuracies) for the same
    data, steps, seed, thread count and CPU kernel set; any of them changed trains another; a corrupted file is trained
    again and replaced, never trusted."""
    monkeypatch.setenv("FMVAE_CACHE", str(tmp_path))
    trained = []
    real = judge.train_judge
    monkeypatch.setattr(judge, "train_judge", lambda *a, **k: trained.append(k["seed"]) or real(*a, **k))
    ds = load_synthetic(n_train=300, n_test=100, seed=0)
    first, acc = judge.cached_judge(ds, 20, seed=0)
    again, acc_again = judge.cached_judge(ds, 20, seed=0)
    assert trained == [0] and acc_again == acc
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    judge.cached_judge(ds, 20, seed=1)
    judge.cached_judge(ds, 21, seed=0)
    judge.cached_judge(load_synthetic(n_train=300, n_test=100, seed=1), 20, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        judge.cached_judge(ds, 20, seed=0)
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as other_host:  # the same CPU model name with another kernel set (AVX512 / AVX2)
        capability = torch.backends.cpu.get_cpu_capability()
        other_host.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability + "_other")
        judge.cached_judge(ds, 20, seed=0)
    assert trained == [0, 1, 0, 0, 0, 0]
    host = judge.provenance.host()
    (kept,) = [p for p in (tmp_path / "judges").glob("*.pt")
               if p.name.startswith(judge.provenance.fingerprint(judge.data_digest(ds), 20, 0, threads, host["cpu"],
                                                                  host["cpu_capability"], torch.__version__,
                                                                  judge.hashlib.sha256(Path(judge.__file__).read_bytes()).hexdigest()))]
    kept.write_bytes(kept.read_bytes()[:-10])
    judge.cached_judge(ds, 20, seed=0)
    assert trained == [0, 1, 0, 0, 0, 0, 0]
    judge.cached_judge(ds, 20, seed=0)
    assert len(trained) == 7


def test_matched_accuracy_is_permutation_invariant_and_counts_unmatched_as_errors():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert matched_accuracy(np.array([2, 2, 0, 0, 1, 1]), true) == 1.0
    assert matched_accuracy(np.array([0, 0, 0, 0, 1, 1]), true) == pytest.approx(4 / 6)
    assert matched_accuracy(np.array([0, 1, 2, 3, 4, 5]), true) == pytest.approx(3 / 6)


class AlwaysZero(torch.nn.Module):
    """A judge that reads every image as value 0 of every property."""

    def __init__(self, property_K):
        super().__init__()
        self.property_K = property_K

    def forward(self, x):
        return [torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), k).float() for k in self.property_K]


def test_judge_agreement_is_split_by_clamped_value():
    """A judge that always says 0 agrees with exactly the samples clamped to 0: per value [1, 0, 0],
    overall the share of samples clamped to 0 (about a third)."""
    ds = load_synthetic(n_train=50, n_test=20, seed=0)
    model = FMVAE("mlp", ds.x_shape, K=[3, 3], D=2)
    agreement, per_value = judge.judge_samples(model, AlwaysZero(ds.property_K), ds, n=600, seed=0)
    assert per_value == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert all(0.25 < a < 0.42 for a in agreement)
    table = judge.property_table(ds.property_names, [0.9, 0.8], agreement, [1.0, 1.0], ds.name, per_value)
    assert list(table["agreement_per_value"]) == ["0:1.00 1:0.00 2:0.00"] * 2


def test_semi_supervised_table_sets_ours_beside_kingma_et_al():
    t = judge.semi_supervised_table([{"name": "10% labels", "labels": 800, "unlabelled": 7200, "acc": 0.95,
                                       "agreement": 0.9, "judge_acc": 0.93, "elbo": -100.0}])
    assert list(t["model"]) == ["fmvae (10% labels)", "Kingma et al. 2014, M2", "Kingma et al. 2014, M1+M2"]
    assert list(t["accuracy_argmax_q_r"]) == [0.95, 0.880, 0.967]
    assert list(t["unlabelled_train_images"]) == [7200, 50000, 50000]


def test_sweep_summary_names_the_best_k_its_paired_gain_and_the_trial_counts():
    """binarized_mnist: K = 8 has the best mean (-96 over the two finished seeds), its paired gain over
    each seed's K = 2 trial is +5 for both seeds; one trial failed."""
    summary = figure3.sweep_summary(results_table())
    mnist = summary["binarized_mnist"]
    assert (mnist["best_K"], mnist["best_elbo"], mnist["seeds"]) == (8, -96.0, 2)
    assert (mnist["best_gain"], mnist["best_gain_min"], mnist["best_gain_max"]) == (5.0, 5.0, 5.0)
    assert (mnist["trials_done"], mnist["trials_failed"]) == (5, 1)
    assert summary["omniglot"]["best_K"] == 2 and summary["omniglot"]["best_gain"] == 0.0


def test_pretraining_curves_widen_to_one_column_per_seed():
    long = pd.DataFrame({"dataset": "d", "I": 1, "seed": [0, 0, 1, 1], "step": [100, 200, 100, 200],
                         "elbo": [-3.0, -2.0, -5.0, -4.0], "kl": [1.0, 2.0, 3.0, 4.0]})
    wide = figure3.pretraining_wide(long)["d"]
    assert list(wide.columns) == ["step", "elbo_seed0", "elbo_seed1", "kl_seed0", "kl_seed1"]
    assert wide["elbo_seed1"].tolist() == [-5.0, -4.0] and wide["kl_seed0"].tolist() == [1.0, 2.0]


def test_dvc_draws_figure3_and_reads_the_sweep_s_metrics_from_the_committed_reports(tmp_path):
    """`dvc plots show --json` in the repository finds the nine K of each data set in Figure 3's ELBO
    plot, and `dvc metrics show --json` the sweep's summary, whose best K is the Figure 3 table's."""
    import json

    from helpers import run
    root = Path(__file__).resolve().parents[1]
    plots = json.loads(run(["dvc", "plots", "show", "--json", "-o", str(tmp_path)], root).stdout)  # the venv's dvc
    values = plots["data"]["Figure 3, test ELBO (11) against K"][0]["content"]["data"]["values"]
    for dataset in ("binarized_mnist", "omniglot"):
        ks = sorted(int(v["K"]) for v in values if v["filename"] == f"figure3_{dataset}.csv")
        assert ks == [2, 4, 8, 16, 32, 64, 128, 256, 512], dataset
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    summary = next(d["data"]["reports/sweep/summary.json"]["data"] for d in metrics.values()
                   if "reports/sweep/summary.json" in d.get("data", {}))
    for dataset in ("binarized_mnist", "omniglot"):
        table = pd.read_csv(root / f"reports/figure3_{dataset}.csv")
        assert summary[dataset]["best_K"] == int(table.loc[table["elbo_mean"].idxmax(), "K"])
