"""The default check: binarised MNIST with the mnist_paper preset through the fastest step, scaled to the budget."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml

from fmvae import data as data_mod
from fmvae.core import build
from fmvae.core import evaluate as ev
from fmvae.core.loop import TrainData
from fmvae.core.phases import PHASES
from fmvae.io import atomic_write_json, atomic_write_text
from fmvae.params import validate
from fmvae.tools import bench
from fmvae.tools.gpu_check.common import PRESET, fastest_mode, float32_mnist, log, phase_config, run_bench, schedule, train_phase
from fmvae.tools.gpu_check.orders import compare_orders


PAPER_ELBO = -85.77  # binarised MNIST, K = 512 (Figure 3)


def summary_text(env, phases, scale, metrics, mode, total_s, full) -> str:
    lines = ["# GPU check: binarised MNIST, mnist_paper preset (I = 1, K = 512, D = 64)", "",
             f"- Device: {env.get('gpu')} (torch {env['torch']}, CUDA {env.get('cuda', '-')})",
             f"- Step: {mode}; schedule scale {scale:.3f} of the paper's "
             f"{full['pretrain']:.0f} + {full['prior_init']:.0f} + {full['joint']:.0f} iterations"
             + (" (scaled down to fit the time budget)" if scale < 1 else ""), "",
             "| phase | iterations | wall s | it/s | mode |", "|---|---|---|---|---|"]
    for name, info in phases.items():
        lines.append(f"| {name} | {info['iters']} | {info['wall_s']:.1f} | {info['it_s']:.0f} | {info['mode']} |")
    total_train = sum(i["wall_s"] for i in phases.values())
    rates = {n: i["it_s"] for n, i in phases.items()}
    full_s = sum(full[n] / rates[n] for n in phases)
    lines += ["", f"- Training wall time {total_train:.0f} s; the full paper schedule at these rates: "
              f"{full_s:.0f} s ({full_s / 60:.1f} min)."]
    if metrics:
        lines += [f"- Test ELBO (11): {metrics['elbo']:.2f} nats (paper: {PAPER_ELBO} at the full schedule); "
                  f"recon {metrics['recon']:.2f}, KL[z] {metrics['kl_z']:.2f}, KL[r] {metrics['kl_r']:.2f}",
                  f"- IWAE ({metrics.get('iwae_samples')} samples, {metrics.get('iwae_points')} test points): "
                  f"{metrics.get('iwae', float('nan')):.2f}; ELBO on those points {metrics.get('elbo_on_iwae_points', float('nan')):.2f}",
                  f"- Components in use: {metrics['components_used']}"]
    lines.append(f"- Whole check: {total_s:.0f} s")
    return "\n".join(lines) + "\n"


def mnist_check(args, device, out: Path, t_start: float, env: dict) -> dict:
    """The MNIST check (the default; --orders compares joint-step orders instead): see the package's docstring."""
    folder = Path(args.data)
    params = validate(yaml.safe_load(PRESET.read_text()))
    ds = data_mod.load("binarized_mnist", folder, params.seed)
    if args.tiny:
        ds.x_train, ds.x_test = ds.x_train[:512], ds.x_test[:256]
        params = params.override({"model.K": 16, "prior_init.init_points": 512})
        args.iw_samples, args.iw_points = 10, 16

    if args.orders:
        mode = args.mode or ("compiled" if device.type == "cuda" else "eager")
        if args.tiny:
            args.orders_iters = [30, 10, 30]
        return {"orders": compare_orders(args, params, ds, device, mode, out)}

    rows = []
    if not args.no_bench:
        t = time.perf_counter()
        rows = run_bench(args, device, out, args.bench_compile_bf16)
        log(f"benchmark: {time.perf_counter() - t:.0f} s")
    mode = fastest_mode(rows, device)
    if device.type == "cpu" and mode == "graph":
        mode = "eager"
    full = {p: getattr(params, p).iters for p in ("pretrain", "prior_init", "joint")}
    if args.tiny:
        iters, scale = {"pretrain": 30, "prior_init": 10, "joint": 30}, 30 / full["pretrain"]
    else:
        timed = [r for r in float32_mnist(rows) if r["mode"] == mode]
        best = max(timed, key=lambda r: r["K"]) if timed else {"plain_it_s": 200.0, "joint_it_s": 200.0}
        # prior init runs on stored encodings: far cheaper than a network step; 5x is a safe guess
        rates = {"pretrain": best["plain_it_s"], "prior_init": 5 * best["joint_it_s"], "joint": best["joint_it_s"]}
        left = args.total_s - (time.perf_counter() - t_start) - 90.0  # evaluation, figures, compile of the phases
        args.budget_s = max(30.0, min(args.budget_s, left))
        iters, scale = schedule(params, rates, args.budget_s)
    if scale < 1:
        log(f"the paper's schedule ({full}) does not fit {args.budget_s:.0f} s at the measured rates: "
            f"every phase scaled by {scale:.3f} to {iters}")

    torch.manual_seed(params.seed)
    model = build.build_model(params, ds).to(device)
    labels = None
    data = TrainData(ds.x_train.to(device), ds.to_float, labels)
    phases, flags = {}, bench.MODES[mode]
    for name, fn in PHASES.items():
        n = iters[name]
        cfg = phase_config(params, name, flags, iters=n, log_every=max(1, min(params.train.log_every, n // 40)))
        if name == "pretrain":
            cfg = dataclasses.replace(cfg, kl_anneal_iters=max(1, int(cfg.kl_anneal_iters * n / full[name])))
        _, phases[name] = train_phase(name, fn, model, data, cfg, out)
        atomic_write_json(out / "phases.json", phases)

    t = time.perf_counter()
    x_test = ds.x_test.to(device)
    res = ev.evaluate_bound(model, x_test, ds.to_float)
    metrics = {k: res[k] for k in ("elbo", "recon", "kl_z", "kl_r")}
    metrics["components_used"] = ev.components_in_use(model)
    gen = torch.Generator().manual_seed(params.seed)
    subset = x_test[torch.randperm(len(x_test), generator=gen)[:args.iw_points].to(device)]
    t_iw = time.perf_counter()
    metrics["iwae"] = ev.importance_weighted_log_likelihood(model, subset, ds.to_float, args.iw_samples)
    metrics["iwae_s"] = time.perf_counter() - t_iw
    metrics["elbo_on_iwae_points"] = ev.evaluate_bound(model, subset, ds.to_float)["elbo"]
    metrics |= {"iwae_samples": args.iw_samples, "iwae_points": int(subset.shape[0]), "test_points": len(x_test),
                "paper_elbo": PAPER_ELBO, "schedule": iters, "schedule_scale": scale, "mode": mode,
                "phases": phases, "environment": env}
    atomic_write_json(out / "metrics.json", metrics)
    log(f"evaluation: {time.perf_counter() - t:.0f} s (IWAE {metrics['iwae_s']:.0f} s)")

    import matplotlib
    matplotlib.use("Agg")  # files only
    from fmvae.reporting import plots
    torch.manual_seed(params.seed)
    plots.sample_grid(model, ds, [0, 0], 16, out / "samples_grid.png")
    plots.cluster_figure(model, ds, 0, out / "clusters.png")
    plots.training_curves([out / f"curve_{n}.csv" for n in PHASES], out / "training_curves.png")

    text = summary_text(env, phases, scale, metrics, mode, time.perf_counter() - t_start, full)
    atomic_write_text(out / "summary.md", text)
    print(text, flush=True)
    return metrics
