"""The CelebA table, figures and factor table from named DVC experiments (section 4.2):

    python stages/preset.py celeba_cpu                               # seed 0, about two hours on 2 cores
    python stages/preset.py celeba_cpu -n celeba_cpu_seed1 -S seed=1
    python stages/celeba_table.py celeba_cpu celeba_cpu_seed1
    python stages/celeba_table.py celeba_cpu celeba_cpu_seed1 --variant NAME ...   # and runs that changed params
    python stages/celeba_table.py celeba_cpu --only-variants --variant NAME ...    # add or redo variants alone
    python stages/celeba_table.py A B --variant C D --committed C D              # regroup: C and D as committed

For each experiment (its own commit and dvc.lock) this loads the trained model and the prepared
data from DVC's cache and writes
  reports/celeba_table.{md,csv}    per property: accuracy of argmax q(r_i|x) on the test images (it
                                   must equal the run's own properties.json), balanced accuracy, the
                                   majority baseline, the judge's agreement with clamped samples and
                                   its own test accuracy, beside the paper's; what the decoder does with
                                   each labelled factor (fmvae.reporting.celeba.factor_swap, with the run's
                                   judge trained again): the judge on reconstructions of the test images,
                                   and how often it sees the property change when only that factor's z
                                   moves to its other component; then mean and max - min over the runs
  reports/celeba_variants.{md,csv}  the same rows for each --variant experiment, with the params it
                                   changed from the first experiment; not in the mean
  reports/celeba_factors.{csv,md}  the NMI of each factor's argmax q(r_i|x) with each of the 40
                                   attributes (csv); each factor's five highest (md)
  reports/celeba/<name>/           Figure 6, Figure 8 for factors 3 and 4, Figure 5, the NMI heatmap,
                                   and the run's params, metrics, properties, figures and dvc.lock;
                                   factor_swap.json, keyed on the run and the code: a later call reads
                                   it back instead of training the judge again
--committed NAME ... takes those runs' rows (and NMI) from the committed tables and their params from
their committed folders, so that runs whose models are not in this machine's DVC cache can be regrouped
(a preset that adopts what a variant changed makes that variant's seeds its rows, its former rows variants).
"""
import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib
import pandas as pd
import torch
import yaml
from _common import REPORTS, ROOT

from fmvae import data as data_mod, provenance
from fmvae.core import evaluate as ev
from fmvae.io import atomic_write_bytes, atomic_write_text
from fmvae.params import Params, as_written, validate
from fmvae.reporting import celeba as cr, runs
from fmvae.reporting.experiments import full_rev, load_run, run_params, show
from fmvae.reporting.judge import PAPER_CELEBA, cached_judge
from fmvae.reporting.tables import write_table

matplotlib.use("Agg")
COPIED = ["dvc.lock", "params.yaml", "reports/metrics.json", "reports/evaluation.json", "reports/provenance.json",
          "reports/properties.json", "reports/celeba_table.md", "reports/figures/samples_grid.png",
          "reports/figures/clusters.png", "reports/figures/training_curves.png"]


def differences(stored: dict, reference: dict) -> dict:
    """The run's params (its params.yaml as written) that differ from the reference run's, the seed aside."""
    used, base = as_written(stored), as_written(reference)
    return {k: v for k, v in used.items() if k != "seed" and v != base.get(k)}


def committed_params(name: str) -> dict:
    """A tabled run's params.yaml as its committed folder holds it (reports/celeba/<name>/params.yaml)."""
    path = REPORTS / "celeba" / name / "params.yaml"
    if not path.exists():
        raise SystemExit(f"error: {path.relative_to(ROOT)} not found: {name!r} is not in the committed table")
    return yaml.safe_load(path.read_text())


def committed_rows(name: str) -> tuple[list[dict], pd.DataFrame]:
    """A run's rows and NMI as the committed tables hold them (its `changed` and `code` are worked out
    again where it is tabled); its model need not be in this machine's DVC cache."""
    tables = [pd.read_csv(path) for path in (REPORTS / "celeba_table.csv", REPORTS / "celeba_variants.csv")
              if path.exists()]
    rows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["run"])
    rows = rows[rows["run"] == name].drop(columns=["code", "changed"], errors="ignore")
    if rows.empty:
        raise SystemExit(f"error: {name!r} has no rows in the committed reports/celeba_table.csv or celeba_variants.csv")
    rows = rows.astype({c: int for c in ("seed", "train_images", "test_images")})
    nmi = pd.read_csv(REPORTS / "celeba_factors.csv") if (REPORTS / "celeba_factors.csv").exists() else None
    nmi = nmi[nmi["run"] == name] if nmi is not None else pd.DataFrame()
    return rows.to_dict("records"), nmi


def check_roles(experiments: list[str], variants: list[str], committed=()) -> dict[str, dict]:
    """Seeds of one configuration are averaged; anything else must come as a --variant. Returns what
    each experiment changed from the first one (empty for the seeds). `committed` runs' params are read
    from their committed folders (their models need not exist here)."""
    stored = lambda name: committed_params(name) if name in committed else \
        yaml.safe_load(show(full_rev(name), "params.yaml"))
    written = {name: stored(name) for name in experiments + variants}
    changes = {name: differences(p, written[experiments[0]]) for name, p in written.items()}
    for name, changed in changes.items():
        if validate(written[name]).data.name != "celeba":
            raise SystemExit(f"error: experiment {name!r} trained on {validate(written[name]).data.name!r}, not celeba")
        if bool(changed) != (name in variants):
            raise SystemExit(f"error: experiment {name!r} changed {changed or 'only the seed'} from "
                             f"{experiments[0]!r}; pass it {'with' if changed else 'without'} --variant")
    return changes


def run_report(name: str, changed: dict | None = None) -> tuple[list[dict], pd.DataFrame]:
    """One experiment's rows (a variant's naming what it `changed`) and NMI table."""
    rev = full_rev(name)
    params = run_params(rev)
    props, metrics = json.loads(show(rev, "reports/properties.json")), json.loads(show(rev, "reports/metrics.json"))
    out = REPORTS / "celeba" / name
    for path in COPIED:
        atomic_write_bytes(out / path.split("/")[-1], show(rev, path))
    with tempfile.TemporaryDirectory() as work:
        ds, model = load_run(rev, params, Path(work))
    assignments = ev.evaluate_bound(model, ds.x_test, ds.to_float)["assignments"]
    swap = {row["property"]: row for row in factor_swap(name, rev, params, props, model, ds, out / "factor_swap.json")}
    rows = []
    for p, prop in enumerate(ds.property_names):
        scores = cr.property_scores(assignments[:, p].numpy(), ds.y_test[:, p].numpy())
        # the same model and images: at most a near-tie of q(r|x) may flip with another thread count
        if abs(scores["accuracy"] - props[f"acc_{prop}"]) * len(ds.x_test) > 2.5:
            raise SystemExit(f"error: {name}: the model gives {prop} accuracy {scores['accuracy']:.6f}, its run "
                             f"recorded {props[f'acc_{prop}']:.6f}: not the model that run evaluated")
        rows.append({"run": name, "seed": params.seed, **({"changed": _changes(changed)} if changed else {}),
                     "property": prop, "accuracy_argmax_q_r": props[f"acc_{prop}"],
                     "balanced_accuracy": scores["balanced_accuracy"], "majority_baseline": scores["majority_baseline"],
                     "paper_accuracy": PAPER_CELEBA[prop][0],
                     "judge_agreement_clamped_samples": props[f"agreement_{prop}"],
                     "paper_human_judgement": PAPER_CELEBA[prop][1], "judge_test_accuracy": props[f"judge_acc_{prop}"],
                     "judge_on_reconstructions": swap[prop]["judge_on_reconstructions"],
                     "judge_sees_factor_swap": swap[prop]["judge_sees_factor_swap"],
                     "test_elbo": metrics["elbo"], "train_images": len(ds.x_train), "test_images": len(ds.x_test)})
    folder = data_mod.fetch("celeba", ROOT / params.data.raw_dir, params.data.mirror or None)
    names, attributes = cr.attributes_of_test_images(folder, ds)
    nmi = cr.factor_attribute_nmi(assignments, attributes, names, ds.property_names)
    torch.manual_seed(params.seed)
    cr.figure6(model, ds, out / "figure6.png")
    for factor in range(len(ds.property_names), model.I):
        cr.factor_figure(model, ds, factor, out / f"figure8_factor{factor}.png")
    cr.figure5(model, ds, out / "figure5.png")
    cr.nmi_heatmap(nmi, out / "factor_attribute_nmi.png",
                   f"{name}: NMI of argmax q(r_i|x) with each attribute, {len(ds.x_test)} test images")
    print(f"{name}: wrote {out}", flush=True)
    return rows, nmi.reset_index(names="factor").assign(run=name, K=list(model.K))


def factor_swap(name: str, rev: str, params: Params, props: dict, model, ds, path: Path) -> list[dict]:
    """fmvae.reporting.celeba.factor_swap with the run's judge trained again (same images, seed, steps
    and thread count; fmvae.reporting.judge.cached_judge, which stages/diagnose.py shares). Its minutes of
    CPU (nine on one thread of the 2-core host) are spent once per judge, the swap's once per run and code: `path` keeps the rows under a key of the run's commit (its params, model and
    thread count) and of the source that loads the model, trains the judge and moves the factors; a
    later call with the same key reads them back."""
    # the training sources (loading the model) and the modules that train the judge and move the factors
    computing = {ROOT / "fmvae" / "reporting" / m for m in ("celeba.py", "judge.py", "plots.py", "experiments.py")}
    sources = sorted(set(provenance.training_sources()) | computing)
    key = provenance.fingerprint(rev, {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()
                                   for f in sources + [Path(__file__).resolve()]})
    kept = json.loads(path.read_text()) if path.exists() else None
    if isinstance(kept, dict) and kept.get("key") == key:
        print(f"{name}: factor swap of this run and code read back from {path.relative_to(ROOT)}", flush=True)
        return kept["rows"]
    # the run's thread count too: a judge trained on 2 threads instead of the run's 1 passes the check
    # below but is another judge, and moves these shares by up to 0.017 (celeba_cpu, 2-core host)
    threads, before = json.loads(show(rev, "reports/provenance.json"))["host"]["torch_threads"], torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        judge, judge_acc = cached_judge(ds, params.properties.judge_iters, seed=params.seed)
    finally:
        torch.set_num_threads(before)
    for prop, acc in zip(ds.property_names, judge_acc):
        if abs(acc - props[f"judge_acc_{prop}"]) > 0.01:
            raise SystemExit(f"error: {name}: the judge trained again reaches {prop} test accuracy {acc:.4f}, the "
                             f"run's reached {props[f'judge_acc_{prop}']:.4f}: not the run's judge")
    rows = cr.factor_swap(model, judge, ds)
    atomic_write_text(path, json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    return rows


def _changes(changed: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in changed.items())


def summary(rows: list[dict]) -> pd.DataFrame:
    """The runs' rows, then per property their mean and their max - min."""
    table = pd.DataFrame(rows)
    numbers = [c for c in table.columns if c not in ("run", "seed", "property")]
    g = table.groupby("property", sort=False)[numbers]
    spread = (g.max() - g.min()).reset_index().assign(run=f"max - min over {table['run'].nunique()} runs")
    for col in ("paper_accuracy", "paper_human_judgement", "train_images", "test_images"):
        spread[col] = None
    mean = g.mean().reset_index().assign(run=f"mean over {table['run'].nunique()} runs")
    out = pd.concat([table, mean, spread], ignore_index=True)[table.columns]
    return out.astype({c: "Int64" for c in ("seed", "train_images", "test_images")})  # counts, not 150.000


def highest(row: pd.Series, n: int = 5, floor: float = 0.01) -> str:
    """One factor's row of celeba_factors.csv -> its n highest attributes at NMI >= floor, as text."""
    values = row.drop(["run", "factor", "K"]).astype(float).nlargest(n)
    return ", ".join(f"{a} {v:.2f}" for a, v in values[values >= floor].items()) or f"none >= {floor}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="names of finished celeba `dvc exp run -n NAME` experiments")
    parser.add_argument("--variant", nargs="+", default=[],
                        help="experiments that changed more than the seed: reports/celeba_variants.{md,csv}, outside the mean")
    parser.add_argument("--only-variants", action="store_true",
                        help="compute the --variant runs alone: the main table, the factor table and the other "
                             "variants' rows stay as committed (each variant's changes are against the first "
                             "experiment's committed params)")
    parser.add_argument("--committed", nargs="+", default=[],
                        help="runs (among the experiments and variants) whose rows, NMI and params are taken "
                             "from the committed tables and folders instead of their models")
    args = parser.parse_args()
    unknown = set(args.committed) - set(args.experiments + args.variant)
    if unknown:
        raise SystemExit(f"error: --committed {' '.join(sorted(unknown))}: not among the experiments or variants")
    committed = set(args.committed) | (set(args.experiments) if args.only_variants else set())
    changes = check_roles(args.experiments, args.variant, committed)  # before anything is computed or written
    kept = {name: committed_rows(name) for name in args.committed}  # read before any table is rewritten
    for name in set(args.committed) & set(args.experiments):
        if kept[name][1].empty and not args.only_variants:  # --only-variants keeps the factor table as it is
            raise SystemExit(f"error: {name!r} has no rows in the committed reports/celeba_factors.csv: "
                             "a main run needs its NMI; table it from its model")

    def rows_of(name: str, changed: dict | None = None) -> tuple[list[dict], pd.DataFrame]:
        if name not in kept:
            return run_report(name, changed)
        rows, nmi = kept[name]
        return [{"run": r["run"], "seed": r["seed"], **({"changed": _changes(changed)} if changed else {}),
                 **{k: v for k, v in r.items() if k not in ("run", "seed")}} for r in rows], nmi

    if args.only_variants:
        if not args.variant:
            raise SystemExit("error: --only-variants needs --variant NAME ...")
        rows = [row for name in args.variant for row in rows_of(name, changes[name])[0]]
        others = REPORTS / "celeba_variants.csv"
        others = pd.read_csv(others) if others.exists() else pd.DataFrame(columns=["run"])
        others = others[~others["run"].isin(args.variant)].drop(columns=["code"], errors="ignore")
        variants = pd.concat([others, pd.DataFrame(rows)], ignore_index=True)
        write_table(runs.with_code_column(runs.CELEBA_VARIANTS, variants), REPORTS / "celeba_variants")
        print(variants.to_string(index=False))
        raise SystemExit(0)
    reports = [rows_of(name) for name in args.experiments]
    variants = [rows_of(name, changes[name]) for name in args.variant]
    # each row's code (HEAD or the commit it ran at); the mean refused if the seeds' differ
    table = runs.with_code_column(runs.CELEBA_TABLE, summary([row for rows, _ in reports for row in rows]))
    if variants:
        write_table(runs.with_code_column(runs.CELEBA_VARIANTS, pd.DataFrame([row for rows, _ in variants for row in rows])),
                    REPORTS / "celeba_variants")
    else:  # no variants this time: none of an earlier call's stays behind
        for ext in ("md", "csv"):
            (REPORTS / f"celeba_variants.{ext}").unlink(missing_ok=True)
    for folder in (REPORTS / "celeba").iterdir():  # a run no longer in the tables leaves with its files
        if folder.is_dir() and folder.name not in args.experiments + args.variant:
            shutil.rmtree(folder)
            print(f"removed {folder.relative_to(ROOT)}: not in the tables")
    write_table(table, REPORTS / "celeba_table")
    nmi = pd.concat([n for _, n in reports], ignore_index=True)
    nmi = nmi[["run", "factor", "K"] + [c for c in nmi.columns if c not in ("run", "factor", "K")]]
    atomic_write_text(REPORTS / "celeba_factors.csv", nmi.to_csv(index=False, float_format="%.4f"))
    best = nmi.apply(highest, axis=1)
    compact = nmi[["run", "factor", "K"]].assign(highest_nmi_attributes=best)  # the csv holds all 40 columns
    atomic_write_text(REPORTS / "celeba_factors.md", compact.to_markdown(index=False) + "\n")
    print(table.to_string(index=False))
