"""What the training stages share: the device, the model params ask for, and the digest of the training
sources that keys every checkpoint and sweep trial (fmvae.params declares, loads and validates params.yaml,
and builds each phase's TrainConfig)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import torch

from .data import Dataset
from .model import FMVAE
from .params import ParamError, Params
from .prior import Hyperprior


def device(params: Params) -> torch.device:
    d = params.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError("device: cuda requested but no CUDA device is available")
    return torch.device(d)


def build_model(params: Params, ds: Dataset) -> FMVAE:
    m = params.model
    return FMVAE(ds.arch if m.arch == "auto" else m.arch, ds.x_shape, m.Ks, m.D, Hyperprior(), m.channels)


def model_config(model: FMVAE, with_prior: bool = True) -> dict:
    """Shapes a saved model was built with; without the prior (pre-training) K does not matter."""
    cfg = {"arch": model.arch, "x_shape": list(model.x_shape), "I": model.I, "D": model.D}
    if model.channels:  # only when set: the shapes of files saved before model.channels existed still match
        cfg["channels"] = list(model.channels)
    return cfg | {"K": list(model.K)} if with_prior else cfg


def check_model_config(saved: dict, model: FMVAE, path) -> None:
    """A checkpoint built with other shapes than params.yaml asks for is an error naming the key."""
    want = model_config(model, with_prior="K" in saved)
    for key, name in (("I", "model.I"), ("D", "model.D"), ("K", "model.K"), ("arch", "model.arch"),
                      ("channels", "model.channels"), ("x_shape", "data.name")):
        if saved.get(key) != want.get(key) and (key in want or key == "channels"):
            raise ParamError(f"{name}: {path} was trained with {key} = {saved.get(key)}, params ask for {want.get(key)}; "
                             "rerun the earlier stages (dvc repro) or fix params.yaml")


# The training sources: the package's code that a trained or evaluated number depends on, so that a
# change to any of them re-keys every checkpoint and sweep trial, and a change to a figure or table module
# (plots, report, runs) or a script re-keys none. Declared here, not derived from which imports happen to
# sit at module level; tests/test_trust.py checks it is exactly what the training stages import.
TRAINING_SOURCES = ("__init__.py", "checkpoint.py", "clustering.py", "config.py", "data", "distributions",
                    "evaluate.py", "levers.py", "model.py", "nets.py", "params.py", "pipeline.py", "prior.py",
                    "step.py", "train.py")


def training_sources() -> list[Path]:
    """The files of TRAINING_SOURCES (a folder: its .py files), sorted."""
    root = Path(__file__).resolve().parent
    files = []
    for name in TRAINING_SOURCES:
        path = root / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(files)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source the pipeline trains and evaluates with (training_sources): a result
    (a checkpoint to resume, a sweep trial to reuse) belongs to the code that produced it too, and
    a change to a figure or a table alone retrains nothing."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in training_sources():
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(*parts) -> str:
    """A digest of the settings and inputs a stage's result depends on (resume only if equal). Typed
    params and phase configs enter as the plain dicts of their values, so a digest does not depend on
    which of the two forms a caller holds."""
    plain = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) and not isinstance(o, type) else str(o)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=plain).encode()).hexdigest()[:16]
