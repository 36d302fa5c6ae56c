"""Stage report: the paper's Figure 3 (test ELBO, reconstruction, KL[z], KL[r] against K) from the
sweep's results: reports/figure3.png (every data set) and reports/figure3_<dataset>.{png,csv,md};
and reports/figure3_pretraining.png, each shared pre-training's curve with its model's test bound.
For DVC's own views: reports/sweep/summary.json (metrics) and reports/sweep/pretraining_<dataset>.csv
(wide curves), drawn with the Figure 3 tables by `dvc plots show sweep/dvc.yaml`."""
import matplotlib
import pandas as pd
from _common import REPORTS, main

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend
import matplotlib.pyplot as plt  # noqa: E402

from fmvae.reporting.plots import save_figure  # noqa: E402
from fmvae.io import atomic_write_json, atomic_write_text  # noqa: E402
from fmvae.reporting.figure3 import figure3, pretraining_wide, sweep_summary  # noqa: E402


def pretraining_figure(summary: pd.DataFrame, curves: pd.DataFrame, path):
    """Per data set (rows): the training bound and the KL to N(0, I) of each seed's pre-training
    against its iteration; the legend gives the averaged model's test bound, which every K of that
    seed starts from (Figure 3's seed offset)."""
    datasets = sorted(summary["dataset"].unique())
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.4 * len(datasets)), squeeze=False,
                             constrained_layout=True)
    for (ax_elbo, ax_kl), dataset in zip(axes, datasets):
        for row in summary[summary["dataset"] == dataset].itertuples():
            c = curves[(curves["dataset"] == dataset) & (curves["seed"] == row.seed) & (curves["I"] == row.I)]
            label = f"seed {row.seed}, I = {row.I}: test bound {row.test_elbo:.2f} (KL {row.test_kl:.2f})"
            ax_elbo.plot(c["step"], c["elbo"], label=label, lw=1.2)
            ax_kl.plot(c["step"], c["kl"], label=f"seed {row.seed}, I = {row.I}", lw=1.2)
        ax_elbo.set_title(f"{dataset}: pre-training bound (training batches, N(0, I) prior)", fontsize=9)
        ax_kl.set_title(f"{dataset}: KL[q(z|x) || N(0, I)] (training batches)", fontsize=9)
        for ax in (ax_elbo, ax_kl):
            ax.set_xlabel("pre-training iteration")
            ax.set_ylabel("nats per image")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("The sweep's pre-trainings, shared by every K of a seed (legend: the averaged model's test bound)",
                 fontsize=9)
    return save_figure(fig, path)


def report(params):
    results = pd.read_csv(REPORTS / "sweep" / "results.csv")
    for path in figure3(results, REPORTS):
        print(f"report: {path}")
    atomic_write_json(REPORTS / "sweep" / "summary.json", sweep_summary(results))  # the sweep's dvc metrics
    summary, curves = (pd.read_csv(REPORTS / "sweep" / f) for f in ("pretraining.csv", "pretraining_curves.csv"))
    for dataset, wide in pretraining_wide(curves).items():  # dvc plots draws these (sweep/dvc.yaml)
        atomic_write_text(REPORTS / "sweep" / f"pretraining_{dataset}.csv", wide.to_csv(index=False))
    print(f"report: {pretraining_figure(summary, curves, REPORTS / 'figure3_pretraining.png')}")


if __name__ == "__main__":
    main(report)
