"""The driver: prepares and publishes the data, connects to Ray, fits (or resumes) the two Tune
experiments and turns their results into one row per trial; the pre-training report."""
from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path

import pandas as pd

from fmvae.core.pipeline import load_model
from fmvae.data.prepared import load_data, prepare_data
from fmvae.io import load_checked
from fmvae.params import ParamError, Params, validate
from fmvae.reporting.figure3 import RESULT_COLUMNS, TRIAL_REPORT
from fmvae.sweep.keys import data_key, experiment_name, pack_grid, pretrain_experiment_name, pretrain_grid, pretrain_key, trial_fingerprint, trial_grid, trial_name, trial_params
from fmvae.sweep.storage import Storage
from fmvae.sweep.trainables import run_pack, run_pretrain, run_trial


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _last_line(error: BaseException) -> str:
    """The exception's own message (Ray wraps it in a traceback whose first line names the actor)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1] if lines else type(error).__name__)[:200]


def connect(address: str | None) -> None:
    """Join the Ray cluster at address (or RAY_ADDRESS), or start one on this machine that listens on
    127.0.0.1 only; trials see the driver's FMVAE_* environment variables."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Ray turns a loopback node address into the host's outward one, and then listens on every
        # interface, unless its cluster networking is off: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read
        # when ray is imported (hence the constant too) and inherited by the processes Ray starts
        from ray._private import ray_constants
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             **({} if address else {"_node_ip_address": "127.0.0.1"}),
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("FMVAE_")}})


def _config(result) -> dict:
    """A Tune result's config (a restored trial that errored before reporting has none in memory;
    its params.json in the storage keeps it)."""
    if result.config:
        return result.config
    with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
        return json.loads(f.read())


LOGGER_CALLBACKS = {"mlflow": ("mlflow", "ray.air.integrations.mlflow", "MLflowLoggerCallback"),
                    "wandb": ("wandb", "ray.air.integrations.wandb", "WandbLoggerCallback")}


def logger_callbacks(names) -> list:
    """Ray Tune's logger callbacks for `--callback mlflow|wandb` (beside Tune's own TensorBoard, CSV and JSON
    loggers): each needs its package installed, and is refused before any work with how to get it."""
    import importlib
    import importlib.util
    callbacks = []
    for name in names:
        if name not in LOGGER_CALLBACKS:
            raise ParamError(f"--callback {name}: choose one of {', '.join(LOGGER_CALLBACKS)}")
        package, module, cls = LOGGER_CALLBACKS[name]
        if importlib.util.find_spec(package) is None:
            raise ParamError(f"--callback {name}: the {package} package is not installed (pip install {package})")
        kwargs = {"experiment_name": "fmvae"} if name == "mlflow" else {"project": "fmvae"}
        callbacks.append(getattr(importlib.import_module(module), cls)(**kwargs))
    return callbacks


def _fit(trainable, space: dict, name: str, storage: Storage, sweep, retry_failed: bool, callbacks=()):
    """Tuner.fit of one experiment in the storage, resumed (finished trials kept) if it exists. (Tune keeps
    a new experiment's callbacks; a resumed one runs without the extra logger callbacks.)"""
    from ray import tune
    path = f"{storage.uri.rstrip('/')}/ray"
    if tune.Tuner.can_restore(f"{path}/{name}"):
        print(f"sweep: resuming {path}/{name}; finished trials are not rerun")
        tuner = tune.Tuner.restore(f"{path}/{name}", trainable, resume_errored=False, restart_errored=retry_failed)
    else:
        tuner = tune.Tuner(trainable, param_space=space, run_config=tune.RunConfig(
            name=name, storage_path=path, failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1, callbacks=list(callbacks)))
    return tuner.fit()


def best_results(grid) -> dict:
    """Per data set, the finished trial with the best test ELBO in a ResultGrid of K trials: {data set: Result}.
    (ResultGrid.get_best_result ranks all results together; the data sets' bounds are on other scales, so each
    is ranked within its own; results that carry no elbo, errored trials, are left out.)"""
    best = {}
    for result in grid:
        elbo = (result.metrics or {}).get("elbo")
        if result.error is None and elbo is not None:
            dataset = _config(result)["trial"]["dataset"]
            if dataset not in best or elbo > best[dataset].metrics["elbo"]:
                best[dataset] = result
    return best


def run_sweep(params: Params, storage_uri: str, address: str | None = None, retry_failed: bool = False,
              callbacks=()) -> pd.DataFrame:
    """Run (or resume) the sweep; return one row per trial with its status. callbacks: logger_callbacks'
    names (mlflow, wandb), checked before any work."""
    import ray
    from ray import tune

    s = params.sweep
    callbacks = logger_callbacks(callbacks)
    storage = Storage(storage_uri)
    # each (data set, trial seed) prepared here (bad data settings fail before Ray starts), published once
    for dataset, seed in itertools.product(s.data, s.seeds):
        p = params.override({"data.name": dataset, "semi.fraction": 0.0, "seed": seed})
        key = data_key(p, dataset)
        if not storage.published(key):
            local = storage.cache_path(key)
            prepare_data(p, local)
            storage.publish(local, key)
    connect(address)
    if s.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise ParamError(f"sweep.gpus_per_trial: {s.gpus_per_trial} but the Ray cluster has no GPU "
                                "(trials would wait forever); set it to 0 to run on CPUs")
    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    start = time.time()
    pretrained = _fit(tune.with_resources(run_pretrain, resources),
                      {"params": tune.grid_search([p.to_dict() for p in pretrain_grid(params)]), "storage": storage.uri},
                      pretrain_experiment_name(params), storage, s, retry_failed, callbacks)
    failed_pretrain = {pretrain_key(validate(_config(r)["params"])): _last_line(r.error) for r in pretrained if r.error is not None}
    if s.pack > 1:
        df = _packed_rows(params, storage, failed_pretrain, retry_failed, resources)
        print(f"sweep: {int((df['status'] == 'done').sum())} trials done, {int((df['status'] == 'failed').sum())} "
              f"failed, wall time {time.time() - start:.0f} s")
        return df
    grid = _fit(tune.with_resources(run_trial, resources),
                {"trial": tune.grid_search(trial_grid(params)), "params": params.to_dict(), "storage": storage.uri},
                experiment_name(params), storage, s, retry_failed, callbacks)
    for dataset, result in sorted(best_results(grid).items()):
        c = _config(result)["trial"]
        print(f"sweep: best {dataset} trial: K = {c['K']}, I = {c['I']}, seed {c['seed']}, test ELBO "
              f"{result.metrics['elbo']:.3f} ({result.path}; its TensorBoard files are there)")
    rows = []
    for r in grid:
        c = _config(r)["trial"]
        p = trial_params(params, c["dataset"], c["K"], c["I"], c["seed"])
        m = r.metrics or {}
        ok = r.error is None and m.get("phase") == "done"
        error = "" if r.error is None else _last_line(r.error)
        if pretrain_key(p) in failed_pretrain:
            error = f"pre-training failed: {failed_pretrain[pretrain_key(p)]}"
        rows.append({"dataset": c["dataset"], "K": c["K"], "I": c["I"], "seed": c["seed"],
                     **{k: m.get(k) if ok else None for k in TRIAL_REPORT},
                     "fingerprint": trial_fingerprint(p), "status": "done" if ok else "failed", "error": error})
        if ok and m.get("nodes"):
            print(f"sweep: {trial_name(p)} ran on node(s) {m['nodes']}, resumed from joint step(s) {m['resumed_from']}")
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(["dataset", "I", "K", "seed"]).reset_index(drop=True)
    n_fail = int((df["status"] == "failed").sum())
    print(f"sweep: {len(df) - n_fail} trials done, {n_fail} failed, wall time {time.time() - start:.0f} s")
    return df


def _grid_point(trial: dict) -> tuple:
    return trial["dataset"], trial["K"], trial["I"], trial["seed"]


def _packed_rows(params: Params, storage: Storage, failed_pretrain: dict, retry_failed: bool, resources: dict):
    """Run the packs (one Tune trial each, resources per pack) and read one row per member from the
    storage's records: finished/ (with the member's fingerprint), else failed/ or its pack's error."""
    from ray import tune
    grid = _fit(tune.with_resources(run_pack, resources),
                {"pack": tune.grid_search(pack_grid(params)), "params": params.to_dict(), "storage": storage.uri},
                experiment_name(params), storage, params.sweep, retry_failed)
    pack_error = {}
    for r in grid:
        for t in _config(r)["pack"]:
            pack_error[_grid_point(t)] = "" if r.error is None else _last_line(r.error)
    rows = []
    for t in trial_grid(params):
        p = trial_params(params, t["dataset"], t["K"], t["I"], t["seed"])
        fp, name = trial_fingerprint(p), trial_name(p)
        record = storage.read_json(f"finished/{name}.json")
        ok = record is not None and record.get("fingerprint") == fp
        failed = storage.read_json(f"failed/{name}.json")
        error = "" if ok else (failed or {}).get("error") or pack_error.get(_grid_point(t), "") or "not finished"
        if pretrain_key(p) in failed_pretrain:
            error = f"pre-training failed: {failed_pretrain[pretrain_key(p)]}"
        m = record["metrics"] if ok else {}
        rows.append({**t, **{k: m.get(k) for k in TRIAL_REPORT}, "fingerprint": fp,
                     "status": "done" if ok else "failed", "error": error})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(["dataset", "I", "K", "seed"]).reset_index(drop=True)


def pretraining_report(params: Params, storage_uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each published pre-training of the sweep: one row with the test bound of its averaged model
    under N(0, I) (recon - KL, one seeded sample per test point) and its last training row, and its
    whole training curve. Every K of a (data set, seed, I) starts from this model, so this is where
    the seeds' common offset in Figure 3 comes from."""
    import torch
    storage, rows, curves = Storage(storage_uri), [], []
    for p in pretrain_grid(params):
        key = pretrain_key(p)
        if not storage.published(key):
            continue  # its pre-training failed: the trials' rows say so
        ds = load_data(p, storage.fetch(data_key(p, p.data.name)))
        path = storage.fetch(key)
        model = load_model(p, ds, path, torch.device("cpu")).eval()
        torch.manual_seed(p.seed)  # the sample of z each test point's reconstruction term uses
        recon = kl = 0.0
        with torch.no_grad():
            for start in range(0, len(ds.x_test), 1000):
                r, k = model.vae_bound(ds.to_float(ds.x_test[start:start + 1000]))
                recon, kl = recon + r.double().sum().item(), kl + k.double().sum().item()
        n, history = len(ds.x_test), load_checked(path)["history"]
        who = {"dataset": p.data.name, "I": p.model.I, "seed": p.seed}
        last = history[-1] if history else {}
        rows.append(who | {"iters": p.pretrain.iters, "test_elbo": (recon - kl) / n, "test_recon": recon / n,
                           "test_kl": kl / n, "train_elbo_last": last.get("elbo"), "train_kl_last": last.get("kl"),
                           "pretrain": Path(key).stem})
        curves += [who | {k: h[k] for k in ("step", "elbo", "recon", "kl")} for h in history]
    return pd.DataFrame(rows), pd.DataFrame(curves)
