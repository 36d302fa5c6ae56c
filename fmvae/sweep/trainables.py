"""What runs inside a Tune trial: a pre-training, one K trial, or a pack of K trials; each begins from
Tune's last checkpoint of its folder and reports its log rows (and new checkpoints) to Tune."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from fmvae import provenance
from fmvae.core.pipeline import evaluate_stage, finish_phase, prepare_phase, train_stage
from fmvae.data.prepared import load_data
from fmvae.io import load_checked
from fmvae.pack.train import train_pack
from fmvae.params import Params, validate
from fmvae.sweep.keys import data_key, pretrain_key, trial_fingerprint, trial_name, trial_params
from fmvae.sweep.storage import Storage


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
    pack_dir = _trial_folder("pack-" + provenance.fingerprint(sorted(trial_name(p) for p in members)))
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
                             metas=[provenance.record(r.params) for r in runs])
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
