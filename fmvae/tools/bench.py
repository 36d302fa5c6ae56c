"""Benchmark: `python -m fmvae.tools.bench [--device auto] [--tiny] [--modes ...] [--out reports/bench.json]`;
`python -m fmvae.tools.bench --pack 1 4 9 18 36` times packed trials instead (bench_packs);
`python -m fmvae.tools.bench --levers` issue 34's levers off and on (bench_levers).

Measures, side by side in one run (plain and joint blocks interleaved, warm-up
excluded, median of the repeats):
  - iterations/s of a plain VAE step (same networks, N(0, I) prior) and of the joint
    FM-VAE step (default order: local step, Adam step, SVI step), and their time ratio;
    28x28 model at I = 1, D = 64, K in {2, 64, 512}; CelebA-shaped model at I = 5,
    D = 64, K = (2, 2, 2, 64, 64) with the semi-supervised term on;
  - each in the execution modes asked for: "eager" (plain PyTorch), "graph" (the whole
    iteration replayed from a CUDA graph; CUDA only) and "compiled" (torch.compile of the
    differentiable part, plus the CUDA graph on CUDA; only at the largest K, to bound
    compile time), with bf16 autocast off and/or on;
  - evaluation throughput of the bound (11) and of the importance-weighted estimate;
  - peak memory (GPU on CUDA, resident set otherwise).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from fmvae.core.evaluate import evaluate_bound, importance_weighted_log_likelihood
from fmvae.core.loop import Batcher, TrainData, make_runner
from fmvae.core.model import FMVAE
from fmvae.core.phases import joint_step, optimizer, pretrain_step
from fmvae.params import TrainConfig

MODES = {"eager": dict(compile=False, cuda_graph=False), "graph": dict(compile=False, cuda_graph=True),
         "compiled": dict(compile=True, cuda_graph=True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pool(kind: str, n: int, device) -> tuple[torch.Tensor, callable]:
    g = torch.Generator().manual_seed(0)
    if kind == "binary":
        return (torch.rand(n, 1, 28, 28, generator=g) < 0.13).to(torch.uint8).to(device), lambda t: t.float()
    return torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8).to(device), lambda t: t.float() / 127.5 - 1


def _models(arch, x_shape, K, D, device, delta, x, to_float, labels, cfg, n_total):
    torch.manual_seed(0)
    plain = FMVAE(arch, x_shape, K, D).to(device)
    joint = FMVAE(arch, x_shape, K, D).to(device)
    joint.load_state_dict(plain.state_dict())
    with torch.no_grad():
        mu, logvar = joint.encode(to_float(x[:2048]))
    joint.prior.init_from_encodings(mu, logvar.exp(), n_total, torch.Generator().manual_seed(0))
    gradient = list(range(3)) if delta > 0 else []
    if gradient:
        joint.prior.use_gradient_factors(gradient)
    p_opt = optimizer(plain.network_parameters(), cfg)
    j_params = joint.network_parameters() + (joint.prior.gradient_parameters() if gradient else [])
    j_opt = optimizer(j_params, cfg)
    p_run = make_runner(pretrain_step(plain, p_opt, cfg), Batcher(TrainData(x, to_float), cfg.batch_size, 0), cfg,
                        p_opt)
    j_run = make_runner(joint_step(joint, j_opt, cfg, n_total, j_params),
                        Batcher(TrainData(x, to_float, labels), cfg.batch_size, 0), cfg, j_opt, joint.prior)
    return plain, joint, p_run, j_run


def _time_side_by_side(steps: dict, iters: int, repeats: int, warmup: int, device) -> dict:
    for fn in steps.values():
        for i in range(warmup):
            fn(i)
    _sync(device)
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():  # interleaved, so drift affects both alike
            start = time.perf_counter()
            for i in range(iters):
                fn(i)
            _sync(device)
            times[name].append((time.perf_counter() - start) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_training(model: str, K, args, device, mode: str = "eager", bf16: bool = False) -> dict:
    arch, kind, x_shape, D = ("conv28", "binary", (1, 28, 28), 64) if model == "mnist28" else \
        ("conv64", "rgb", (3, 64, 64), 64)
    batch = args.batch_size if not args.tiny else 8
    x, to_float = _pool(kind, 4096 if not args.tiny else 256, device)
    n_total = 50000 if model == "mnist28" else 162770
    delta = 1000.0 if model == "celeba64" else 0.0
    labels = None
    if delta > 0:  # three properties observed on 40% of images, like the paper's CelebA run
        g = torch.Generator().manual_seed(1)
        labels = torch.full((len(x), 5), -1, dtype=torch.long)
        seen = torch.rand(len(x), generator=g) < 0.4
        labels[seen, :3] = torch.randint(0, 2, (int(seen.sum()), 3), generator=g)
        labels = labels.to(device)
    cfg = TrainConfig(iters=0, batch_size=batch, lr=1e-4, delta=delta, bf16=bf16, tau0=2000.0, kappa=0.7,
                      **MODES[mode])
    if cfg.compile:
        torch._dynamo.reset()  # each configuration compiles afresh, never past dynamo's recompile limit
    plain, joint, p_step, j_step = _models(arch, x_shape, K, D, device, delta, x, to_float, labels, cfg, n_total)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters = args.celeba_iters if model == "celeba64" and args.celeba_iters else args.iters
    t = _time_side_by_side({"plain": p_step, "joint": j_step}, iters, args.repeats, args.warmup, device)
    row = {"model": model, "K": K if isinstance(K, int) else list(K), "device": str(device), "batch": batch,
           "mode": mode, "bf16": bf16, "plain_it_s": 1 / t["plain"], "joint_it_s": 1 / t["joint"],
           "ratio": t["joint"] / t["plain"], "peak_memory_mb": _peak_memory_mb(device)}
    if model == "mnist28" and K == max(args.mnist_K) and mode == args.modes[0] and bf16 == args.bf16[0]:
        n_eval = args.eval_points if not args.tiny else 64
        xe = x[:n_eval] if n_eval <= len(x) else x[torch.randint(len(x), (n_eval,), device=device)]
        for name, fn in (("eval_images_s", lambda: evaluate_bound(joint, xe, to_float, batch=1000)),
                         ("iwae_images_s", lambda: importance_weighted_log_likelihood(
                             joint, xe[: max(1, n_eval // 10)], to_float, args.iw_samples))):
            fn()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            row[name] = (n_eval if name == "eval_images_s" else max(1, n_eval // 10)) / (time.perf_counter() - start)
        row["iw_samples"] = args.iw_samples
    return row


LEVERS = {"off": {}, "swap": {"swap_weight": 10.0}, "adversary": {"adversary_weight": 10.0},
          "swap+adversary": {"swap_weight": 10.0, "adversary_weight": 10.0}, "usage": {"usage_weight": 1.0}}


def bench_levers(args, device) -> list[dict]:
    """Joint-step iterations/s with issue 34's levers (fmvae.core.levers) off and on, side by side: the
    composition proxy's model (conv28, I = 2, K = (10, 10), D = 32, the digit labelled on 10% of images)
    and the CelebA CPU preset's (conv64 at widths 32-64-128-256, I = 5, K = (2, 2, 2, 64, 64), D = 64,
    three properties labelled on 40%); eager steps, Delta on, as in those runs."""
    from fmvae.core.levers import Adversary
    rows = []
    shapes = [("mnist_compose", "conv28", "binary", (1, 28, 28), [10, 10], 32, 1, 0.1, 300.0, ()),
              ("celeba_cpu", "conv64", "rgb", (3, 64, 64), [2, 2, 2, 64, 64], 64, 3, 0.4, 1000.0, (32, 64, 128, 256))]
    for name, arch, kind, x_shape, K, D, named, fraction, delta, channels in shapes:
        if name == "celeba_cpu" and args.no_celeba:
            continue
        x, to_float = _pool(kind, 1024 if not args.tiny else 64, device)
        g = torch.Generator().manual_seed(1)
        labels = torch.full((len(x), len(K)), -1, dtype=torch.long)
        seen = torch.rand(len(x), generator=g) < fraction
        labels[seen, :named] = torch.stack([torch.randint(0, K[i], (int(seen.sum()),), generator=g)
                                            for i in range(named)], 1)
        labels = labels.to(device)
        steps = {}
        for lever, settings in LEVERS.items():
            cfg = TrainConfig(iters=0, batch_size=args.batch_size if not args.tiny else 8, delta=delta,
                              compile=False, cuda_graph=False, **settings)
            torch.manual_seed(0)
            model = FMVAE(arch, x_shape, K, D, channels=channels).to(device)
            with torch.no_grad():
                mu, logvar = model.encode(to_float(x[:512]))
            model.prior.init_from_encodings(mu, logvar.exp(), len(x), torch.Generator().manual_seed(0))
            model.prior.use_gradient_factors(list(range(named)))
            params = model.network_parameters() + model.prior.gradient_parameters()
            adversary = Adversary(model.I, D, K, list(range(named))).to(device) if cfg.adversary_weight > 0 else None
            params += list(adversary.parameters()) if adversary is not None else []
            opt = optimizer(params, cfg)
            steps[lever] = make_runner(joint_step(model, opt, cfg, len(x), params, named=list(range(named)),
                                                  adversary=adversary),
                                       Batcher(TrainData(x, to_float, labels), cfg.batch_size, 0), cfg, opt, model.prior)
        t = _time_side_by_side(steps, args.iters, args.repeats, args.warmup, device)
        rows += [{"model": name, "lever": lever, "device": str(device), "joint_it_s": 1 / t[lever],
                  "time_ratio_to_off": t[lever] / t["off"]} for lever in LEVERS]
    return rows


def bench_packs(args, device) -> tuple[list[dict], str | None]:
    """Trial-iterations per second of the MNIST joint step for packs of args.pack trials (fmvae.pack;
    K cycling through 2, 4, ..., 512 as in Figure 3's grid, one seed each), side by side with one
    trial alone, in the first of args.modes that applies (graph on CUDA), with each pack's peak
    memory (CUDA; the process's resident set on a CPU, which only grows); with args.profile, also
    the profiler's table of the pack size with the most trial-iterations/s (else None)."""
    from fmvae.pack.model import PackBatcher, PackedModel
    mode = next(m for m in args.modes if m != "graph" or device.type == "cuda")
    batch = args.batch_size if not args.tiny else 8
    x, to_float = _pool("binary", 4096 if not args.tiny else 256, device)
    data, n_total, grid = TrainData(x, to_float), 50000, [2, 4, 8, 16, 32, 64, 128, 256, 512]
    cfg = TrainConfig(iters=0, batch_size=batch, lr=1e-4, tau0=10.0, kappa=0.7, **MODES[mode])

    def member(i):
        torch.manual_seed(i)
        model = FMVAE("conv28", (1, 28, 28), grid[i % len(grid)], 64).to(device)
        with torch.no_grad():
            mu, logvar = model.encode(to_float(x[:2048]))
        model.prior.init_from_encodings(mu, logvar.exp(), n_total, torch.Generator().manual_seed(i))
        return model

    def runner(size):
        if size == 0:  # one trial alone, the sweep's step today
            model = member(0)
            opt = optimizer(model.network_parameters(), cfg)
            step = joint_step(model, opt, cfg, n_total, model.network_parameters())
            return make_runner(step, Batcher(data, batch, 0), cfg, opt, model.prior)
        pack = PackedModel([member(i) for i in range(size)], range(size))
        params = pack.network_parameters()
        opt = optimizer(params, cfg)
        step = joint_step(pack, opt, cfg, n_total, params)
        return make_runner(step, PackBatcher([data] * size, batch, range(size), pack), cfg, opt, pack.prior,
                           pack.generators)

    rows = []
    steps = {0: runner(0)} | {size: runner(size) for size in args.pack}
    times = _time_side_by_side(steps, args.iters, args.repeats, args.warmup, device)
    profile = None
    if args.profile:
        best = max(args.pack, key=lambda size: size / times[size])
        profile = f"pack {best} (the most trial-iterations/s), {args.iters} steps:\n" + \
            profile_steps(steps[best], args.iters, device)
    for size, fn in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn(0)
            _sync(device)
        rows.append({"model": "mnist28", "pack": size or 1, "alone": size == 0, "mode": mode, "device": str(device),
                     "batch": batch, "threads": torch.get_num_threads(), "step_s": times[size],
                     "trial_it_s": (size or 1) / times[size], "vs_alone": (size or 1) * times[0] / times[size],
                     "peak_memory_mb": _peak_memory_mb(device)})
    return rows, profile


def profile_steps(step, iters: int, device, rows: int = 15) -> str:
    """Where a step's time goes: torch.profiler over `iters` steps, the top operators and kernels by
    their own time on the device (CUDA) or the CPU."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(iters):
            step(i)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def format_packs(rows: list[dict]) -> str:
    lines = [f"{'pack':>10} {'mode':>6} {'step s':>9} {'trial-it/s':>11} {'x alone':>8} {'peak MB':>8}"]
    for r in rows:
        name = "alone" if r["alone"] else str(r["pack"])
        lines.append(f"{name:>10} {r['mode']:>6} {r['step_s']:9.4f} {r['trial_it_s']:11.1f} {r['vs_alone']:8.2f} "
                     f"{r['peak_memory_mb']:8.0f}")
    return "\n".join(lines)


def plan(args, device) -> list[tuple]:
    """(model, K, mode, bf16) of every row: "graph" only on CUDA, "compiled" only at the largest K."""
    modes = [m for m in args.modes if m != "graph" or device.type == "cuda"]
    rows = [("mnist28", k, m, b) for k in args.mnist_K for m in modes for b in args.bf16
            if m != "compiled" or k == max(args.mnist_K)]
    if not args.no_celeba:
        rows += [("celeba64", (2, 2, 2, 64, 64), m, b) for m in modes if m != "compiled" for b in args.bf16]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':9} {'K':>18} {'mode':>8} {'bf16':>5} {'plain it/s':>11} {'joint it/s':>11} {'ratio':>6} "
             f"{'peak MB':>8}"]
    for r in rows:
        head = f"{r['model']:9} {str(r['K']):>18} {r['mode']:>8} {str(r['bf16']):>5}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:120]}")
            continue
        lines.append(f"{head} {r['plain_it_s']:11.1f} {r['joint_it_s']:11.1f} {r['ratio']:6.3f} "
                     f"{r['peak_memory_mb']:8.0f}")
    for r in rows:
        if "eval_images_s" in r:
            lines.append(f"evaluation of bound (11): {r['eval_images_s']:.0f} images/s; "
                         f"IWAE with {r['iw_samples']} samples: {r['iwae_images_s']:.1f} images/s")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=20, help="iterations per timed block")
    p.add_argument("--celeba-iters", type=int, default=None, help="iterations per timed block for CelebA (default --iters)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mnist-K", type=int, nargs="+", default=[2, 64, 512])
    p.add_argument("--no-celeba", action="store_true", help="skip the CelebA-shaped model")
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=list(MODES),
                   help="execution modes (graph: CUDA only; compiled: at the largest K only)")
    p.add_argument("--bf16", nargs="+", default=["off"], choices=["off", "on"],
                   help="bf16 autocast for the networks, off and/or on (the prior stays float32)")
    p.add_argument("--pack", type=int, nargs="+", default=None,
                   help="only the packed MNIST joint step: trial-iterations/s of packs of these sizes beside one "
                        "trial alone (fmvae.pack)")
    p.add_argument("--profile", action="store_true",
                   help="with --pack: torch.profiler's top operators at the pack size with the most "
                        "trial-iterations/s, written beside --out as .profile.txt")
    p.add_argument("--levers", action="store_true",
                   help="time the joint step with issue 34's levers off and on, side by side (bench_levers)")
    p.add_argument("--tiny", action="store_true", help="a few iterations at batch 8: checks that it runs")
    p.add_argument("--out", default="reports/bench.json")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args) -> list[dict]:
    if args.tiny:
        args.iters, args.celeba_iters, args.repeats, args.warmup = 2, 2, 1, 4
    args.bf16 = [b == "on" if isinstance(b, str) else b for b in args.bf16]
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # convolutions of fixed shapes: pick the fastest kernels once
    rows = []
    for model, k, mode, bf16 in plan(args, device):
        try:
            rows.append(bench_training(model, k, args, device, mode, bf16))
        except Exception as err:  # one failing mode (a capture or compile error) must not hide the others
            msg = f"{type(err).__name__}: {err}"
            print(f"bench: {model} K={k} {mode} bf16={bf16} failed: {msg[:500]}", flush=True)
            rows.append({"model": model, "K": k if isinstance(k, int) else list(k), "mode": mode, "bf16": bf16,
                         "device": str(device), "error": msg})
    return rows


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    profile = None
    if args.levers:
        if args.tiny:
            args.iters, args.repeats, args.warmup = 2, 1, 2
        rows = bench_levers(args, resolve_device(args.device))
        print("\n".join(f"{r['model']:>14} {r['lever']:>15}: {r['joint_it_s']:7.2f} it/s, "
                        f"{r['time_ratio_to_off']:.2f}x the time of the step without levers" for r in rows))
    elif args.pack:
        if args.tiny:
            args.iters, args.repeats, args.warmup = 2, 1, 4
        rows, profile = bench_packs(args, resolve_device(args.device))
        print(format_packs(rows))
        if profile is not None:
            print(profile)
    else:
        rows = run(args)
        print(format_table(rows))
    out = Path(args.out)
    from fmvae.io import atomic_write_json
    atomic_write_json(out, rows)
    print(f"wrote {out}")
    if profile is not None:
        from fmvae.io import atomic_write_text
        atomic_write_text(out.with_suffix(".profile.txt"), profile + "\n")
        print(f"wrote {out.with_suffix('.profile.txt')}")
    return rows


if __name__ == "__main__":
    main()
