"""Stage report: Figure 3 (test ELBO, reconstruction, KL[z], KL[r] against log2 K) from the sweep's results."""
import matplotlib
import pandas as pd
from _common import REPORTS, main

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend

from fmvae.report import figure3


def report(params):
    results = pd.read_csv(REPORTS / "sweep" / "results.csv")
    for dataset in sorted(results["dataset"].unique()):
        print(f"report: {figure3(results, dataset, REPORTS)}")


if __name__ == "__main__":
    main(report)
