"""Report code on hand-made tables, and the property table on a labelled data set."""
import numpy as np
import pandas as pd
import pytest

from fmvae import report
from fmvae.data import load_synthetic
from fmvae.evaluate import matched_accuracy


def results_table():
    rows = []
    for K, elbos in ((2, [-100.0, -102.0, -101.0]), (8, [-95.0, -97.0, None])):
        for seed, e in enumerate(elbos):
            rows.append({"dataset": "binarized_mnist", "K": K, "I": 1, "seed": seed, "elbo": e,
                         "recon": None if e is None else e + 10, "kl_z": 8.0, "kl_r": 2.0,
                         "status": "failed" if e is None else "done"})
    rows.append({"dataset": "omniglot", "K": 2, "I": 1, "seed": 0, "elbo": -120.0, "recon": -110.0, "kl_z": 9.0,
                 "kl_r": 1.0, "status": "done"})
    return pd.DataFrame(rows)


def test_aggregate_means_stds_and_counts_over_seeds_of_finished_trials():
    agg = report.aggregate(results_table())
    mnist = agg[agg["dataset"] == "binarized_mnist"].set_index("K")
    assert mnist.loc[2, "elbo_mean"] == pytest.approx(-101.0)
    assert mnist.loc[2, "elbo_std"] == pytest.approx(np.std([-100, -102, -101]))
    assert mnist.loc[2, "seeds"] == 3
    assert mnist.loc[8, "elbo_mean"] == pytest.approx(-96.0) and mnist.loc[8, "seeds"] == 2  # failed one left out
    assert mnist.loc[8, "recon_mean"] == pytest.approx(-86.0)
    assert len(agg[agg["dataset"] == "omniglot"]) == 1


def test_figure3_writes_png_and_tables(tmp_path):
    path = report.figure3(results_table(), "binarized_mnist", tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "figure3_binarized_mnist.md").read_text()
    assert "-101.000" in md and "-96.000" in md


def test_property_table_columns_and_paper_reference():
    t = report.property_table(["Male", "Eyeglasses"], [0.9, 0.8], [0.7, 0.6], [0.95, 0.99], "celeba")
    assert list(t["paper_accuracy"]) == [0.97, 0.99] and list(t["paper_human_judgement"]) == [0.94, 0.85]
    t = report.property_table(["shape"], [0.9], [0.7], [0.95], "synthetic")
    assert t["paper_accuracy"].isna().all()


def test_judge_learns_the_synthetic_properties():
    ds = load_synthetic(n_train=2000, n_test=500, seed=0)
    _, acc = report.train_judge(ds, iters=300, seed=0)
    assert min(acc) > 0.9


def test_matched_accuracy_is_permutation_invariant_and_counts_unmatched_as_errors():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert matched_accuracy(np.array([2, 2, 0, 0, 1, 1]), true) == 1.0
    assert matched_accuracy(np.array([0, 0, 0, 0, 1, 1]), true) == pytest.approx(4 / 6)
    assert matched_accuracy(np.array([0, 1, 2, 3, 4, 5]), true) == pytest.approx(3 / 6)
