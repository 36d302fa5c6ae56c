"""One function per pipeline stage, shared by `stages/*.py` (DVC) and `stages/sweep.py` (Ray Tune).

Each reads its inputs, checks them against params before any work, trains or
evaluates, and writes its outputs atomically. Training stages checkpoint into
`ckpt_dir` and resume from it when rerun with the same settings and inputs.
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fmvae import data as data_mod, provenance
from fmvae.core import build, evaluate as ev
from fmvae.core.loop import TrainData
from fmvae.core.model import FMVAE
from fmvae.core.phases import PHASES
from fmvae.data import sha256_file
from fmvae.data.prepared import load_data
from fmvae.io import CheckpointDir, atomic_write_json, atomic_write_text, load_checked, save_checked
from fmvae.params import Params, TrainConfig, train_config


def save_model(model: FMVAE, path: Path, params: Params, history: list[dict], with_prior: bool = True) -> None:
    """Networks (and q(xi) unless pre-training, which does not depend on K) with their shapes and provenance."""
    state = {"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
             "prior": model.prior.state_dict() if with_prior else None}
    save_checked({"model": state, "config": build.model_config(model, with_prior), "history": history,
                  "provenance": provenance.record(params)}, path)


def load_model(params: Params, ds: data_mod.Dataset, path: Path, dev: torch.device) -> FMVAE:
    model = build.build_model(params, ds)
    saved = load_checked(path)
    build.check_model_config(saved["config"], model, path)
    model.encoder.load_state_dict(saved["model"]["encoder"])
    model.decoder.load_state_dict(saved["model"]["decoder"])
    if saved["model"]["prior"] is not None:
        model.prior.load_state_dict(saved["model"]["prior"])
    return model.to(dev)


def load_trained(params: Params, data_path: Path, model_path: Path) -> tuple[data_mod.Dataset, FMVAE]:
    """The prepared data and the trained model on params' device, for the stages after training."""
    ds = load_data(params, data_path)
    return ds, load_model(params, ds, model_path, build.device(params))


def write_curve(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


@dataclass
class PhaseRun:
    """What a training phase needs, read and checked (prepare_phase): the model, the device-resident
    data, the phase's config, its fingerprint (settings, shapes, input files and the code: a
    checkpoint of other code is never resumed) and its checkpoint folder (one per fingerprint)."""
    phase: str
    params: Params
    model: FMVAE
    data: TrainData
    cfg: TrainConfig
    fingerprint: str
    ckpt: CheckpointDir
    kwargs: dict


def prepare_phase(phase: str, params: Params, data_path: Path, model_in: Path | None, ckpt_dir: Path) -> PhaseRun:
    dev = build.device(params)
    ds = load_data(params, data_path)
    if model_in is None:
        torch.manual_seed(params.seed)  # network initialisation
        model = build.build_model(params, ds).to(dev)
    else:
        model = load_model(params, ds, model_in, dev)
    cfg = train_config(params, phase)
    labels = data_mod.semi_supervised_labels(ds.y_train, params.semi.fraction, model.I, params.seed)
    data = TrainData(ds.x_train.to(dev), ds.to_float, None if labels is None else labels.to(dev))
    inputs = [sha256_file(p) for p in (data_path, model_in) if p is not None]
    fp = provenance.fingerprint(phase, cfg.__dict__, build.model_config(model, phase != "pretrain"), inputs,
                            provenance.code_digest())
    kwargs = {}
    if phase == "joint" and params.semi.delta > 0 and labels is not None:
        kwargs["gradient_factors"] = list(range(len(ds.property_K)))
    return PhaseRun(phase, params, model, data, cfg, fp, CheckpointDir(Path(ckpt_dir) / fp), kwargs)


def curve_writer(curve_out: Path | None, on_log=None):
    """on_log for a phase: the curve is rewritten (atomically) at every log step (`dvc plots show`
    mid-run), then on_log(row, history) if given."""
    def log(row, history):
        if curve_out is not None:
            write_curve(history, curve_out)
        if on_log is not None:
            on_log(row, history)
    return log


def finish_phase(run: PhaseRun, history: list[dict], model_out: Path, curve_out: Path | None = None,
                 snapshots_out: Path | None = None) -> None:
    """Save the trained model, the snapshots (joint), the curve; drop other settings' checkpoints."""
    params, model = run.params, run.model
    save_model(model, model_out, params, history, with_prior=run.phase != "pretrain")
    if snapshots_out is not None:
        save_checked({"snapshots": run.ckpt.snapshots(up_to=run.cfg.iters), "config": build.model_config(model),
                      "provenance": provenance.record(params)}, snapshots_out)
    if curve_out is not None:
        write_curve(history, curve_out)
    run.ckpt.prune_siblings()


def train_stage(phase: str, params: Params, data_path: Path, model_in: Path | None, model_out: Path,
                ckpt_dir: Path, curve_out: Path | None = None, on_log=None,
                snapshots_out: Path | None = None) -> list[dict]:
    """pretrain / prior_init / joint: load, check, train with resume, save. model_out holds the
    averaged weights (train.ema_decay); snapshots_out (joint) the models at the last steps, each
    averaged and as the last iterate, for evaluate_stage's spread."""
    start = time.time()
    run = prepare_phase(phase, params, data_path, model_in, ckpt_dir)
    history = PHASES[phase](run.model, run.data, run.cfg, run.ckpt, run.fingerprint, curve_writer(curve_out, on_log),
                            meta=provenance.record(params), **run.kwargs)
    finish_phase(run, history, model_out, curve_out, snapshots_out)
    last = history[-1] if history else {}
    print(f"{phase}: done in {time.time() - start:.0f} s; " + ", ".join(f"{k}={v:.3f}" for k, v in last.items()
                                                                        if k in ("elbo", "recon", "kl", "kl_z", "kl_r")))
    return history


@torch.no_grad()
def snapshot_bounds(params: Params, ds: data_mod.Dataset, path: Path, dev: torch.device) -> dict:
    """Test bound (11) of each snapshot of the joint phase, averaged and as the last iterate, with the
    same random numbers for each (seeded): how much the reported number depends on where training stopped."""
    saved = load_checked(path)
    model = build.build_model(params, ds).to(dev)
    build.check_model_config(saved["config"], model, path)
    x_test = ds.x_test.to(dev)
    out = {"steps": [s["step"] for s in saved["snapshots"]], "elbo_average": [], "elbo_last_iterate": []}
    for snap in saved["snapshots"]:
        for kind in ("average", "last_iterate"):
            model.load_state_dict(snap[kind])
            torch.manual_seed(params.seed)
            out[f"elbo_{kind}"].append(ev.evaluate_bound(model, x_test, ds.to_float,
                                                         samples=params.evaluate.recon_samples)["elbo"])
    for kind in ("average", "last_iterate"):
        values = out[f"elbo_{kind}"]
        out[f"spread_{kind}"] = max(values) - min(values) if values else None
    return out


def evaluate_stage(params: Params, data_path: Path, model_path: Path, metrics_out: Path | None = None,
                   snapshots_path: Path | None = None) -> dict:
    """Test bound (11) and its parts, components in use, IWAE, accuracies.

    Three files, side by side: metrics.json holds only the numbers a researcher compares across
    runs (what `dvc metrics show` and `dvc exp show` print, in a 120-column terminal: the bound's
    terms, IWAE, components in use, `acc_<property>` for argmax q(r|x) against the labels of a
    semi-supervised factor, or `cluster_acc_<property>` for the best factor after matching
    clusters when trained without labels); evaluation.json the detail behind them (per-factor KLs and
    components, the IWAE setting and its points' ELBO, per-factor cluster accuracies);
    provenance.json what produced them (params, versions, commit, digests of the data and model
    files). Returns metrics and details in one dict."""
    dev = build.device(params)
    ds = load_data(params, data_path)
    model = load_model(params, ds, model_path, dev)
    e = params.evaluate
    torch.manual_seed(params.seed)
    x_test = ds.x_test.to(dev)
    res = ev.evaluate_bound(model, x_test, ds.to_float, samples=e.recon_samples)
    used = ev.components_in_use(model)
    metrics = {k: res[k] for k in ("elbo", "recon", "kl_z", "kl_r")} | {"components": sum(used)}
    details = {"kl_z_per_factor": res["kl_z_per_factor"], "kl_r_per_factor": res["kl_r_per_factor"],
               "components_used_per_factor": used, "test_points": int(x_test.shape[0])}
    if e.iw_samples > 0:  # on a seeded random subset (test sets may be sorted by class), with its own ELBO
        n = min(e.iw_points, x_test.shape[0])
        subset = x_test[torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(params.seed))[:n].to(dev)]
        metrics["iwae"] = ev.importance_weighted_log_likelihood(model, subset, ds.to_float, e.iw_samples)
        details["elbo_on_iwae_points"] = ev.evaluate_bound(model, subset, ds.to_float, samples=e.recon_samples)["elbo"]
        details["iwae_samples"], details["iwae_points"] = e.iw_samples, n
    if ds.info:  # e.g. a partial CelebA: how many images were listed, absent, kept per partition
        details["data"] = ds.info
    if snapshots_path is not None and Path(snapshots_path).exists():
        snaps = snapshot_bounds(params, ds, Path(snapshots_path), dev)
        details["snapshots"] = snaps
        if len(snaps["steps"]) > 1:  # max - min of the averaged model's bound over the last snapshots
            metrics["elbo_spread"] = snaps["spread_average"]
    if ds.y_test is not None:
        a = res["assignments"]
        semi = params.semi.fraction > 0
        for p, name in enumerate(ds.property_names):
            if semi and p < model.I:  # the factor clamped to this property in training
                metrics[f"acc_{name}"] = ev.supervised_accuracy(a[:, p], ds.y_test[:, p])
            per_factor = [ev.matched_accuracy(a[:, i], ds.y_test[:, p]) for i in range(model.I)]
            details[f"cluster_accuracy_{name}_per_factor"] = per_factor
            if not semi:  # unsupervised: the factor that best recovers it, after matching clusters
                metrics[f"cluster_acc_{name}"] = max(per_factor)
    if metrics_out is not None:
        metrics_out = Path(metrics_out)
        inputs = {os.path.relpath(p): sha256_file(p) for p in (data_path, model_path)}  # repo-relative under DVC
        inputs |= {os.path.relpath(snapshots_path): sha256_file(snapshots_path)} if details.get("snapshots") else {}
        atomic_write_json(metrics_out.with_name("provenance.json"), provenance.record(params) | {"inputs": inputs}
                          | ({"data": ds.info} if ds.info else {}))
        atomic_write_json(metrics_out.with_name("evaluation.json"), details)
        atomic_write_json(metrics_out, metrics)
    print("evaluate: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics | details
