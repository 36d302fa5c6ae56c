"""--figure3: every K of each data set and seed trained as one pack (fmvae.pack), scaled to the budget."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
import yaml

from fmvae import data as data_mod
from fmvae.core import build, evaluate as ev
from fmvae.core.loop import TrainData
from fmvae.core.phases import init_prior, pretrain
from fmvae.io import atomic_write_text
from fmvae.params import validate
from fmvae.tools import bench
from fmvae.tools.gpu_check.common import PRESET, log, phase_config


FIGURE3_PRESETS = {"binarized_mnist": PRESET, "omniglot": PRESET.parent / "omniglot_paper.yaml"}


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def figure3_check(args, device, out: Path, t_start: float) -> dict:
    """Figure 3 from one call: per data set and seed, one pre-training (the paper's schedule, scaled
    to the budget), each K's prior initialisation, then every K of that data set and seed jointly
    trained as one pack (fmvae.pack), each member evaluated alone; results.csv and the figures are
    rewritten as each pack finishes. The scale is measured: short timed runs of the pre-training
    step and of the packed joint step (throwaway models) give the rates the schedule is fitted to."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    from fmvae.reporting import figure3
    from fmvae.pack.train import train_pack

    folders = {"binarized_mnist": args.data, "omniglot": args.omniglot}
    datasets = [d for d in ("binarized_mnist", "omniglot") if folders[d]]
    mode = "graph" if device.type == "cuda" else "eager"
    flags = bench.MODES[mode]
    rows, runs = [], [(d, s) for d in datasets for s in args.seeds]
    for n, (dataset, seed) in enumerate(runs):
        params = validate(yaml.safe_load(FIGURE3_PRESETS[dataset].read_text()) | {"seed": seed})
        ds = data_mod.load(dataset, Path(folders[dataset]), seed, "characters", False)
        if args.tiny:
            ds.x_train, ds.x_test = ds.x_train[:512], ds.x_test[:256]
            params = params.override({"prior_init.init_points": 512})
        data = TrainData(ds.x_train.to(device), ds.to_float)
        cfgs = {p: phase_config(params, p, flags) for p in ("pretrain", "prior_init", "joint")}

        def members():
            out_ = []
            for k in args.figure3_K:
                torch.manual_seed(seed)
                out_.append(build.build_model(params.override({"model.K": k}), ds).to(device))
            return out_

        # the rates: 30 timed pre-training steps and 10 packed joint steps, after a warm-up (capture)
        probe = members()[0]
        short = lambda cfg, i: dataclasses.replace(cfg, iters=i, log_every=i, kl_anneal_iters=1, snapshots=0)
        pretrain(probe, data, short(cfgs["pretrain"], 10))
        pre_rate = 30 / _timed(lambda: pretrain(probe, data, short(cfgs["pretrain"], 30)), device)
        pack_models = members()
        for m in pack_models:
            with torch.no_grad():
                mu, logvar = m.encode(data.to_float(data.x[:2048]))
            m.prior.init_from_encodings(mu, logvar.exp(), len(data), torch.Generator().manual_seed(seed))
        probe_dir = out / "probe"  # one fingerprint per probe length: the timed run must not resume the warm-up's
        pack = lambda i: train_pack("joint", pack_models, data, [short(cfgs["joint"], i)] * len(pack_models),
                                    [probe_dir / f"{k}" for k in args.figure3_K], [str(i)] * len(pack_models))
        pack(5)
        pack_rate = 10 / _timed(lambda: pack(10), device)
        left = args.total_s - (time.perf_counter() - t_start) - 60.0 * (len(runs) - n)  # evaluation, figures
        share = max(10.0, left / (len(runs) - n))
        full = {p: getattr(params, p).iters for p in ("pretrain", "prior_init", "joint")}
        # prior initialisation runs on stored encodings, per member: about 5x a network step
        predicted = full["pretrain"] / pre_rate + full["joint"] / pack_rate + \
            len(pack_models) * full["prior_init"] / (5 * pre_rate)
        scale = min(1.0, share / predicted)
        iters = {p: max(10, int(v * scale)) for p, v in full.items()}
        if args.tiny:
            iters, scale = {"pretrain": 20, "prior_init": 10, "joint": 20}, 20 / full["pretrain"]
        shutil.rmtree(probe_dir, ignore_errors=True)
        log(f"figure3 {dataset} seed {seed}: pre-training {pre_rate:.3g} it/s, pack of {len(pack_models)} "
            f"{pack_rate:.3g} it/s ({pack_rate * len(pack_models):.3g} trial-it/s); schedule x{scale:.3f}: {iters}")
        sched = {p: dataclasses.replace(cfgs[p], iters=iters[p], log_every=max(1, iters[p] // 20)) for p in iters}
        sched["pretrain"] = dataclasses.replace(sched["pretrain"], kl_anneal_iters=max(
            1, int(cfgs["pretrain"].kl_anneal_iters * scale)))
        sched["joint"] = dataclasses.replace(sched["joint"], snapshots=0)
        base = members()[0]
        t = _timed(lambda: pretrain(base, data, sched["pretrain"]), device)
        models = members()
        for m in models:
            m.load_state_dict(base.state_dict() | {k: v for k, v in m.state_dict().items() if k.startswith("prior.")})
        t_init = _timed(lambda: [init_prior(m, data, sched["prior_init"]) for m in models], device)
        folder = out / f"{dataset}-s{seed}"
        trained = {}
        t_joint = _timed(lambda: trained.update(results=train_pack(
            "joint", models, data, [sched["joint"]] * len(models), [folder / f"K{k}" for k in args.figure3_K],
            ["figure3"] * len(models))), device)
        results = trained["results"]
        x_test = ds.x_test.to(device)
        for k, m, res in zip(args.figure3_K, models, results):
            row = {"dataset": dataset, "K": k, "I": 1, "seed": seed, "pretrain_iters": iters["pretrain"],
                   "prior_init_iters": iters["prior_init"], "joint_iters": iters["joint"],
                   "batch_size": sched["joint"].batch_size, "train_points": len(ds.x_train),
                   "test_points": len(ds.x_test), "wall_s": t + t_init + t_joint, "fingerprint": "gpu_check"}
            if isinstance(res, Exception):
                rows.append(row | {"status": "failed", "error": str(res)})
                continue
            torch.manual_seed(seed)
            bound = ev.evaluate_bound(m, x_test, ds.to_float)
            rows.append(row | {t_: bound[t_] for t_ in ("elbo", "recon", "kl_z", "kl_r")} | {
                "components_used": "/".join(map(str, ev.components_in_use(m))), "status": "done", "error": ""})
        log(f"figure3 {dataset} seed {seed}: pre-training {t:.0f} s, prior init {t_init:.0f} s, "
            f"pack {t_joint:.0f} s ({iters['joint'] * len(models) / t_joint:.0f} trial-it/s)")
        import pandas as pd
        df = pd.DataFrame(rows).reindex(columns=figure3.RESULT_COLUMNS)
        atomic_write_text(out / "results.csv", df.to_csv(index=False))
        figure3.figure3(df, out)
    return {"rows": rows}
