"""params.yaml: the schema, its validation, and helpers the stages share.

Every key has a default and a check; an unknown key (with the closest valid
ones), a wrong type or an out-of-range value is reported, naming the key, before
any work starts.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path

import torch
import yaml

from .data import DATASETS, Dataset
from .model import FMVAE
from .prior import Hyperprior
from .train import ORDERS, TrainConfig

_pos = lambda v: v > 0
_nonneg = lambda v: v >= 0
_unit = lambda v: 0 <= v <= 1

# key -> (default, type(s), check, what the check means)
SCHEMA = {
    "seed": (0, int, _nonneg, ">= 0"),
    "device": ("auto", str, lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda"), "auto, cpu or cuda[:n]"),
    "data.name": ("binarized_mnist", str, lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "data.mirror": ("", str, None, ""),
    "data.raw_dir": ("data/raw", str, None, ""),
    "model.I": (1, int, _pos, ">= 1"),
    "model.K": (16, (int, list), lambda v: all(isinstance(k, int) and k >= 1 for k in ([v] if isinstance(v, int) else v)) and v != [], "an int >= 1 or a list of them, one per factor"),
    "model.D": (32, int, _pos, ">= 1"),
    "model.arch": ("auto", str, lambda v: v in ("auto", "conv28", "conv64", "mlp"), "auto, conv28, conv64 or mlp"),
    "train.batch_size": (64, int, _pos, ">= 1"),
    "train.lr": (1e-3, float, _pos, "> 0"),
    "train.log_every": (50, int, _pos, ">= 1"),
    "train.checkpoint_every_s": (120.0, float, _nonneg, ">= 0"),
    "train.nan_policy": ("stop", str, lambda v: v in ("stop", "skip"), "stop or skip"),
    "train.bf16": (False, bool, None, "true or false"),
    "train.compile": (False, bool, None, "true or false (torch.compile the differentiable part of each step)"),
    "train.cuda_graph": (True, bool, None, "true or false (on CUDA: replay each iteration from a CUDA graph)"),
    "pretrain.iters": (1000, int, _nonneg, ">= 0"),
    "pretrain.kl_anneal_iters": (0, int, _nonneg, ">= 0"),
    "prior_init.iters": (500, int, _nonneg, ">= 0"),
    "prior_init.init_points": (10000, int, _pos, ">= 1"),
    "prior_init.restarts": (8, int, _pos, ">= 1"),
    "prior_init.rotate": (True, bool, None, "true or false"),
    "svi.tau0": (10.0, float, _nonneg, ">= 0"),
    "svi.kappa": (0.7, float, lambda v: 0.5 < v <= 1, "in (0.5, 1]"),
    "joint.iters": (2000, int, _nonneg, ">= 0"),
    "joint.kl_z_weight": (1.0, float, _pos, "> 0"),
    "joint.kl_z_anneal_iters": (0, int, _nonneg, ">= 0"),
    "joint.order": ("reuse", str, lambda v: v in ORDERS, "one of " + ", ".join(ORDERS)),
    "semi.delta": (0.0, float, _nonneg, ">= 0"),
    "semi.fraction": (0.0, float, _unit, "in [0, 1]"),
    "evaluate.recon_samples": (1, int, _pos, ">= 1"),
    "evaluate.iw_samples": (0, int, _nonneg, ">= 0 (0 skips the IWAE estimate)"),
    "evaluate.iw_points": (1000, int, _pos, ">= 1"),
    "properties.judge_iters": (500, int, _pos, ">= 1"),
    "properties.samples": (1000, int, _pos, ">= 1"),
    "plot.factors": ([0, 0], list, lambda v: len(v) == 2 and all(isinstance(i, int) and i >= 0 for i in v), "two factor indices"),
    "plot.max_components": (10, int, _pos, ">= 1"),
    "sweep.data": ("binarized_mnist", str, lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "sweep.K": ([2, 4, 8, 16, 32, 64, 128, 256, 512], list, lambda v: v != [] and all(isinstance(k, int) and k >= 1 for k in v), "a non-empty list of ints >= 1"),
    "sweep.seeds": ([0, 1, 2], list, lambda v: v != [] and all(isinstance(k, int) and k >= 0 for k in v), "a non-empty list of ints >= 0"),
    "sweep.I": ([1], list, lambda v: v != [] and all(isinstance(k, int) and k >= 1 for k in v), "a non-empty list of ints >= 1"),
    "sweep.cpus_per_trial": (2.0, float, _pos, "> 0"),
    "sweep.gpus_per_trial": (0.25, float, _unit, "in [0, 1] (a fraction lets trials share a GPU)"),
    "sweep.max_failures": (1, int, _nonneg, ">= 0 (retries of a trial that raises)"),
    "sweep.iters.pretrain": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
    "sweep.iters.prior_init": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
    "sweep.iters.joint": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
}


class ParamError(ValueError):
    pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def validate(params: dict) -> dict:
    """Defaults filled in, every key and value checked; returns the nested params."""
    flat = _flatten(params or {})
    errors = []
    for key in flat:
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(sorted(SCHEMA))}"
            errors.append(f"{key}: unknown parameter; {hint}")
    full = {k: copy.deepcopy(d[0]) for k, d in SCHEMA.items()}
    for key, value in flat.items():
        if key not in SCHEMA:
            continue
        default, types, check, meaning = SCHEMA[key]
        if types is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):  # bool is an int: refuse it
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            errors.append(f"{key}: expected {names}, got {value!r}")
            continue
        if check is not None and not check(value):
            errors.append(f"{key}: {value!r} is invalid, must be {meaning}")
            continue
        full[key] = value
    if not errors:
        k = full["model.K"]
        if isinstance(k, list) and len(k) != full["model.I"]:
            errors.append(f"model.K: a list needs one entry per factor (model.I = {full['model.I']}), got {len(k)}")
        if max(full["plot.factors"]) >= full["model.I"]:
            errors.append(f"plot.factors: {full['plot.factors']} names a factor >= model.I = {full['model.I']}")
        if full["data.name"] == "synthetic" and full["semi.fraction"] > 0 and full["model.I"] < 2:
            errors.append("model.I: the synthetic data set has 2 labelled properties; semi-supervision needs I >= 2")
    if errors:
        raise ParamError("invalid params:\n  " + "\n  ".join(errors))
    return _unflatten(full)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamError(f"{path} not found")
    params = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(params)


def K_list(params: dict) -> list[int]:
    k = params["model"]["K"]
    return [k] * params["model"]["I"] if isinstance(k, int) else list(k)


def check_against_data(params: dict, ds: Dataset) -> None:
    """Errors that need the data: labels outside a factor's K, more properties than factors."""
    if params["semi"]["fraction"] > 0 and ds.y_train is not None:
        ks = K_list(params)
        if len(ds.property_K) > len(ks):
            raise ParamError(f"model.I: {len(ds.property_K)} labelled properties ({', '.join(ds.property_names)}) "
                             f"need at least as many factors, got I = {len(ks)}")
        for p, (name, kp) in enumerate(zip(ds.property_names, ds.property_K)):
            if kp > ks[p]:
                raise ParamError(f"model.K: property {name!r} has {kp} values but factor {p} has K = {ks[p]}")


def device(params: dict) -> torch.device:
    d = params["device"]
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError("device: cuda requested but no CUDA device is available")
    return torch.device(d)


def build_model(params: dict, ds: Dataset) -> FMVAE:
    arch = params["model"]["arch"]
    return FMVAE(ds.arch if arch == "auto" else arch, ds.x_shape, K_list(params), params["model"]["D"], Hyperprior())


def model_config(model: FMVAE, with_prior: bool = True) -> dict:
    """Shapes a saved model was built with; without the prior (pre-training) K does not matter."""
    cfg = {"arch": model.arch, "x_shape": list(model.x_shape), "I": model.I, "D": model.D}
    return cfg | {"K": list(model.K)} if with_prior else cfg


def check_model_config(saved: dict, model: FMVAE, path) -> None:
    """A checkpoint built with other shapes than params.yaml asks for is an error naming the key."""
    want = model_config(model, with_prior="K" in saved)
    for key, name in (("I", "model.I"), ("D", "model.D"), ("K", "model.K"), ("arch", "model.arch"),
                      ("x_shape", "data.name")):
        if key in want and saved.get(key) != want[key]:
            raise ParamError(f"{name}: {path} was trained with {key} = {saved.get(key)}, params ask for {want[key]}; "
                             "rerun the earlier stages (dvc repro) or fix params.yaml")


def train_config(params: dict, phase: str) -> TrainConfig:
    t, s = params["train"], params["svi"]
    common = dict(batch_size=t["batch_size"], lr=t["lr"], seed=params["seed"], log_every=t["log_every"],
                  checkpoint_every_s=t["checkpoint_every_s"], nan_policy=t["nan_policy"], tau0=s["tau0"],
                  kappa=s["kappa"], amp=t["bf16"], compile=t["compile"], cuda_graph=t["cuda_graph"])
    if phase == "pretrain":
        return TrainConfig(iters=params["pretrain"]["iters"], kl_anneal_iters=params["pretrain"]["kl_anneal_iters"], **common)
    if phase == "prior_init":
        p = params["prior_init"]
        return TrainConfig(iters=p["iters"], init_points=p["init_points"], init_restarts=p["restarts"],
                           init_rotate=p["rotate"], **common)
    j = params["joint"]
    return TrainConfig(iters=j["iters"], kl_z_weight=j["kl_z_weight"], kl_z_anneal_iters=j["kl_z_anneal_iters"],
                       delta=params["semi"]["delta"], order=j["order"], **common)


def fingerprint(*parts) -> str:
    """A digest of the settings and inputs a stage's result depends on (resume only if equal)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
