"""Committed runs and the code that made them.

A run copied into reports/ (its dvc.lock, params.yaml and provenance.json beside its numbers) stays a
valid result after the code moves on: it names the commit it ran at, and that commit's sources must
be the ones its dvc.lock records. Its `code` in a table is "HEAD" when its training sources equal
HEAD's (the sources are compared, not the commit), else the short commit, so that a training change
costs a refresh of one column (`python stages/status.py --write`), not a day of reruns.

Everything here reads git objects and the copied files alone: no DVC cache, no experiment refs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("fmvae/", "stages/")       # a lock dep under these is code; anything else is data or a model
NUMBER_STAGES = ("download", "pretrain", "prior_init", "joint_train", "evaluate", "properties", "sweep")


class RunCodeError(ValueError):
    """A committed run whose dvc.lock matches neither the commit it names nor, failing that, HEAD."""


def git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=check).stdout.strip()


@functools.lru_cache(maxsize=None)
def _blob(commit: str, path: str) -> bytes | None:
    out = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True)
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def md5_at(commit: str, path: str) -> str | None:
    """DVC's md5 of `path` as it was at `commit`: a file's md5, or for a folder the md5 of the sorted
    JSON list of its files' {md5, relpath} with ".dir" appended (dvc-data's tree hash); None if absent."""
    kind = git("cat-file", "-t", f"{commit}:{path}", check=False)
    if kind == "blob":
        return hashlib.md5(_blob(commit, path)).hexdigest()
    if kind != "tree":
        return None
    files = git("ls-tree", "-r", "--name-only", commit, "--", path).splitlines()
    entries = sorted(({"md5": hashlib.md5(_blob(commit, f)).hexdigest(), "relpath": f[len(path) + 1:]}
                      for f in files), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def code_deps(lock: dict, stages=NUMBER_STAGES) -> dict[str, str]:
    """{path: md5} of the code the lock's number-producing stages ran (figures and tables aside)."""
    out = {}
    for name, stage in lock["stages"].items():
        if name in stages:
            out |= {d["path"]: d["md5"] for d in stage.get("deps", []) if d["path"].startswith(CODE_FOLDERS)}
    return out


def mismatches(deps: dict[str, str], commit: str) -> list[str]:
    """The deps whose md5 at `commit` is not the recorded one."""
    return sorted(p for p, md5 in deps.items() if md5_at(commit, p) != md5)


def head() -> str:
    return git("rev-parse", "HEAD")


def is_ancestor(commit: str, of: str = "HEAD") -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, of], cwd=ROOT,
                          capture_output=True).returncode == 0


def training_sources_at_head() -> set[str]:
    """The paths the code digest covers at HEAD (fmvae.provenance.training_sources), relative to the root."""
    from fmvae.provenance import training_sources
    return {str(p.relative_to(ROOT)) for p in training_sources()}


@dataclass(frozen=True)
class RunCode:
    folder: Path
    commit: str       # the commit the run ran at (its sources are the lock's)
    version: str      # the newest commit with the run's sources: one name for that code, whatever commit ran it
    is_head: bool     # its training sources equal HEAD's

    @property
    def label(self) -> str:
        return "HEAD" if self.is_head else self.version[:7]


def recorded_commit(folder: Path, lock_file: Path | None = None) -> str | None:
    """The commit a run names: for the default run (the repository's own dvc.lock) the last commit that
    wrote that lock (`dvc repro`, or a relock); for a copied run its provenance.json's `code_commit` (set
    afterwards for a run whose own `git_commit` is missing or unreachable, by `stages/status.py
    --assign`), else its `git_commit`."""
    if lock_file is not None and Path(lock_file).resolve() == ROOT / "dvc.lock":
        return git("log", "-1", "--format=%H", "--", "dvc.lock") or None
    path = folder / "provenance.json"
    if not path.exists():
        return None
    prov = json.loads(path.read_text())
    return prov.get("code_commit") or prov.get("git_commit")


def run_code(folder: Path, lock_file: Path | None = None) -> RunCode:
    """Check a committed run and say whose code it is. The lock (folder/dvc.lock unless given) must
    match the sources at the commit the run names, which must be an ancestor of HEAD, or else (a lock
    recorded anew after a change the golden run shows neutral) those at the commit that last wrote the
    lock, or HEAD's before that commit is made; a run that names no commit, or whose lock matches none
    of them, is refused (RunCodeError)."""
    lock = yaml.safe_load((lock_file or folder / "dvc.lock").read_text())
    deps = code_deps(lock)
    if not deps:
        raise RunCodeError(f"{folder}: its dvc.lock records no code deps")
    commit = recorded_commit(folder, lock_file)
    if commit is None:
        raise RunCodeError(f"{folder}: names no commit (provenance.json's git_commit); "
                           "python stages/status.py --assign points it at the commit its dvc.lock matches")
    full = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", check=False)
    if not full or not is_ancestor(full):
        raise RunCodeError(f"{folder}: its commit {commit[:7]} is not an ancestor of HEAD")
    bad = mismatches(deps, full)
    if bad:  # its lock was recorded anew since (golden.py --relock: a change the golden run shows neutral):
        # it then matches the sources of the commit that wrote it, or HEAD's before that commit is made
        lock_path = Path(lock_file or folder / "dvc.lock").resolve()
        wrote = (git("log", "-1", "--format=%H", "--", str(lock_path.relative_to(ROOT)), check=False)
                 if lock_path.is_relative_to(ROOT) else "")
        relocked = next((c for c in (wrote, head()) if c and not mismatches(deps, c)), None)
        if relocked is None:
            raise RunCodeError(f"{folder}: its dvc.lock matches neither the sources at its commit {full[:7]}"
                               f"{', nor at the commit that last wrote it' if wrote else ''}, nor HEAD's: "
                               f"{', '.join(bad)}")
        full = relocked
    version = code_version(deps)
    return RunCode(folder, full, version, version == head() and training_sources_at_head() <= covered(deps))


def covered(deps: dict[str, str]) -> set[str]:
    """The files a set of deps names, folders expanded (at HEAD: where the digest's files live now)."""
    out = set()
    for path in deps:
        files = git("ls-tree", "-r", "--name-only", "HEAD", "--", path).splitlines()
        out |= set(files) if files else {path}
    return out


def code_version(deps: dict[str, str]) -> str | None:
    """The newest commit reachable from HEAD whose sources are the deps' (None if none is): the commit
    before the next one that changed any of them, HEAD if none did. Runs of one code version get one
    name even when they ran at different commits."""
    touching = git("rev-list", "HEAD", "--", *sorted(deps)).splitlines()  # newest first
    for i, commit in enumerate(touching):
        if not mismatches(deps, commit):
            return head() if i == 0 else git("rev-parse", f"{touching[i - 1]}^")
    return None


def newest_matching_ancestor(lock_file: Path) -> str | None:
    """For a run that names no usable commit: the newest ancestor whose sources match its lock."""
    return code_version(code_deps(yaml.safe_load(lock_file.read_text())))


def same_code(labels) -> str:
    """The one code label of runs to be averaged; refuses a mix (a table never averages code versions)."""
    found = sorted(set(labels))
    if len(found) != 1:
        raise RunCodeError(f"refusing to average runs of different code: {', '.join(found)}")
    return found[0]


# ------------------------------------------------------------------ the tables that list committed runs
@dataclass(frozen=True)
class RunTable:
    """A committed table (reports/<stem>.csv and .md) whose rows quote committed runs. `key` names the
    column that names the run; `folder(name)` is where its copied files are; `averaged(df)` marks the
    run rows that enter its summary rows (those without a seed), which must share one code version."""
    stem: str
    key: str
    kind: str  # default | mnist | celeba | compose | sweep: how a run is found and rerun

    @property
    def csv(self) -> Path:
        return ROOT / "reports" / f"{self.stem}.csv"

    def run_name(self, value) -> str | None:
        """The run a row quotes (None for a summary or a reference row)."""
        if self.kind == "sweep":
            return "sweep"
        if not isinstance(value, str):
            return None
        if self.kind == "mnist":
            return value.split("(", 1)[1].split(",", 1)[0] if value.startswith("fmvae (") else None
        return None if value.startswith(("mean ", "min ", "max ")) else value

    def files(self, name: str) -> tuple[Path, Path]:
        """(folder with provenance.json, dvc.lock) of a run."""
        reports = ROOT / "reports"
        if self.kind == "sweep":
            return reports / "sweep", ROOT / "sweep" / "dvc.lock"
        if self.kind == "default" and name.startswith("dvc repro"):
            return reports, ROOT / "dvc.lock"
        sub = {"default": "default_runs", "mnist": "mnist_semi", "celeba": "celeba", "compose": "mnist_compose"}[self.kind]
        return reports / sub / name, reports / sub / name / "dvc.lock"

    def averaged(self, df):
        """Boolean mask of the run rows its summary rows average."""
        is_run = df[self.key].map(lambda v: self.run_name(v) is not None)
        if "in_mean" in df:  # seeds_table marks the seeds its mean takes (one thread count, one code)
            return is_run & df["in_mean"].fillna(False).astype(bool)
        return is_run


DEFAULT_RUNS = RunTable("default_runs", "run", "default")      # stages/seeds_table.py
MNIST_TABLE = RunTable("mnist_table", "model", "mnist")         # stages/semi_table.py
CELEBA_TABLE = RunTable("celeba_table", "run", "celeba")        # stages/celeba_table.py, with ...
CELEBA_VARIANTS = RunTable("celeba_variants", "run", "celeba")  # ... its variants
COMPOSE_TABLE = RunTable("mnist_compose", "run", "compose")     # stages/compose_table.py


def run_tables() -> list[RunTable]:
    """Every committed table that lists runs (Figure 3's: one per data set the sweep ran)."""
    tables = [DEFAULT_RUNS, MNIST_TABLE, CELEBA_TABLE, CELEBA_VARIANTS, COMPOSE_TABLE]
    tables += [RunTable(p.stem, "dataset", "sweep") for p in sorted((ROOT / "reports").glob("figure3_*.csv"))]
    return [t for t in tables if t.csv.exists()]


def with_code_column(table: RunTable, df):
    """The table with its `code` column (after the key column) computed afresh: each run's RunCode label;
    a summary row gets the one label of the runs it averages (refused if they differ)."""
    df = df.drop(columns=["code"], errors="ignore")
    labels = {}
    for value in df[table.key]:
        name = table.run_name(value)
        if name is not None and name not in labels:
            labels[name] = run_code(*table.files(name)).label
    code = df[table.key].map(lambda v: labels.get(table.run_name(v)))
    summary = df[table.key].map(lambda v: table.run_name(v) is None) & (df["seed"].isna() if "seed" in df else False)
    if summary.any():
        code[summary] = same_code(code[table.averaged(df)])
    df.insert(list(df.columns).index(table.key) + 1, "code", code)
    return df
