"""Named DVC experiments (`dvc exp run -n NAME`): their files at their commit, and their trained model
and prepared data from DVC's cache. Shared by the table scripts and stages/diagnose.py."""
from __future__ import annotations

import subprocess
from pathlib import Path

import dvc.api
import torch
import yaml

from fmvae.core import pipeline
from fmvae.params import Params, validate

ROOT = Path(__file__).resolve().parents[2]


def show(rev: str, path: str) -> bytes:
    """A file of the project as it is in an experiment's commit (or any rev), through dvc.api: a file git
    tracks comes from that commit, a DVC-tracked output from the cache."""
    return dvc.api.read(path, repo=str(ROOT), rev=rev, mode="rb")


def full_rev(name: str) -> str:
    """The experiment's commit, found through DVC's own listing (`dvc exp list --all-commits`, whose API
    this is); of several of that name (one per baseline commit: rerun after a code change), the newest, said."""
    from dvc.repo import Repo
    with Repo(str(ROOT)) as repo:
        listed = repo.experiments.ls(all_commits=True)  # {baseline: [(name, commit), ...]}
    found = [sha for runs in listed.values() for exp, sha in runs if exp == name]
    if not found:
        raise SystemExit(f"error: experiment {name!r}: none of that name (run `dvc exp list --all-commits`)")
    dated = sorted(((int(subprocess.run(["git", "show", "-s", "--format=%ct", sha], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout), sha) for sha in found), reverse=True)
    if len(dated) > 1:
        print(f"{name}: {len(dated)} experiments of that name; using the newest ({dated[0][1][:7]})")
    return dated[0][1]


def run_params(rev: str) -> Params:
    """The params an experiment ran with (its params.yaml, validated: keys added since take their defaults)."""
    return validate(yaml.safe_load(show(rev, "params.yaml")))


def load_run(rev: str, params: Params, work: Path):
    """The run's prepared data and trained model, from DVC's cache at its commit."""
    for path in ("data/prepared/dataset.pt", "models/joint.pt"):
        for part in (path, path + ".sha256"):  # each with the checksum load_checked verifies
            with dvc.api.open(part, repo=str(ROOT), rev=rev, mode="rb") as f:
                (work / Path(part).name).write_bytes(f.read())
    ds = pipeline.load_data(params, work / "dataset.pt")
    return ds, pipeline.load_model(params, ds, work / "joint.pt", torch.device("cpu"))


