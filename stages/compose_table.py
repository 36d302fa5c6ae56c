"""The composition proxy's table (issue 34) from named DVC experiments -> reports/mnist_compose.{md,csv}.

    python stages/preset.py mnist_compose -n NAME -S semi.swap_weight=10.0 ...   # a run (about 25 minutes)
    python stages/diagnose.py NAME                                             # its diagnostics report
    python stages/compose_table.py mnist_compose mnist_compose_klz1 NAME ...

One row per experiment: what it changed from the preset as it was at the run's commit, its test bound,
the accuracy of argmax q(r|x), the judge's agreement with clamped samples beside the judge's own test
accuracy (its ceiling), and the diagnostics that say why (reports/diagnostics/NAME.json: the free
factor's used components and NMI with the digit, the judge-free round trip, the decoder's read from the
free block, the digit block's transplant). Each experiment's params, lock, metrics and figures are
copied to reports/mnist_compose/NAME/, so that the table and what produced it are committed together.
"""
import argparse
import json

import yaml
from _common import REPORTS

from fmvae.io import atomic_write_bytes
from fmvae.params import flatten, validate
from fmvae.reporting import runs
from fmvae.reporting.experiments import full_rev, run_params, show
from fmvae.reporting.tables import write_table

COPIED = ["dvc.lock", "params.yaml", "reports/metrics.json", "reports/properties.json", "reports/provenance.json",
          "reports/figures/samples_grid.png", "reports/figures/clusters.png", "reports/figures/training_curves.png"]
PRESET = "mnist_compose"


def run_row(name: str) -> dict:
    rev = full_rev(name)
    params = run_params(rev)
    diagnosis_file = REPORTS / "diagnostics" / f"{name}.json"
    if not diagnosis_file.exists():
        raise SystemExit(f"error: no diagnostics for {name!r}: run python stages/diagnose.py {name} first")
    diagnosis = json.loads(diagnosis_file.read_text())
    if diagnosis["rev"] != rev:
        raise SystemExit(f"error: reports/diagnostics/{name}.json measured {diagnosis['rev'][:7]}, the experiment "
                         f"is now {rev[:7]}: run python stages/diagnose.py {name} again")
    for path in COPIED:
        atomic_write_bytes(REPORTS / PRESET / name / path.split("/")[-1], show(rev, path))
    preset = flatten(validate(yaml.safe_load(show(rev, f"presets/{PRESET}.yaml"))).to_dict())  # the preset the run was given
    changed = {k: v for k, v in flatten(params.to_dict()).items() if preset.get(k) != v and not k.startswith("data.mirror")}
    metrics, props = json.loads(show(rev, "reports/metrics.json")), json.loads(show(rev, "reports/properties.json"))
    (digit,) = diagnosis["properties"]
    free = [u for u in digit["factor_usage"] if u["factor"] != digit["factor"]]
    return {"run": name, "changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "(the preset)",
            "K_free": params.model.K[1], "elbo": metrics["elbo"], "iwae": metrics.get("iwae"),
            "acc": props["acc_digit"], "agreement": props["agreement_digit"], "judge_acc": props["judge_acc_digit"],
            "round_trip": digit["round_trip"],
            "free_components_2pct": free[0]["components_over_2pct"] if free else None,
            "free_nmi": free[0]["nmi_with_property"] if free else None,
            "decoder_read_free": 1.0 - digit["decoder_read_share_per_block"][digit["factor"]],
            "transplant_named": digit["transplant_carries_per_block"][digit["factor"]]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="names of finished mnist_compose experiments, diagnosed")
    args = parser.parse_args()
    import pandas as pd
    table = pd.DataFrame([run_row(name) for name in args.experiments])
    write_table(runs.with_code_column(runs.COMPOSE_TABLE, table), REPORTS / "mnist_compose")
    print(table.to_string(index=False))
