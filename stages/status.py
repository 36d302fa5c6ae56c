"""Which committed runs ran on HEAD's training code, and how to rerun the others.

    python stages/status.py            # list every committed run whose code is not HEAD's, table by
                                       # table: the command that reruns each, then the one that
                                       # rebuilds the table (exit 0)
    python stages/status.py --write    # refresh the `code` column of every table that lists runs
    python stages/status.py --assign   # a run that names no usable commit: point it at the newest
                                       # ancestor whose sources match its dvc.lock (provenance.json)

A table's `code` is "HEAD" where the run's training sources equal HEAD's, else the short commit it ran
at (fmvae/reporting/runs.py). A training commit refreshes the column with --write (seconds); the runs stay
valid results of their commit, and this list says which a rerun would bring to HEAD.
"""
import argparse
import json
import shlex
import subprocess
import sys

import pandas as pd
import yaml
from _common import ROOT

from fmvae.io import atomic_write_json
from fmvae.params import flatten, validate
from fmvae.reporting import runs
from fmvae.reporting.tables import write_table

PRESETS = {"mnist": "mnist_semi", "celeba": "celeba_cpu", "compose": "mnist_compose"}
TABLE_SCRIPTS = {"default": "stages/seeds_table.py", "mnist": "stages/semi_table.py",
                 "celeba": "stages/celeba_table.py", "compose": "stages/compose_table.py"}


def read(table: runs.RunTable) -> pd.DataFrame:
    """The committed csv with its whole-number columns as integers again (as the scripts wrote them)."""
    df = pd.read_csv(table.csv, dtype={"code": str})  # a short commit of digits (or 1e23...) is no number
    for col in df.columns:
        values = df[col].dropna()
        if df[col].dtype == float and len(values) and (values == values.round()).all():
            df[col] = df[col].astype("Int64")
    return df


def experiment_command(table: runs.RunTable, name: str) -> str:
    """The `dvc exp run` (or preset) call that trains the run again at HEAD, from its copied params."""
    folder, _ = table.files(name)
    if table.kind == "sweep":
        return "dvc repro sweep/dvc.yaml"
    if table.kind == "default" and name.startswith("dvc repro"):
        return "dvc repro"
    used = flatten(yaml.safe_load((folder / "params.yaml").read_text()))
    preset = PRESETS.get(table.kind)
    stated = yaml.safe_load((ROOT / "presets" / f"{preset}.yaml").read_text()) if preset else {}
    base = flatten(validate(stated).to_dict())
    sets = [f"-S {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in used.items() if base.get(k) != v]
    threads = json.loads((folder / "provenance.json").read_text()).get("host", {}).get("torch_threads") \
        if (folder / "provenance.json").exists() else None
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    head = f"python stages/preset.py {preset}" if preset else "dvc exp run --temp"
    name_part = "" if preset == name else f" -n {name}"
    return f"{env}{head}{name_part}{' ' if sets else ''}{' '.join(sets)}"


def table_command(table: runs.RunTable, df: pd.DataFrame) -> str:
    if table.kind == "sweep":
        return "dvc repro sweep/dvc.yaml"
    names = [n for n in dict.fromkeys(table.run_name(v) for v in df[table.key]) if n]
    if table.kind == "default":
        changed = dict(zip(df[table.key], df["changed"]))
        plain = [n for n in names if not n.startswith("dvc repro") and pd.isna(changed[n])]
        variants = [n for n in names if not n.startswith("dvc repro") and not pd.isna(changed[n])]
        return f"python {TABLE_SCRIPTS['default']} --run {' '.join(plain)}" + \
            (f" --variant {' '.join(variants)}" if variants else "")
    if table.stem == "celeba_variants":
        seeds = read(runs.CELEBA_TABLE)
        base = [n for n in dict.fromkeys(seeds["run"]) if runs.CELEBA_TABLE.run_name(n)]
        return f"python {TABLE_SCRIPTS['celeba']} {' '.join(base)} --variant {' '.join(names)}"
    if table.kind == "compose":  # its rows quote each run's diagnostics report
        return f"python stages/diagnose.py {' '.join(names)} && python {TABLE_SCRIPTS['compose']} {' '.join(names)}"
    return f"python {TABLE_SCRIPTS[table.kind]} {' '.join(names)}"


def stale() -> list[str]:
    """Per table whose runs are not all on HEAD's code: a heading, a line per such run (its commit and the
    command that trains it again) and the one command that rebuilds the table afterwards."""
    lines = []
    for table in runs.run_tables():
        df = read(table)
        names = [n for n in dict.fromkeys(table.run_name(v) for v in df[table.key]) if n is not None]
        old = [(name, code.label) for name in names if not (code := runs.run_code(*table.files(name))).is_head]
        if not old:
            continue
        if table.kind == "sweep":
            lines += [f"reports/{table.stem}: {len(old)} of {len(names)} runs on older code "
                      f"({', '.join(sorted({label for _, label in old}))}); rerun: dvc repro sweep/dvc.yaml"]
            continue
        lines.append(f"reports/{table.stem}: {len(old)} of {len(names)} runs on older code; rerun each, "
                     "then rebuild the table:")
        lines += [f"  {name} (code {label}): {experiment_command(table, name)}" for name, label in old]
        lines.append(f"  then: {table_command(table, df)}")
    return lines


def write() -> None:
    """Each table with its code column afresh; Figure 3's tables are outputs of sweep/dvc.yaml's report
    stage, so its lock is brought up to date with them (`dvc commit`: nothing reruns)."""
    sweep_changed, refused = False, []
    for table in runs.run_tables():
        before = table.csv.read_bytes()
        try:
            df = runs.with_code_column(table, read(table))
        except runs.RunCodeError as err:  # e.g. a mean whose runs are no longer all of one code: left as it is
            refused.append(f"status: reports/{table.stem} left unchanged: {err}; rerun its runs on older code "
                           "(python stages/status.py lists them) or rebuild it from the runs of one code")
            continue
        write_table(df, table.csv.with_suffix(""))
        sweep_changed |= table.kind == "sweep" and table.csv.read_bytes() != before
        print(f"status: reports/{table.stem}: code {', '.join(sorted(set(df['code'].dropna())))}")
    if sweep_changed:
        subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "sweep/dvc.yaml:report"], cwd=ROOT, check=True)
    if refused:
        sys.exit("\n".join(refused))


def assign() -> None:
    """Give each run that names no usable commit the newest ancestor whose sources match its lock."""
    for table in runs.run_tables():
        for value in read(table)[table.key]:
            name = table.run_name(value)
            if name is None:
                continue
            folder, lock = table.files(name)
            try:
                runs.run_code(folder, lock)
                continue
            except runs.RunCodeError as err:
                reason = str(err)
            commit = runs.newest_matching_ancestor(lock)
            if commit is None:
                print(f"status: {folder.relative_to(ROOT)}: no ancestor matches its dvc.lock; rerun it")
                continue
            path = folder / "provenance.json"
            prov = json.loads(path.read_text()) if path.exists() else {}
            prov |= {"code_commit": commit,
                     "code_commit_note": "assigned by stages/status.py --assign: the newest ancestor whose "
                                         f"sources match the run's dvc.lock ({reason.split(': ', 1)[1]})"}
            atomic_write_json(path, prov)
            print(f"status: {folder.relative_to(ROOT)}: code_commit {commit[:7]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="refresh the code column of every table")
    parser.add_argument("--assign", action="store_true", help="point runs without a usable commit at one")
    args = parser.parse_args()
    if args.assign:
        assign()
    if args.write:
        write()
    if not (args.write or args.assign):
        lines = stale()
        print("\n".join(lines) if lines else "status: every committed run ran on HEAD's training code")
