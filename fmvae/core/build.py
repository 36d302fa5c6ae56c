"""What the training stages build from params: the device and the model (fmvae.params declares, loads and
validates params.yaml, and builds each phase's TrainConfig)."""
from __future__ import annotations

import torch

from fmvae.core.model import FMVAE
from fmvae.core.prior import Hyperprior
from fmvae.data import Dataset
from fmvae.params import ParamError, Params


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
