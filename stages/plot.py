"""Stage plot: sample grid, cluster statistics and training curves -> reports/figures/."""
import matplotlib
from _common import CURVES, DATA, MODELS, REPORTS, main

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend

from fmvae.pipeline import plot_stage

if __name__ == "__main__":
    main(lambda params: plot_stage(params, DATA, MODELS / "joint.pt", REPORTS / "figures",
                                   [CURVES / f"{p}.csv" for p in ("pretrain", "prior_init", "joint")]))
