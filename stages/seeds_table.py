"""The default profile's spread: its runs over seeds and thread counts -> reports/default_runs.{md,csv}.

    dvc repro                                                     # seed 0: the workspace's run
    python stages/seeds_table.py --run default_seed1 ...          # or run them first:
    OMP_NUM_THREADS=1 dvc exp run --temp -n default_seed1 -S seed=1
    OMP_NUM_THREADS=2 dvc exp run --temp -n default_seed0_threads2 -f

A number from one run is a draw: this table puts each run's test bound, IWAE and the spread of the
bound over the joint phase's last snapshots beside the host and thread count it came from, then
the mean and the min-max over the seeds of one thread count. Each experiment's metrics, evaluation,
provenance and dvc.lock are copied to reports/default_runs/<name>/, the workspace's run is read
from reports/ (the files `dvc repro` committed), so the table and what produced it are committed
together (tests/test_trust.py checks that they agree, and that every lock records the code at hand).
"""
import argparse
import json

import numpy as np
import pandas as pd
import yaml
from _common import REPORTS, ROOT
from semi_table import full_rev, show

from fmvae.checkpoint import atomic_write_bytes
from fmvae.report import write_table

COPIED = ["dvc.lock", "params.yaml", "reports/metrics.json", "reports/evaluation.json", "reports/provenance.json"]
WORKSPACE = "dvc repro (workspace)"


def row(name: str, files: dict) -> dict:
    metrics, details, prov = (json.loads(files[f"reports/{n}.json"]) for n in ("metrics", "evaluation", "provenance"))
    snaps = details.get("snapshots", {})
    host = prov.get("host", {})
    return {"run": name, "seed": prov["seed"], "torch_threads": host.get("torch_threads"), "cpu": host.get("cpu"),
            "test_elbo": metrics["elbo"], "iwae": metrics.get("iwae"), "recon": metrics["recon"],
            "kl_z": metrics["kl_z"], "kl_r": metrics["kl_r"],
            "snapshot_steps": "/".join(map(str, snaps.get("steps", []))),
            "spread_averaged": snaps.get("spread_average"), "spread_last_iterate": snaps.get("spread_last_iterate"),
            "spread_averaged_about_trend": detrended_spread(snaps.get("steps", []), snaps.get("elbo_average", [])),
            "spread_last_iterate_about_trend": detrended_spread(snaps.get("steps", []),
                                                                snaps.get("elbo_last_iterate", []))}


def detrended_spread(steps, bounds):
    """max - min of the bounds about their least-squares line over the steps: the part of the spread
    that is noise, not the model still improving."""
    if len(bounds) < 3:
        return None
    residual = np.asarray(bounds) - np.polyval(np.polyfit(steps, bounds, 1), steps)
    return float(residual.max() - residual.min())


def experiment_files(name: str) -> dict:
    rev = full_rev(name)
    files = {path: show(rev, path) for path in COPIED}
    for path, data in files.items():
        atomic_write_bytes(REPORTS / "default_runs" / name / path.split("/")[-1], data)
    return files


def summary(runs: pd.DataFrame, threads: int) -> list[dict]:
    """Mean, min and max over the seeds run with `threads` threads (the first run of each seed)."""
    seeds = runs[runs["torch_threads"] == threads].drop_duplicates("seed")
    cols = ["test_elbo", "iwae", "recon", "kl_z", "kl_r", "spread_averaged", "spread_last_iterate",
            "spread_averaged_about_trend", "spread_last_iterate_about_trend"]
    label = f"over seeds {', '.join(map(str, sorted(seeds['seed'])))} ({threads} thread{'s' * (threads > 1)})"
    rows = [{"run": f"{stat} {label}", **getattr(seeds[cols], stat)().to_dict()} for stat in ("mean", "min", "max")]
    return rows + [{"run": f"max - min {label}", **(seeds[cols].max() - seeds[cols].min()).to_dict()}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", default=[], help="names of finished `dvc exp run -n NAME` experiments")
    args = parser.parse_args()
    workspace = {path: (ROOT / path).read_bytes() for path in COPIED}
    params = yaml.safe_load(workspace["params.yaml"])
    runs = pd.DataFrame([row(WORKSPACE, workspace)] + [row(n, experiment_files(n)) for n in args.run])
    for name, p in [(n, yaml.safe_load((REPORTS / "default_runs" / n / "params.yaml").read_text())) for n in args.run]:
        if {k: v for k, v in p.items() if k != "seed"} != {k: v for k, v in params.items() if k != "seed"}:
            raise SystemExit(f"error: experiment {name!r} changed more than the seed; it is not the default profile")
    threads = int(runs.loc[0, "torch_threads"])
    table = pd.concat([runs, pd.DataFrame(summary(runs, threads))], ignore_index=True)
    table[["seed", "torch_threads"]] = table[["seed", "torch_threads"]].astype("Int64")
    write_table(table, REPORTS / "default_runs")
    print(table.to_string(index=False))
