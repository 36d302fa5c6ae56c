"""params.yaml: loading and validation against the schema (fmvae.schema), before any work.

Every key has a default and a check; an unknown key (with the closest valid ones), a wrong type or an
out-of-range value is reported, naming the key, before any work starts. This module needs the schema
and nothing that trains, so that a stage reading params (the download, a table script) depends on no
training source.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

from .data import Dataset
from .schema import SCHEMA


class ParamError(ValueError):
    pass


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
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
    flat = flatten(params or {})
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
        labelled = full["semi.delta"] > 0 and full["semi.fraction"] > 0
        for key in ("semi.delta_until", "semi.average_factors", "semi.swap_weight", "semi.adversary_weight"):
            if key in flat and flat[key] != SCHEMA[key][0] and not labelled:
                errors.append(f"{key}: acts on the labelled factors trained by gradient (section 2.5); "
                              "it needs semi.delta > 0 and semi.fraction > 0")
        if full["semi.adversary_weight"] > 0 and full["model.I"] < 2:
            errors.append("semi.adversary_weight: the adversary reads the blocks other than the named ones; "
                          "it needs model.I >= 2")
        levers = full["semi.swap_weight"] > 0 or full["semi.adversary_weight"] > 0
        if levers and full["sweep.pack"] > 1:
            errors.append("semi.swap_weight / semi.adversary_weight: trials packed into one vectorised model "
                          "(sweep.pack > 1) do not run them; set sweep.pack: 1")
        if full["semi.average_factors"] and full["train.ema_decay"] == 0:
            errors.append("semi.average_factors: averages with train.ema_decay, which is 0 (no averaging)")
        if full["data.name"] == "synthetic" and full["semi.fraction"] > 0 and full["model.I"] < 2:
            errors.append("model.I: the synthetic data set has 2 labelled properties; semi-supervision needs I >= 2")
    if errors:
        raise ParamError("invalid params:\n  " + "\n  ".join(errors))
    return unflatten(full)


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
