"""params.yaml: validation against the schema (fmvae.schema), and helpers the stages share.

Every key has a default and a check; an unknown key (with the closest valid
ones), a wrong type or an out-of-range value is reported, naming the key, before
any work starts.
"""
from __future__ import annotations

import ast
import copy
import difflib
import functools
import hashlib
import json
from pathlib import Path

import torch
import yaml

from .data import Dataset
from .model import FMVAE
from .prior import Hyperprior
from .schema import SCHEMA
from .train import TRAIN_KEYS, TrainConfig

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
        if full["model.channels"] and full["model.arch"] not in ("conv64", "auto"):
            errors.append(f"model.channels: set for model.arch {full['model.arch']!r}; only conv64 takes widths")
        if full["model.channels"] and full["model.arch"] == "auto" and full["data.name"] != "celeba":
            errors.append(f"model.channels: set for {full['data.name']!r}; only CelebA's conv64 takes widths")
        if max(full["plot.factors"]) >= full["model.I"]:
            errors.append(f"plot.factors: {full['plot.factors']} names a factor >= model.I = {full['model.I']}")
        if full["data.name"] == "synthetic" and full["semi.fraction"] > 0 and full["model.I"] < 2:
            errors.append("model.I: the synthetic data set has 2 labelled properties; semi-supervision needs I >= 2")
    if errors:
        raise ParamError("invalid params:\n  " + "\n  ".join(errors))
    return _unflatten(full)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None,
                sweep_file: str | Path | None = None) -> dict:
    """params.yaml validated; `sweep_file`'s `sweep:` section, when given, replaces params.yaml's
    (a sweep's own params, e.g. sweep/params.yaml, leave the default grid in params.yaml as it is)."""
    path = Path(path)
    if not path.exists():
        raise ParamError(f"{path} not found")
    params = yaml.safe_load(path.read_text()) or {}
    if sweep_file is not None:
        sweep_file = Path(sweep_file)
        if not sweep_file.exists():
            raise ParamError(f"{sweep_file} not found")
        own = yaml.safe_load(sweep_file.read_text()) or {}
        if set(own) != {"sweep"}:
            raise ParamError(f"{sweep_file}: holds only a `sweep:` section, got {', '.join(map(str, own)) or 'nothing'}")
        params["sweep"] = own["sweep"]
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
    return FMVAE(ds.arch if arch == "auto" else arch, ds.x_shape, K_list(params), params["model"]["D"], Hyperprior(),
                 params["model"]["channels"])


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


# the phase whose section a TrainConfig key belongs to; keys of other phases keep their defaults
PHASE_SECTIONS = {"pretrain": ("pretrain",), "prior_init": ("prior_init",), "joint": ("joint", "semi")}


def train_config(params: dict, phase: str) -> TrainConfig:
    """The TrainConfig of one phase: every field from params (TRAIN_KEYS), iterations from <phase>.iters."""
    flat = _flatten(params)
    shared = ("seed", "train", "svi")
    fields = {f: flat[key] for f, key in TRAIN_KEYS.items()
              if key == "seed" or key.split(".")[0] in shared + PHASE_SECTIONS[phase]}
    return TrainConfig(iters=params[phase]["iters"], **fields)


def training_sources(start: str = "pipeline.py") -> list[Path]:
    """The package's source files that `start` runs when it trains and evaluates: its module-level
    imports within fmvae, followed transitively (package __init__ files included). Imports inside
    functions are left out on purpose: there the pipeline loads fmvae.plots and fmvae.report, which
    draw figures and tables from a trained model and never change one (their stages depend on them
    through dvc.yaml). tests/test_trust.py checks this list against what the stages import."""
    root = Path(__file__).resolve().parent
    seen: set[Path] = set()
    todo = [root / start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for parent in path.relative_to(root).parents:  # importing a.b runs a/__init__.py first
            if (root / parent / "__init__.py").exists():
                todo.append(root / parent / "__init__.py")
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            if node.module:
                base = base.joinpath(*node.module.split("."))
            names = [base] + ([base / a.name for a in node.names] if not node.module else
                              [base / a.name for a in node.names if (base / a.name).exists()
                               or (base / f"{a.name}.py").exists()])
            for target in names:
                for candidate in (target / "__init__.py", target.with_suffix(".py")):
                    if candidate.is_file() and candidate.resolve().is_relative_to(root):
                        todo.append(candidate)
                        break
    return sorted(seen)


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
    """A digest of the settings and inputs a stage's result depends on (resume only if equal)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
