"""The composition proxy's table (issue 34) from named DVC experiments -> reports/mnist_compose.{md,csv}.

    python stages/preset.py mnist_compose -n NAME -S semi.swap_weight=10.0 ...   # a run (about 25 minutes)
    python stages/diagnose.py NAME                                             # its diagnostics report
    python stages/compose_table.py mnist_compose mnist_compose_klz1 NAME ...
    python stages/compose_table.py A B C --committed A B      # A and B as committed, C from its experiment

--committed NAME ... takes those runs' rows from the committed reports/mnist_compose.csv (their files stay
as committed in reports/mnist_compose/NAME/), so that a table can gain a run on a machine whose DVC
experiments do not hold the earlier ones.

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


def committed_rows(names: list[str]) -> dict[str, dict]:
    """The runs' rows as the committed table holds them (each `code` is worked out again from its committed folder)."""
    import pandas as pd
    table = REPORTS / "mnist_compose.csv"
    rows = (pd.read_csv(table) if table.exists() else pd.DataFrame(columns=["run", "code"])).drop(columns=["code"])
    kept = {}
    for name in names:
        row = rows[rows["run"] == name]
        if len(row) != 1 or not (REPORTS / PRESET / name / "provenance.json").exists():
            raise SystemExit(f"error: --committed {name}: no row in reports/mnist_compose.csv with its folder "
                             f"reports/mnist_compose/{name}/")
        kept[name] = row.iloc[0].to_dict()
    return kept


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
    parser.add_argument("--committed", nargs="+", default=[],
                        help="experiments among those named whose rows are taken from the committed table")
    args = parser.parse_args()
    if unknown := set(args.committed) - set(args.experiments):
        raise SystemExit(f"error: --committed {' '.join(sorted(unknown))}: not among the experiments")
    import pandas as pd
    kept = committed_rows(args.committed)  # read before the table is rewritten
    table = pd.DataFrame([kept[name] if name in kept else run_row(name) for name in args.experiments])
    write_table(runs.with_code_column(runs.COMPOSE_TABLE, table), REPORTS / "mnist_compose")
    print(table.to_string(index=False))
