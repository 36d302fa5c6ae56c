"""The default profile's spread: its runs over seeds and thread counts -> reports/default_runs.{md,csv}.

    dvc repro                                                     # seed 0: the workspace's run
    python stages/seeds_table.py --run default_seed1 ...          # or run them first:
    OMP_NUM_THREADS=1 dvc exp run --temp -n default_seed1 -S seed=1
    OMP_NUM_THREADS=2 dvc exp run --temp -n default_seed0_threads2 -f
    python stages/seeds_table.py --run ... --variant default_ema0.99   # a run with other params, e.g.
    OMP_NUM_THREADS=1 dvc exp run --temp -n default_ema0.99 -S train.ema_decay=0.99
    OMP_NUM_THREADS=1 dvc exp run --temp -n default_ema0 -S train.ema_decay=0      # no averaging

A run left out of the arguments leaves the table with its folder under reports/default_runs/.

A number from one run is a draw: this table puts each run's test bound, IWAE and the spread of the
bound over the joint phase's last snapshots beside the host and thread count it came from, then
the mean and the min-max over the seeds of one thread count. A variant (--variant) is a run that
changed params besides the seed: listed with what it changed, left out of the statistics. Each experiment's metrics, evaluation,
provenance and dvc.lock are copied to reports/default_runs/<name>/, the workspace's run is read
from reports/ (the files `dvc repro` committed), so the table and what produced it are committed
together (tests/test_trust.py checks that they agree, and that every lock records the sources of the
commit its run names); its `code` column says which runs ran on HEAD's training code (fmvae/reporting/runs.py).
"""
import argparse
import json
import shutil

import numpy as np
import pandas as pd
import yaml
from _common import REPORTS, ROOT

from fmvae.io import atomic_write_bytes
from fmvae.params import as_written
from fmvae.reporting import runs as committed_runs
from fmvae.reporting.experiments import full_rev, show
from fmvae.reporting.tables import write_table

COPIED = ["dvc.lock", "params.yaml", "reports/metrics.json", "reports/evaluation.json", "reports/provenance.json"]
WORKSPACE = "dvc repro (workspace)"


def changed(params: dict, default: dict) -> str:
    """The params (other than the seed) a run set differently from params.yaml, as key=value; a key added to
    params.yaml after the run counts at its default (as_written), not as a change the run made."""
    run, base = as_written(params), as_written(default)
    return ", ".join(f"{k}={run.get(k)}" for k in sorted(run.keys() | base.keys())
                     if k != "seed" and run.get(k) != base.get(k))


def row(name: str, files: dict, default: dict) -> dict:
    metrics, details, prov = (json.loads(files[f"reports/{n}.json"]) for n in ("metrics", "evaluation", "provenance"))
    snaps = details.get("snapshots", {})
    host = prov.get("host", {})
    return {"run": name, "changed": changed(yaml.safe_load(files["params.yaml"]), default), "seed": prov["seed"], "torch_threads": host.get("torch_threads"), "cpu": host.get("cpu"),
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
    """The run's files from its experiment's commit (copied to reports/default_runs/<name>/ once the table
    is checked); where this clone has no such experiment, the copies already there (a table refreshed after
    a training commit)."""
    folder = REPORTS / "default_runs" / name
    try:
        rev = full_rev(name)
    except SystemExit:
        if not folder.is_dir():
            raise
        print(f"{name}: no experiment of that name here; reading its copies in {folder.relative_to(ROOT)}")
        return {path: (folder / path.split("/")[-1]).read_bytes() for path in COPIED}
    return {path: show(rev, path) for path in COPIED}


def summary(runs: pd.DataFrame, threads: int) -> list[dict]:
    """Mean, min and max over the seeds run with `threads` threads and no other change (the first run of
    each seed), of one code version: the one most of them ran (a tie: the first run's). The rows averaged
    are marked in_mean; a seed of another code stays in the table, outside the mean."""
    candidates = runs[(runs["torch_threads"] == threads) & (runs["changed"] == "")].drop_duplicates("seed")
    counts = candidates["code"].value_counts()
    code = candidates["code"].iloc[0] if (counts == counts.max()).sum() > 1 else counts.idxmax()
    seeds = candidates[candidates["code"] == code]
    runs["in_mean"] = runs.index.isin(seeds.index)
    cols = ["test_elbo", "iwae", "recon", "kl_z", "kl_r", "spread_averaged", "spread_last_iterate",
            "spread_averaged_about_trend", "spread_last_iterate_about_trend"]
    label = f"over seeds {', '.join(map(str, sorted(seeds['seed'])))} ({threads} thread{'s' * (threads > 1)})"
    rows = [{"run": f"{stat} {label}", **getattr(seeds[cols], stat)().to_dict()} for stat in ("mean", "min", "max")]
    return rows + [{"run": f"max - min {label}", **(seeds[cols].max() - seeds[cols].min()).to_dict()}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", default=[], help="names of finished `dvc exp run -n NAME` experiments")
    parser.add_argument("--variant", nargs="+", default=[], help="experiments that changed other params too")
    args = parser.parse_args()
    workspace = {path: (ROOT / path).read_bytes() for path in COPIED}
    params = yaml.safe_load(workspace["params.yaml"])
    files = {name: experiment_files(name) for name in args.run + args.variant}
    runs = pd.DataFrame([row(WORKSPACE, workspace, params)] + [row(n, f, params) for n, f in files.items()])
    for r in runs.itertuples():  # refused before anything is written
        if (r.run in args.variant) != bool(r.changed):
            raise SystemExit(f"error: experiment {r.run!r} changed {r.changed or 'only the seed'}; "
                             f"pass it as {'--variant' if r.changed else '--run'}")
    for name, run_files in files.items():
        for path, data in run_files.items():
            atomic_write_bytes(REPORTS / "default_runs" / name / path.split("/")[-1], data)
    runs = committed_runs.with_code_column(committed_runs.DEFAULT_RUNS, runs)  # each run's code: HEAD or a commit
    threads = int(runs.loc[0, "torch_threads"])
    table = pd.concat([runs, pd.DataFrame(summary(runs, threads))], ignore_index=True)
    table[["seed", "torch_threads"]] = table[["seed", "torch_threads"]].astype("Int64")
    table = committed_runs.with_code_column(committed_runs.DEFAULT_RUNS, table)  # refuses a mean over code versions
    write_table(table, REPORTS / "default_runs")
    for folder in (REPORTS / "default_runs").iterdir():  # a run no longer in the table leaves with its files
        if folder.is_dir() and folder.name not in args.run + args.variant:
            shutil.rmtree(folder)
            print(f"removed {folder.relative_to(ROOT)}: not in the table")
    print(table.to_string(index=False))
