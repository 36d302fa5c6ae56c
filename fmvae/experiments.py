"""Named DVC experiments (`dvc exp run -n NAME`): their files at their commit, and their trained model
and prepared data from DVC's cache. Shared by the table scripts and stages/diagnose.py."""
from __future__ import annotations

import subprocess
from pathlib import Path

import dvc.api
import torch

from . import pipeline

ROOT = Path(__file__).resolve().parent.parent


def show(rev: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, check=True).stdout


def full_rev(name: str) -> str:
    """The experiment's commit; of several of that name (one per baseline commit: rerun after a code
    change), the newest, said."""
    refs = subprocess.run(["git", "for-each-ref", "--sort=-committerdate",
                           "--format=%(objectname) %(committerdate:iso) %(refname)", "refs/exps"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    found = [line.split() for line in refs if line.endswith(f"/{name}")]
    if not found:
        raise SystemExit(f"error: experiment {name!r}: no ref named so (run `dvc exp list --all-commits`)")
    if len(found) > 1:
        print(f"{name}: {len(found)} experiments of that name; using the newest ({' '.join(found[0][1:3])})")
    return found[0][0]


def load_run(rev: str, params: dict, work: Path):
    """The run's prepared data and trained model, from DVC's cache at its commit."""
    for path in ("data/prepared/dataset.pt", "models/joint.pt"):
        for part in (path, path + ".sha256"):  # each with the checksum load_checked verifies
            with dvc.api.open(part, repo=str(ROOT), rev=rev, mode="rb") as f:
                (work / Path(part).name).write_bytes(f.read())
    ds = pipeline.load_data(params, work / "dataset.pt")
    return ds, pipeline.load_model(params, ds, work / "joint.pt", torch.device("cpu"))


