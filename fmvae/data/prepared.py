"""The download stage's product, data/prepared/dataset.pt: a data set fetched, checked against params and
saved as compact tensors; and its loading by every later stage, checked again."""
from __future__ import annotations

from pathlib import Path

from fmvae.data import Dataset, fetch, load, load_prepared, save_prepared
from fmvae.params import ParamError, Params, check_against_data


def prepare_data(params: Params, out: Path) -> Dataset:
    """download stage: fetch (mirror or canonical address), check, save compact tensors."""
    d = params.data
    folder = fetch(d.name, d.raw_dir, d.mirror or None)
    ds = load(d.name, folder, params.seed, d.omniglot_split, d.partial)
    check_against_data(params, ds)
    save_prepared(ds, out)
    print(f"download: {ds.name}: train {tuple(ds.x_train.shape)}, test {tuple(ds.x_test.shape)} -> {out}")
    return ds


def load_data(params: Params, path: Path) -> Dataset:
    ds = load_prepared(path)
    if ds.name != params.data.name:
        raise ParamError(f"data.name: {path} holds {ds.name!r}, params ask for {params.data.name!r}; "
                         "rerun the download stage")
    check_against_data(params, ds)
    return ds
