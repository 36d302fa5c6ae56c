"""Ray Tune sweeps over K, seeds and I, running the pipeline's phases in-process.

Layout under `root` (default checkpoints/sweep):
    data/<dataset>-<fp>.pt                            prepared once by the driver, one per sweep.data entry
    pretrain/<dataset>-I<I>-D<D>-s<seed>-<fp>.pt      K-independent pre-training, shared by every K trial
    trials/<dataset>-I<I>-K<K>-s<seed>-<fp>/          each trial's checkpoints, model and final.json
    ray/fmvae-<dataset>[+<dataset>...]-<fp>/          Tune's own state (Tuner.restore resumes the sweep)

Every <fp> is a fingerprint of all the params the thing depends on (not a hand-picked subset),
of the source that trains and evaluates (config.code_digest) and of this file: a trial whose
effective params are unchanged is reused without training, one whose params changed trains anew,
and pre-training is shared only between trials whose pre-training params match. The Ray experiment is named after its trials' fingerprints, so
Tuner.restore never hands back results of other params.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from pathlib import Path

import pandas as pd

from . import config
from .checkpoint import atomic_write_json
from .config import code_digest
from .pipeline import evaluate_stage, load_data, prepare_data, train_stage
from .report import RESULT_COLUMNS, TRIAL_REPORT

# the params a trial reads (config.validate fills every key, so each of these is always present)
TRIAL_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model", "train", "pretrain", "prior_init", "svi", "joint", "semi",
                  "evaluate")
# the subset pre-training reads: trials that agree on these share one pre-trained model
PRETRAIN_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model.I", "model.D", "model.arch", "model.channels", "train",
                     "pretrain")


def _select(params: dict, keys) -> dict:
    out = {}
    for key in keys:
        node = params
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


# how a trial runs is this file's code too (trial_params, run_trial), on top of the pipeline's
SWEEP_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def trial_fingerprint(params: dict) -> str:
    return config.fingerprint(_select(params, TRIAL_SECTIONS), code_digest(), SWEEP_SOURCE)


def pretrain_fingerprint(params: dict) -> str:
    return config.fingerprint(_select(params, PRETRAIN_SECTIONS), code_digest(), SWEEP_SOURCE)


def data_file(root: Path, params: dict, dataset: str) -> Path:
    """The prepared data set, named after what it depends on: the data params a loader reads and the
    loaders' code (a data file of another split or reader is never reused)."""
    d = params["data"]
    fp = config.fingerprint(dataset, d["omniglot_split"], d["partial"], code_digest())
    return root / "data" / f"{dataset}-{fp}.pt"


def trial_params(params: dict, dataset: str, K: int, I: int, seed: int) -> dict:
    p = copy.deepcopy(params)
    p["data"]["name"], p["model"]["K"], p["model"]["I"], p["seed"] = dataset, K, I, seed
    p["plot"]["factors"] = [0, 0]
    for phase in ("pretrain", "prior_init", "joint"):
        if params["sweep"]["iters"][phase] is not None:
            p[phase]["iters"] = params["sweep"]["iters"][phase]
    p["evaluate"]["iw_samples"] = 0  # a trial reports the bound (11) and its parts; IWAE is not part of Figure 3
    p["joint"]["snapshots"] = 0  # nor the spread over the last snapshots (a trial would keep 2 models per snapshot)
    return config.validate({k: v for k, v in p.items() if k != "sweep"} | {"sweep": params["sweep"]})


def run_trial(config_: dict) -> dict:
    """One Tune trial: shared pre-training, prior init, joint training, evaluation (11)."""
    import torch
    from filelock import FileLock
    from ray import tune

    start = time.time()
    cfg = config_ | config_["trial"]  # dataset, K, I, seed
    root = Path(cfg["root"])
    params = trial_params(cfg["params"], cfg["dataset"], cfg["K"], cfg["I"], cfg["seed"])
    torch.set_num_threads(max(1, int(params["sweep"]["cpus_per_trial"])))
    if str(cfg["K"]) == os.environ.get("FMVAE_SWEEP_FAIL_K"):  # fault injection for the tests
        with open(root / "injected_failures.log", "a") as f:
            f.write(f"K={cfg['K']}\n")
        raise RuntimeError(f"injected failure for K={cfg['K']}")
    data = data_file(root, params, cfg["dataset"])
    fp = trial_fingerprint(params)
    tag = f"{cfg['dataset']}-I{cfg['I']}-D{params['model']['D']}-s{cfg['seed']}-{pretrain_fingerprint(params)}"
    pretrained = root / "pretrain" / f"{tag}.pt"
    with FileLock(str(pretrained) + ".lock"):  # the first trial of these pre-training params trains, the rest wait
        if not pretrained.exists():
            train_stage("pretrain", params, data, None, pretrained, root / "pretrain" / f"{tag}-ckpt")
        else:
            print(f"sweep: reusing pre-training {pretrained.name}")
    trial_dir = root / "trials" / f"{cfg['dataset']}-I{cfg['I']}-K{cfg['K']}-s{cfg['seed']}-{fp}"
    done = trial_dir / "final.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fp:
        final = json.loads(done.read_text())["metrics"]  # same params and code finished before: no work
        print(f"sweep: reusing finished trial {trial_dir.name}")
        tune.report(final)
        return final
    report = lambda phase: (lambda row, _history: tune.report({"phase": phase, **row}))
    train_stage("prior_init", params, data, pretrained, trial_dir / "prior_init.pt", trial_dir / "ckpt-prior_init",
                on_log=report("prior_init"))
    history = train_stage("joint", params, data, trial_dir / "prior_init.pt", trial_dir / "joint.pt",
                          trial_dir / "ckpt-joint", on_log=report("joint"))
    metrics = evaluate_stage(params, data, trial_dir / "joint.pt", trial_dir / "metrics.json")
    final = {k: metrics[k] for k in ("elbo", "recon", "kl_z", "kl_r")}
    final.update(components_used="/".join(map(str, metrics["components_used_per_factor"])),
                 **{f"{phase}_iters": params[phase]["iters"] for phase in ("pretrain", "prior_init", "joint")},
                 batch_size=params["train"]["batch_size"], train_points=len(load_data(params, data).x_train),
                 test_points=metrics["test_points"], wall_s=time.time() - start,
                 joint_steps=history[-1]["step"] if history else 0, phase="done", fingerprint=fp)
    atomic_write_json(done, {"fingerprint": fp, "metrics": final})
    tune.report(final)
    return final


def _last_line(error: BaseException) -> str:
    """The exception's own message (Ray wraps it in a traceback whose first line names the actor)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1] if lines else type(error).__name__)[:200]


def trial_grid(params: dict) -> list[dict]:
    """Every trial, K slowest: the first trials need different pre-trainings (data set x seed x I)
    and run side by side, instead of queueing behind one shared pre-training."""
    s = params["sweep"]
    return [{"dataset": d, "K": k, "I": i, "seed": seed}
            for k in s["K"] for seed in s["seeds"] for d in s["data"] for i in s["I"]]


def experiment_name(params: dict) -> str:
    """Named after every trial's fingerprint (and the failure policy Tune stores with the experiment)."""
    fps = sorted(trial_fingerprint(trial_params(params, t["dataset"], t["K"], t["I"], t["seed"]))
                 for t in trial_grid(params))
    return f"fmvae-{'+'.join(params['sweep']['data'])}-{config.fingerprint(fps, params['sweep']['max_failures'])}"


def run_sweep(params: dict, root: Path, address: str | None = None, retry_failed: bool = False) -> pd.DataFrame:
    """Run (or resume) the sweep; return one row per trial with its status."""
    import ray
    from ray import tune

    s = params["sweep"]
    root = root.resolve()
    for dataset in s["data"]:
        data = data_file(root, params, dataset)
        if not data.exists():
            p = copy.deepcopy(params)
            p["data"]["name"], p["semi"]["fraction"] = dataset, 0.0
            prepare_data(p, data)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                                              if k.startswith("FMVAE_")}})
    if s["gpus_per_trial"] > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise config.ParamError(f"sweep.gpus_per_trial: {s['gpus_per_trial']} but the Ray cluster has no GPU "
                                "(trials would wait forever); set it to 0 to run on CPUs")
    trainable = tune.with_resources(run_trial, {"cpu": s["cpus_per_trial"], "gpu": s["gpus_per_trial"]})
    storage = root / "ray"
    name = experiment_name(params)
    if tune.Tuner.can_restore(str(storage / name)):
        print(f"sweep: resuming {storage / name}; finished trials are not rerun")
        tuner = tune.Tuner.restore(str(storage / name), trainable, resume_errored=False,
                                   restart_errored=retry_failed)
    else:
        space = {"trial": tune.grid_search(trial_grid(params)), "root": str(root), "params": params}
        tuner = tune.Tuner(trainable, param_space=space, run_config=tune.RunConfig(
            name=name, storage_path=str(storage), failure_config=tune.FailureConfig(max_failures=s["max_failures"]),
            verbose=1))
    start = time.time()
    grid = tuner.fit()
    rows = []
    for r in grid:
        # a restored trial that errored before reporting has no config in memory; its folder keeps it
        c = (r.config or json.loads((Path(r.path) / "params.json").read_text()))["trial"]
        m = r.metrics or {}
        ok = r.error is None and m.get("phase") == "done"
        rows.append({"dataset": c["dataset"], "K": c["K"], "I": c["I"], "seed": c["seed"],
                     **{k: m.get(k) if ok else None for k in TRIAL_REPORT},
                     "fingerprint": trial_fingerprint(trial_params(params, c["dataset"], c["K"], c["I"], c["seed"])),
                     "status": "done" if ok else "failed", "error": "" if r.error is None else _last_line(r.error)})
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(["dataset", "I", "K", "seed"]).reset_index(drop=True)
    n_fail = int((df["status"] == "failed").sum())
    print(f"sweep: {len(df) - n_fail} trials done, {n_fail} failed, wall time {time.time() - start:.0f} s")
    return df
