"""The semi-supervised MNIST table from named DVC experiments -> reports/mnist_table.{md,csv}.

    python stages/preset.py mnist_semi                                          # 10% of the labels
    python stages/preset.py mnist_semi -n mnist_semi_1pct -S semi.fraction=0.01  # 1%
    python stages/semi_table.py mnist_semi mnist_semi_1pct

Each experiment is the whole pipeline (`dvc exp run`), recorded in its own commit with its
dvc.lock. This script reads those commits, puts their accuracy of argmax q(r_digit|x) and the
judge's agreement with clamped samples beside Kingma et al. (2014), and copies each
experiment's figures, metrics and dvc.lock to reports/mnist_semi/<name>/, so that the table and
what produced it are committed together.
"""
import argparse
import io
import json

import dvc.api
import torch
from _common import REPORTS, ROOT

from fmvae.data import semi_supervised_labels
from fmvae.io import atomic_write_bytes
from fmvae.reporting import runs
from fmvae.reporting.experiments import full_rev, run_params, show
from fmvae.reporting.judge import semi_supervised_table
from fmvae.reporting.tables import write_table

COPIED = ["dvc.lock", "params.yaml", "reports/metrics.json", "reports/properties.json", "reports/provenance.json", "reports/mnist_table.md",
          "reports/figures/samples_grid.png", "reports/figures/clusters.png", "reports/figures/training_curves.png"]


def run_row(name: str) -> dict:
    rev = full_rev(name)
    params = run_params(rev)
    if params.data.name != "mnist":
        raise SystemExit(f"error: experiment {name!r} trained on {params.data.name!r}, not mnist")
    props, metrics = json.loads(show(rev, "reports/properties.json")), json.loads(show(rev, "reports/metrics.json"))
    with dvc.api.open("data/prepared/dataset.pt", repo=str(ROOT), rev=rev, mode="rb") as f:
        y_train = torch.load(io.BytesIO(f.read()), weights_only=True)["y_train"]
    labels = semi_supervised_labels(y_train, params.semi.fraction, params.model.I, params.seed)
    n_labelled = int((labels[:, 0] >= 0).sum())
    for path in COPIED:
        atomic_write_bytes(REPORTS / "mnist_semi" / name / path.split("/")[-1], show(rev, path))
    return {"name": f"{name}, {params.semi.fraction:.0%} labels", "labels": n_labelled,
            "unlabelled": len(y_train) - n_labelled, "acc": props["acc_digit"],
            "agreement": props["agreement_digit"], "judge_acc": props["judge_acc_digit"], "elbo": metrics["elbo"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="names of finished `dvc exp run -n NAME` experiments")
    args = parser.parse_args()
    table = semi_supervised_table([run_row(name) for name in args.experiments])
    write_table(runs.with_code_column(runs.MNIST_TABLE, table), REPORTS / "mnist_table")
    print(table.to_string(index=False))
