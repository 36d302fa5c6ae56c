"""Stage report: the paper's Figure 3 (test ELBO, reconstruction, KL[z], KL[r] against K) from the
sweep's results: reports/figure3.png (every data set) and reports/figure3_<dataset>.{png,csv,md}."""
import matplotlib
import pandas as pd
from _common import REPORTS, main

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend

from fmvae.report import figure3


def report(params):
    for path in figure3(pd.read_csv(REPORTS / "sweep" / "results.csv"), REPORTS):
        print(f"report: {path}")


if __name__ == "__main__":
    main(report)
