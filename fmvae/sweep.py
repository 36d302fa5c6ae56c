"""Ray Tune sweeps over K, seeds and I, on one machine or a Ray cluster, with all their state in one storage.

The storage is a local folder (default checkpoints/sweep) or any URI Ray Tune and pyarrow accept
(s3://bucket/path, gs://..., file:///...). Everything a trial needs or leaves is there:
    data/<dataset>-s<seed>-<fp>.pt                  each (data set, trial seed) prepared once by the driver
    pretrain/<dataset>-I<I>-D<D>-s<seed>-<fp>.pt    K-independent pre-training, published once by its own Tune trial
    finished/<dataset>-I<I>-K<K>-s<seed>-<fp>.json  a finished trial's record (what a later sweep reuses)
    ray/fmvae-pretrain-<fp>/, ray/fmvae-<dataset>[+<dataset>...]-<fp>/
                                                    the two Tune experiments (pre-trainings, then the K trials):
                                                    trial checkpoints (tune.Checkpoint) and Tune's own state
Trials never open the driver's disk: a trial fetches the files it reads from the storage into a
per-node cache (FMVAE_CACHE, default ~/.cache/fmvae; locked, atomic), trains in its Tune trial folder
and reports that folder to Tune as its checkpoint whenever training has saved one, so a trial
rescheduled on another node (a lost node, a retried failure) resumes from its last reported checkpoint
and, resume being bitwise, ends with the numbers of an uninterrupted run. results.csv is built from
Tune's results.

Every <fp> is a fingerprint of all the params the thing depends on (not a hand-picked subset), of the
source that trains and evaluates (config.code_digest) and of this file: a trial whose effective params
are unchanged is reused without training, one whose params changed trains anew, and pre-training is
shared only between trials whose pre-training params match. Each Ray experiment is named after its
trials' fingerprints, so Tuner.restore never hands back results of other params.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd

from . import config
from .checkpoint import CorruptCheckpoint, load_checked, provenance
from .config import code_digest
from .data import sha256_file
from .pack import train_pack
from .data.prepared import load_data, prepare_data
from .params import ParamError, Params, validate
from .pipeline import evaluate_stage, finish_phase, load_model, prepare_phase, train_stage
from .report import RESULT_COLUMNS, TRIAL_REPORT

# the params a trial reads (validate fills every key, so each of these is always present)
TRIAL_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model", "train", "pretrain", "prior_init", "svi", "joint", "semi",
                  "evaluate")
# the subset pre-training reads: trials that agree on these share one pre-trained model
PRETRAIN_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model.I", "model.D", "model.arch", "model.channels", "train",
                     "pretrain")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _select(params: Params, keys) -> dict:
    out = {}
    for key in keys:
        node = params.to_dict()
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


# how a trial runs is this file's code too (trial_params, run_trial), on top of the pipeline's;
# a packed member's is also fmvae/pack.py's
SWEEP_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
PACK_SOURCE = hashlib.sha256((Path(__file__).parent / "pack.py").read_bytes()).hexdigest()


def trial_fingerprint(params: Params) -> str:
    parts = [_select(params, TRIAL_SECTIONS), code_digest(), SWEEP_SOURCE]
    if params.sweep.pack > 1:  # a packed member's numbers round differently from a trial alone's
        parts.append({"sweep.pack": params.sweep.pack, "pack_source": PACK_SOURCE})
    return config.fingerprint(*parts)


def pretrain_fingerprint(params: Params) -> str:
    return config.fingerprint(_select(params, PRETRAIN_SECTIONS), code_digest(), SWEEP_SOURCE)


def data_key(params: Params, dataset: str) -> str:
    """The prepared data set's name in the storage, after what it depends on: the data params a
    loader reads, the seed (it draws Omniglot's split within characters and binarises `mnist`) and
    the loaders' code (a data file of another split, seed or reader is never reused). Each trial
    seed has its own, so a trial's data follow from its own params, which its fingerprint covers."""
    d = params.data
    fp = config.fingerprint(dataset, d.omniglot_split, d.partial, params.seed, code_digest())
    return f"data/{dataset}-s{params.seed}-{fp}.pt"


def pretrain_key(params: Params) -> str:
    return (f"pretrain/{params.data.name}-I{params.model.I}-D{params.model.D}-s{params.seed}"
            f"-{pretrain_fingerprint(params)}.pt")


def trial_name(params: Params) -> str:
    return (f"{params.data.name}-I{params.model.I}-K{params.model.K}-s{params.seed}"
            f"-{trial_fingerprint(params)}")


def trial_params(params: Params | dict, dataset: str, K: int, I: int, seed: int) -> Params:
    """One trial's params (from the sweep's, typed or as Tune carries them, a plain dict)."""
    params = params if isinstance(params, Params) else validate(params)
    iters = {f"{phase}.iters": n for phase, n in vars(params.sweep.iters).items() if n is not None}
    return params.override({"data.name": dataset, "model.K": K, "model.I": I, "seed": seed, "plot.factors": [0, 0],
                            "evaluate.iw_samples": 0,  # a trial reports the bound (11) and its parts, not IWAE (Figure 3)
                            "joint.snapshots": 0}  # nor the spread over the last snapshots (2 models per snapshot)
                           | iters)


class Storage:
    """A folder in any file system pyarrow knows (a local path, file://, s3://, gs://): the sweep's
    published files and records. Writes are atomic (a temporary name, then a move: a reader never
    sees half a file), and a file's sha256 sidecar is written after it and fetched with it."""

    def __init__(self, uri: str):
        from pyarrow import fs
        self.uri = uri if "://" in uri else str(Path(uri).resolve())
        self.fs, self.root = fs.FileSystem.from_uri(self.uri)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def exists(self, key: str) -> bool:
        from pyarrow import fs
        return self.fs.get_file_info(self._path(key)).type != fs.FileType.NotFound

    def _put(self, key: str, source) -> None:
        path = self._path(key)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(source, out)
        self.fs.move(tmp, path)

    def write_json(self, key: str, obj) -> None:
        self._put(key, io.BytesIO(json.dumps(obj, indent=2, sort_keys=True).encode()))

    def read_json(self, key: str):
        if not self.exists(key):
            return None
        with self.fs.open_input_stream(self._path(key)) as f:
            return json.loads(f.read())

    def publish(self, local: Path, key: str) -> None:
        """local (and its .sha256 sidecar, last) -> key: a key with a sidecar is complete."""
        for src, dst in ((local, key), (Path(f"{local}.sha256"), f"{key}.sha256")):
            with open(src, "rb") as f:
                self._put(dst, f)

    def published(self, key: str) -> bool:
        return self.exists(f"{key}.sha256")

    def cache_path(self, key: str) -> Path:
        """Where fetch puts key on this node (one cache per storage)."""
        cache = Path(os.environ.get("FMVAE_CACHE") or Path.home() / ".cache" / "fmvae")
        return cache / "sweep" / config.fingerprint(self.uri) / key

    def fetch(self, key: str) -> Path:
        """key, copied into this node's cache unless the cache already holds exactly the bytes the
        storage's sidecar names (a stale copy of a file republished under the same key is replaced),
        checked against that sidecar on arrival; locked, so a node copies each file once."""
        from filelock import FileLock
        with self.fs.open_input_stream(self._path(f"{key}.sha256")) as f:
            digest = f.read().decode()
        local, sidecar = self.cache_path(key), Path(f"{self.cache_path(key)}.sha256")
        local.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{local}.lock"):
            if not (local.exists() and sidecar.exists() and sidecar.read_text() == digest):
                tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
                with self.fs.open_input_stream(self._path(key)) as f, open(tmp, "wb") as out:
                    shutil.copyfileobj(f, out)
                if sha256_file(tmp) != digest.strip():
                    tmp.unlink()
                    raise CorruptCheckpoint(f"{self.uri}/{key} does not match its sha256 sidecar")
                os.replace(tmp, local)
                sidecar.write_text(digest)
        return local


def phase_report(phase: str, row: dict) -> dict:
    """A training log row as a Tune result: its terms under the phase's name and the phase's own step as
    Tune's timesteps_total, so that Tune's TensorBoard logger draws pretrain/*, prior_init/* and joint/*
    as separate series, each against its own iteration (ray/tune/joint/elbo, ...)."""
    return {"phase": phase, phase: {k: v for k, v in row.items() if k != "step"}, "timesteps_total": row["step"]}


def _checkpointing(workdir: Path, phase: str):
    """on_log for train_stage: every log row goes to Tune (phase_report), with the trial folder as a
    checkpoint whenever training has saved a new checkpoint in it since the last report."""
    from ray import tune
    reported = [_checkpoint_files(workdir)]

    def on_log(row, _history):
        files = _checkpoint_files(workdir)
        new = files != reported[0]
        reported[0] = files
        tune.report(phase_report(phase, row), checkpoint=tune.Checkpoint.from_directory(workdir) if new else None)
        if new and phase == "joint":
            _pause_if_asked(workdir)
    return on_log


def _checkpoint_files(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("ckpt-*.pt"))


def _restored_steps(workdir: Path) -> dict:
    """{phase: newest checkpointed step} of what this attempt restored from Tune (empty: a fresh start)."""
    steps = {}
    for path in workdir.rglob("ckpt-*.pt"):
        phase = path.parent.parent.name.removeprefix("ckpt-")
        steps[phase] = max(steps.get(phase, 0), int(path.stem.removeprefix("ckpt-")))
    return steps


def _begin_attempt(workdir: Path) -> dict:
    """A clean trial folder holding exactly the last checkpoint Tune has of this trial (a retried
    attempt on the same node must not see files its failed predecessor wrote after that checkpoint),
    and this attempt's node and restored steps appended to the folder's attempt log."""
    import ray
    from ray import tune
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(workdir))
    log = workdir / "attempts.json"
    attempts = json.loads(log.read_text()) if log.exists() else []
    attempt = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
               "restored": _restored_steps(workdir),
               "finished_phases": sorted(p.stem for p in workdir.glob("*.pt"))}
    log.write_text(json.dumps(attempts + [attempt], indent=2))
    return attempt


def _pause_if_asked(workdir: Path) -> None:
    """Fault injection for the node-loss test: the first attempt of trial K=FMVAE_SWEEP_PAUSE_K, once
    it has reported a joint checkpoint, names its node in FMVAE_SWEEP_PAUSE_DIR and waits to be killed."""
    import ray
    folder, k = os.environ.get("FMVAE_SWEEP_PAUSE_DIR"), os.environ.get("FMVAE_SWEEP_PAUSE_K")
    if not (folder and k and f"-K{k}-" in workdir.name):
        return
    if len(json.loads((workdir / "attempts.json").read_text())) == 1:
        (Path(folder) / f"K{k}").write_text(ray.get_runtime_context().get_node_id())
        time.sleep(3600)


def _threads(params: Params) -> int:
    """A trial's torch threads: its reserved CPUs, or fewer where OMP_NUM_THREADS says so (more threads
    than free cores make torch spin-wait: tests running beside each other set it to 1)."""
    threads = max(1, int(params.sweep.cpus_per_trial))
    return min(threads, int(os.environ.get("OMP_NUM_THREADS") or threads))


def _trial_folder(name: str) -> Path:
    return Path.cwd() / name  # Tune runs each trial in its own working folder on its node


def run_pretrain(config_: dict) -> None:
    """A pre-training Tune trial: train (resuming from Tune's checkpoint), then publish the model."""
    import torch
    from ray import tune

    params, storage = validate(config_["params"]), Storage(config_["storage"])
    key = pretrain_key(params)
    if storage.published(key):
        print(f"sweep: reusing pre-training {key}")
        tune.report({"phase": "done", "pretrained": key})
        return
    torch.set_num_threads(_threads(params))
    workdir = _trial_folder(Path(key).stem)
    _begin_attempt(workdir)
    data = storage.fetch(data_key(params, params.data.name))
    train_stage("pretrain", params, data, None, workdir / "pretrained.pt", workdir / "ckpt-pretrain",
                on_log=_checkpointing(workdir, "pretrain"))
    storage.publish(workdir / "pretrained.pt", key)
    tune.report({"phase": "done", "pretrained": key})


def run_trial(config_: dict) -> dict:
    """One K trial: fetch data and pre-training, prior init, joint training, evaluation (11); the
    final record goes to Tune (metrics and a checkpoint holding final.json and the model) and, for
    reuse by later sweeps, to the storage's finished/."""
    import torch
    from ray import tune

    start = time.time()
    cfg = config_ | config_["trial"]  # dataset, K, I, seed
    storage = Storage(cfg["storage"])
    params = trial_params(cfg["params"], cfg["dataset"], cfg["K"], cfg["I"], cfg["seed"])
    torch.set_num_threads(_threads(params))
    if str(cfg["K"]) == os.environ.get("FMVAE_SWEEP_FAIL_K"):  # fault injection for the tests
        storage.write_json(f"injected_failures/K{cfg['K']}-{uuid.uuid4().hex}.json", {"K": cfg["K"]})
        raise RuntimeError(f"injected failure for K={cfg['K']}")
    fp, name = trial_fingerprint(params), trial_name(params)
    record = storage.read_json(f"finished/{name}.json")
    if record is not None and record.get("fingerprint") == fp:
        print(f"sweep: reusing finished trial {name}")  # same params and code finished before: no work
        tune.report(record["metrics"])
        return record["metrics"]
    pretrained = pretrain_key(params)
    if not storage.published(pretrained):
        raise RuntimeError(f"its pre-training {pretrained} is not in the storage (did the pre-training trial fail?)")
    workdir = _trial_folder(name)
    attempt = _begin_attempt(workdir)
    data, model_in = storage.fetch(data_key(params, cfg["dataset"])), storage.fetch(pretrained)
    if "prior_init" not in attempt["finished_phases"]:
        train_stage("prior_init", params, data, model_in, workdir / "prior_init.pt", workdir / "ckpt-prior_init",
                    on_log=_checkpointing(workdir, "prior_init"))
        shutil.rmtree(workdir / "ckpt-prior_init")  # prior_init.pt is the phase's result from here on
    if "joint" not in attempt["finished_phases"]:
        train_stage("joint", params, data, workdir / "prior_init.pt", workdir / "joint.pt",
                    workdir / "ckpt-joint", on_log=_checkpointing(workdir, "joint"))
        shutil.rmtree(workdir / "ckpt-joint")
    final = _final_metrics(params, data, workdir, start, fp)
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(workdir))
    storage.write_json(f"finished/{name}.json", {"fingerprint": fp, "metrics": final,
                                                 "attempts": json.loads((workdir / "attempts.json").read_text()),
                                                 "checkpoint": tune.get_checkpoint().path})
    return final


def _final_metrics(params: Params, data: Path, workdir: Path, start: float, fp: str) -> dict:
    """Evaluate a trained trial (joint.pt in workdir) and write its final.json: the record a sweep reuses."""
    metrics = evaluate_stage(params, data, workdir / "joint.pt", workdir / "metrics.json")
    attempts = json.loads((workdir / "attempts.json").read_text())
    history = load_checked(workdir / "joint.pt")["history"]  # the joint phase's curve, saved with its model
    final = {k: metrics[k] for k in ("elbo", "recon", "kl_z", "kl_r")}
    final.update(components_used="/".join(map(str, metrics["components_used_per_factor"])),
                 **{f"{phase}_iters": getattr(params, phase).iters for phase in ("pretrain", "prior_init", "joint")},
                 batch_size=params.train.batch_size, train_points=len(load_data(params, data).x_train),
                 test_points=metrics["test_points"], wall_s=time.time() - start,
                 joint_steps=history[-1]["step"] if history else 0, phase="done", fingerprint=fp,
                 nodes="/".join(a["node"][:8] for a in attempts),
                 resumed_from="/".join(str(a["restored"].get("joint", 0)) for a in attempts))
    (workdir / "final.json").write_text(json.dumps({"fingerprint": fp, "metrics": final, "attempts": attempts},
                                                   indent=2))
    return final


def run_pack(config_: dict) -> dict:
    """A Tune trial training several K trials of one data set and I as one pack (fmvae.pack): each
    member's prior initialisation alone, their joint phase packed (each with its own checkpoints in
    its own folder inside this trial's, resumed from Tune's checkpoint of the whole folder), each
    evaluated alone and recorded in finished/ as a trial alone is. Members whose record is there with
    their fingerprint are reused without training; a member whose terms turn non-finite fails alone
    (recorded in failed/), the others go on."""
    import torch
    from ray import tune

    start = time.time()
    storage = Storage(config_["storage"])
    members = [trial_params(config_["params"], t["dataset"], t["K"], t["I"], t["seed"]) for t in config_["pack"]]
    torch.set_num_threads(_threads(members[0]))
    todo = []
    for params in members:
        fp, name = trial_fingerprint(params), trial_name(params)
        record = storage.read_json(f"finished/{name}.json")
        if record is not None and record.get("fingerprint") == fp:
            print(f"sweep: reusing finished trial {name}")
        else:
            todo.append(params)
    pack_dir = _trial_folder("pack-" + config.fingerprint(sorted(trial_name(p) for p in members)))
    _begin_attempt(pack_dir)
    runs, dirs = [], []
    for params in todo:
        pretrained = pretrain_key(params)
        if not storage.published(pretrained):
            raise RuntimeError(f"its pre-training {pretrained} is not in the storage (did the pre-training trial fail?)")
        workdir = pack_dir / trial_name(params)
        workdir.mkdir(exist_ok=True)
        shutil.copy(pack_dir / "attempts.json", workdir / "attempts.json")  # the pack's attempts are its members'
        data, model_in = storage.fetch(data_key(params, params.data.name)), storage.fetch(pretrained)
        if not (workdir / "prior_init.pt").exists():
            train_stage("prior_init", params, data, model_in, workdir / "prior_init.pt", workdir / "ckpt-prior_init")
            shutil.rmtree(workdir / "ckpt-prior_init")
        if not (workdir / "joint.pt").exists():
            runs.append(prepare_phase("joint", params, data, workdir / "prior_init.pt", workdir / "ckpt-joint"))
            dirs.append(workdir)
    if runs:
        results = train_pack("joint", [r.model for r in runs], [r.data for r in runs], [r.cfg for r in runs],
                             [r.ckpt.folder for r in runs], [r.fingerprint for r in runs],
                             on_logs=[_checkpointing(pack_dir, "joint")] + [None] * (len(runs) - 1),
                             metas=[provenance(r.params) for r in runs])
        for run, result, workdir in zip(runs, results, dirs):
            name = trial_name(run.params)
            if isinstance(result, Exception):
                storage.write_json(f"failed/{name}.json", {"fingerprint": run.fingerprint, "error": str(result)})
                continue
            finish_phase(run, result, workdir / "joint.pt")
            shutil.rmtree(workdir / "ckpt-joint")
    finals = {}
    for params in todo:
        workdir, fp, name = pack_dir / trial_name(params), trial_fingerprint(params), trial_name(params)
        if (workdir / "joint.pt").exists():
            finals[name] = _final_metrics(params, storage.fetch(data_key(params, params.data.name)), workdir,
                                          start, fp)
    tune.report({"phase": "done", "members": len(members), "trained": len(finals)},
                checkpoint=tune.Checkpoint.from_directory(pack_dir))
    for name, final in finals.items():
        storage.write_json(f"finished/{name}.json", {
            "fingerprint": final["fingerprint"], "metrics": final,
            "attempts": json.loads((pack_dir / name / "attempts.json").read_text()),
            "checkpoint": f"{tune.get_checkpoint().path}/{name}"})
    return {"phase": "done"}


def _last_line(error: BaseException) -> str:
    """The exception's own message (Ray wraps it in a traceback whose first line names the actor)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1] if lines else type(error).__name__)[:200]


def trial_grid(params: Params) -> list[dict]:
    """Every trial, K slowest: the first trials need different pre-trainings (data set x seed x I)
    and run side by side, instead of queueing behind one shared pre-training."""
    s = params.sweep
    return [{"dataset": d, "K": k, "I": i, "seed": seed} for k in s.K for seed in s.seeds for d in s.data for i in s.I]


def pack_grid(params: Params) -> list[list[dict]]:
    """The trials in packs of at most sweep.pack, each of one data set and I (one network shape),
    in trial_grid's order within each."""
    groups: dict = {}
    for t in trial_grid(params):
        groups.setdefault((t["dataset"], t["I"]), []).append(t)
    size = params.sweep.pack
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def pretrain_grid(params: Params) -> list[Params]:
    """One pre-training per distinct pre-training fingerprint, with the params of its first trial."""
    out = {}
    for t in trial_grid(params):
        p = trial_params(params, t["dataset"], t["K"], t["I"], t["seed"])
        out.setdefault(pretrain_key(p), p)
    return list(out.values())


def experiment_name(params: Params) -> str:
    """Named after every trial's fingerprint (and the failure policy Tune stores with the experiment)."""
    fps = sorted(trial_fingerprint(trial_params(params, t["dataset"], t["K"], t["I"], t["seed"]))
                 for t in trial_grid(params))
    pack = params.sweep.pack  # packs are other Tune trials (run_pack, one per pack)
    return (f"fmvae-{'+'.join(params.sweep.data)}{f'-pack{pack}' if pack > 1 else ''}-"
            f"{config.fingerprint(fps, params.sweep.max_failures)}")


def pretrain_experiment_name(params: Params) -> str:
    keys = sorted(pretrain_key(p) for p in pretrain_grid(params))
    return f"fmvae-pretrain-{config.fingerprint(keys, params.sweep.max_failures)}"


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
