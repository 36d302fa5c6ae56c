"""Stage plot: sample grid, cluster statistics and training curves -> reports/figures/. The figures are
drawn by fmvae.reporting.plots, which no training stage imports: a new figure retrains nothing."""
import matplotlib
import torch
from _common import CURVES, DATA, MODELS, REPORTS, main

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend

from fmvae.core.pipeline import load_trained  # noqa: E402
from fmvae.reporting.plots import model_figures  # noqa: E402


def plot(params):
    ds, model = load_trained(params, DATA, MODELS / "joint.pt")
    torch.manual_seed(params.seed)
    written = model_figures(model, ds, params, REPORTS / "figures",
                            [CURVES / f"{p}.csv" for p in ("pretrain", "prior_init", "joint")])
    print("plot: " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main(plot)
