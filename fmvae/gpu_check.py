"""The prepared GPU check: `python -m fmvae.gpu_check --data DIR --out OUT_DIR [--budget-s S] [--tiny]`.

One process, no dvc, no ray, no network. On the GPU at hand it
  1. prints the device, torch version and the benchmark table (fmvae.bench: plain vs joint
     step; eager, CUDA graph and compiled; bf16 off and on; K = 2, 64, 512; CelebA-shaped);
  2. trains binarised MNIST (read from DIR: the mirror's three MAT files) with the
     `mnist_paper` preset (I = 1, K = 512, D = 64, batch 64, Adam 1e-4, tau0 = 2000,
     kappa = 0.7; 1e5 + 2e4 + 2e5 iterations) through the fastest step the benchmark found,
     scaling the three phases down by one factor when the full schedule would not fit
     the training budget (said, and recorded);
  3. evaluates the test bound (11) with its parts, IWAE (1000 samples on 1000 test points),
     components in use, and draws the Figure 4 and sample-grid figures;
  4. writes metrics.json, bench.json, the curves, the figures and summary.md into OUT_DIR
     (each file as soon as it exists, so a run cut short still leaves what it finished),
     and prints the summary last.
`--tiny` runs the same code path on the CPU in seconds (a test does).

`--celeba DIR` runs the paper's semi-supervised CelebA model instead (`celeba_paper` preset: I = 5,
K = (2, 2, 2, 64, 64), D = 64, the 128-256-512-1024 networks; Male, Eyeglasses and Smiling clamp
factors 0 to 2 on 40% of the training images), on the images DIR holds (a partial set is loaded
as such and its counts recorded), scaled to the budget by the benchmark's CelebA rates as for
MNIST; it writes the test bound, per property the accuracy of argmax q(r_i|x), its balanced
accuracy and the majority baseline, the judge's agreement with clamped samples (Table 1's set-up)
and the judge's own accuracy, sample grids and summary.md. What travels to a lent GPU is at most
64 MiB, so `--make-celeba-subset SRC DEST --train N --test M` first writes a CelebA folder of the
first N training-partition and M test-partition images of SRC (a zip of their JPEGs, the attribute
and partition files for exactly those), about 7 kB an image.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import shutil
import time
import traceback
from pathlib import Path

import torch
import yaml

from . import bench, config, data as data_mod, evaluate as ev
from .checkpoint import atomic_write_json, atomic_write_text
from .params import ORDERS, Params, train_config, validate
from .pipeline import write_curve
from .step import TrainData
from .train import PHASES, init_prior, joint_train, pretrain

PRESET = Path(__file__).resolve().parent.parent / "presets" / "mnist_paper.yaml"
PAPER_ELBO = -85.77  # binarised MNIST, K = 512 (Figure 3)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env |= {"gpu": p.name, "gpu_memory_gb": round(p.total_memory / 2 ** 30, 1), "sm_count": p.multi_processor_count,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        env["gpu"] = "none (CPU)"
    return env


def run_bench(args, device, out: Path, compile_bf16: bool = False) -> list[dict]:
    """bench's table: eager and graph with bf16 off and on; compiled (at K = 512) in float32 only
    unless asked, since every compiled configuration costs its own compilation."""
    b = bench.parser().parse_args([])
    b.device, b.tiny = str(device), args.tiny
    b.modes = ["eager", "graph"]
    b.bf16 = ["off", "on"] if device.type == "cuda" else ["off"]
    b.iters, b.repeats, b.warmup, b.celeba_iters = 50, 5, 10, 10
    b.eval_points, b.iw_samples = 10000, 100
    if args.tiny:
        b.mnist_K, b.no_celeba, b.bf16 = [2, 16], True, ["off"]
    rows = bench.run(b)
    if not args.no_compile and not args.tiny:
        c = bench.parser().parse_args([])
        vars(c).update(vars(b))
        c.modes, c.mnist_K, c.no_celeba = ["compiled"], [max(b.mnist_K)], True
        c.bf16 = ["off", "on"] if compile_bf16 else ["off"]
        rows += bench.run(c)
    atomic_write_json(out / "bench.json", rows)
    atomic_write_text(out / "bench.txt", bench.format_table(rows) + "\n")
    print(bench.format_table(rows), flush=True)
    return rows


def float32_mnist(rows: list[dict]) -> list[dict]:
    """The benchmark rows a training run can follow: the 28x28 model in float32, timed without error."""
    return [r for r in rows if r["model"] == "mnist28" and not r["bf16"] and "error" not in r]


def fastest_mode(rows: list[dict], device) -> str:
    """The mode with the most joint it/s at the largest K in float32 (bf16 changes the numbers)."""
    mnist = float32_mnist(rows)
    if not mnist:
        return "graph" if device.type == "cuda" else "eager"
    k = max(r["K"] for r in mnist)
    return max((r for r in mnist if r["K"] == k), key=lambda r: r["joint_it_s"])["mode"]


def schedule(params: Params, rates: dict, budget_s: float) -> tuple[dict, float]:
    """Iterations per phase: the preset's, scaled down by one factor if their predicted time exceeds budget_s."""
    full = {p: getattr(params, p).iters for p in ("pretrain", "prior_init", "joint")}
    predicted = sum(n / rates[p] for p, n in full.items())
    scale = min(1.0, budget_s / predicted)
    return {p: max(1, int(n * scale)) for p, n in full.items()}, scale


def train_phase(name, fn, model, data, cfg, out: Path) -> tuple[list[dict], dict]:
    """One phase in the chosen mode; if that mode fails, the phase is rerun eagerly from the same start."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    info = {"mode": "compiled" if cfg.compile else ("graph" if cfg.cuda_graph else "eager"), "iters": cfg.iters}
    try:
        history = fn(model, data, cfg)
    except Exception as err:  # a capture or compile failure must not cost the whole check
        info["error"] = f"{type(err).__name__}: {err}"
        log(f"{name}: {info['mode']} failed ({info['error'][:300]}); rerunning eagerly")
        traceback.print_exc()
        model.load_state_dict(before)
        cfg = dataclasses.replace(cfg, compile=False, cuda_graph=False)
        info["mode"] = "eager (fallback)"
        start = time.perf_counter()
        history = fn(model, data, cfg)
    if data.x.is_cuda:
        torch.cuda.synchronize()
    info["wall_s"] = time.perf_counter() - start
    info["it_s"] = cfg.iters / info["wall_s"]
    write_curve(history, out / f"curve_{name}.csv")
    log(f"{name}: {cfg.iters} iterations in {info['wall_s']:.1f} s ({info['it_s']:.0f} it/s, {info['mode']})")
    return history, info


def compare_orders(args, params, ds, device, mode: str, out: Path) -> list[dict]:
    """Joint training in each order from one shared pre-trained and initialised model: same seed,
    same iterations; test ELBO, its parts and it/s per order (orders.json, orders.md)."""
    pre, init, joint = args.orders_iters
    torch.manual_seed(params.seed)
    model = config.build_model(params, ds).to(device)
    data = TrainData(ds.x_train.to(device), ds.to_float)
    flags = bench.MODES[mode]
    for name, fn, n in (("pretrain", pretrain, pre), ("prior_init", init_prior, init)):
        cfg = dataclasses.replace(train_config(params, name), iters=n, progress=False, checkpoint_every_s=1e9,
                                  log_every=max(1, n // 20), **flags)
        if name == "pretrain":
            cfg = dataclasses.replace(cfg, kl_anneal_iters=max(1, n // 10))
        train_phase(name, fn, model, data, cfg, out)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for order in args.orders:
        model.load_state_dict(start_state)
        model.prior.invalidate_stats()
        cfg = dataclasses.replace(train_config(params, "joint"), iters=joint, progress=False,
                                  checkpoint_every_s=1e9, log_every=max(1, joint // 20), order=order, **flags)
        _, info = train_phase(f"joint_{order}", joint_train, model, data, cfg, out)
        res = ev.evaluate_bound(model, ds.x_test.to(device), ds.to_float)
        rows.append({"order": order, "joint_iters": joint, "pretrain_iters": pre, "prior_init_iters": init,
                     "it_s": info["it_s"], "mode": info["mode"], **{k: res[k] for k in ("elbo", "recon", "kl_z", "kl_r")}})
        log(f"order {order}: test ELBO {res['elbo']:.2f} ({info['it_s']:.0f} it/s)")
        atomic_write_json(out / "orders.json", rows)
    table = ["| order | joint it/s | test ELBO | recon | KL[z] | KL[r] |", "|---|---|---|---|---|---|"]
    table += [f"| {r['order']} | {r['it_s']:.0f} | {r['elbo']:.2f} | {r['recon']:.2f} | {r['kl_z']:.2f} | {r['kl_r']:.2f} |"
              for r in rows]
    text = (f"Joint step orders, binarised MNIST, mnist_paper settings, {pre} + {init} + {joint} iterations, "
            f"seed {params.seed}, one shared pre-trained and initialised model, step mode {mode}\n\n"
            + "\n".join(table) + "\n")
    atomic_write_text(out / "orders.md", text)
    print(text, flush=True)
    return rows


CELEBA_PRESET = PRESET.with_name("celeba_paper.yaml")


def make_celeba_subset(src: Path, dest: Path, n_train: int, n_test: int) -> dict:
    """A CelebA folder with the first n_train training-partition and n_test test-partition images of
    src that are present: a zip of their JPEGs as distributed, and the attribute and partition files
    listing exactly them (a consistent, complete set). Returns the counts and the index range."""
    import zipfile
    from .data.celeba import ATTRIBUTES, PARTITION, ZIP
    with zipfile.ZipFile(src / ZIP) as zf:
        present = {Path(n).name: n for n in zf.namelist() if n.lower().endswith(".jpg")}
    partition = dict(ln.split() for ln in (src / PARTITION).read_text().splitlines() if ln.strip())
    chosen = {"0": [], "2": []}
    for name in sorted(present):
        part = partition.get(name)
        if part in chosen and len(chosen[part]) < (n_train if part == "0" else n_test):
            chosen[part].append(name)
    keep = set(chosen["0"] + chosen["2"])
    if len(chosen["0"]) < n_train or len(chosen["2"]) < n_test:
        raise SystemExit(f"--make-celeba-subset: {src} holds {len(chosen['0'])} training and {len(chosen['2'])} "
                         f"test images, asked for {n_train} and {n_test}")
    lines = (src / ATTRIBUTES).read_text().splitlines()
    rows = [ln for ln in lines[2:] if ln.split() and ln.split()[0] in keep]
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / ATTRIBUTES, "\n".join([str(len(rows)), lines[1]] + rows) + "\n")
    atomic_write_text(dest / PARTITION, "".join(f"{n} {partition[n]}\n" for n in sorted(keep)))
    tmp = dest / f".{ZIP}.tmp"
    with zipfile.ZipFile(src / ZIP) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for name in sorted(keep):
            zout.writestr(present[name], zin.read(present[name]))
    tmp.replace(dest / ZIP)
    info = {"train": len(chosen["0"]), "test": len(chosen["2"]), "train_range": [chosen["0"][0], chosen["0"][-1]],
            "test_range": [chosen["2"][0], chosen["2"][-1]], "zip_mb": round((dest / ZIP).stat().st_size / 2 ** 20, 1)}
    atomic_write_json(dest / "subset.json", info | {"source": str(src)})
    log(f"celeba subset: {info}")
    return info


def celeba_check(args, device, out: Path, t_start: float) -> dict:
    """The CelebA part (--celeba DIR): see the module's docstring."""
    from . import report
    from .celeba_report import property_scores
    params = validate(yaml.safe_load(CELEBA_PRESET.read_text()) | {"data": {"name": "celeba", "partial": True}})
    t = time.perf_counter()
    ds = data_mod.load("celeba", Path(args.celeba), params.seed, partial=True)
    log(f"celeba: {len(ds.x_train)} training, {len(ds.x_test)} test images decoded in {time.perf_counter() - t:.0f} s "
        f"({ds.info})")
    if args.tiny:
        ds.x_train, ds.y_train, ds.x_test, ds.y_test = ds.x_train[:96], ds.y_train[:96], ds.x_test[:48], ds.y_test[:48]
        params = params.override({"model.D": 8, "model.K": [2, 2, 2, 4, 4], "model.channels": [8, 16, 32, 64],
                                  "prior_init.init_points": 96})
    full = {p: getattr(params, p).iters for p in ("pretrain", "prior_init", "joint")}
    rows = []
    if args.tiny:
        iters, scale = {"pretrain": 20, "prior_init": 5, "joint": 20}, 20 / full["pretrain"]
    else:
        if not args.no_bench:
            b = bench.parser().parse_args([])
            b.device, b.mnist_K, b.modes, b.bf16, b.iters, b.repeats, b.warmup = str(device), [], ["eager", "graph"], \
                ["off"], 20, 3, 5
            rows = bench.run(b)
            atomic_write_json(out / "bench.json", rows)
            print(bench.format_table(rows), flush=True)
        ok = [r for r in rows if "error" not in r]
        best = max(ok, key=lambda r: r["joint_it_s"]) if ok else {"plain_it_s": 30.0, "joint_it_s": 25.0,
                                                                    "mode": "eager"}
        rates = {"pretrain": best["plain_it_s"], "prior_init": 5 * best["joint_it_s"], "joint": best["joint_it_s"]}
        left = args.total_s - (time.perf_counter() - t_start) - 150.0  # judge, evaluation, figures
        args.budget_s = max(30.0, min(args.budget_s, left))
        iters, scale = schedule(params, rates, args.budget_s)
    mode = max((r for r in rows if "error" not in r), key=lambda r: r["joint_it_s"])["mode"] if rows else \
        ("graph" if device.type == "cuda" else "eager")
    log(f"celeba: schedule {iters} (scale {scale:.4f} of the paper's {full}), step {mode}")
    torch.manual_seed(params.seed)
    model = config.build_model(params, ds).to(device)
    labels = data_mod.semi_supervised_labels(ds.y_train, params.semi.fraction, model.I, params.seed)
    data = TrainData(ds.x_train.to(device), ds.to_float, labels.to(device))
    phases, flags = {}, bench.MODES[mode]
    for name, fn in PHASES.items():
        cfg = dataclasses.replace(train_config(params, name), iters=iters[name], progress=False,
                                  checkpoint_every_s=1e9, log_every=max(1, min(500, iters[name] // 40)), **flags)
        if name == "pretrain":
            cfg = dataclasses.replace(cfg, kl_anneal_iters=max(1, int(cfg.kl_anneal_iters * scale)))
        if name == "joint":
            cfg = dataclasses.replace(cfg, kl_z_anneal_iters=max(1, int(cfg.kl_z_anneal_iters * scale)))
            fn = functools.partial(joint_train, gradient_factors=[0, 1, 2])
        _, phases[name] = train_phase(name, fn, model, data, cfg, out)
        atomic_write_json(out / "phases.json", phases)

    res = ev.evaluate_bound(model, ds.x_test.to(device), ds.to_float)
    metrics = {k: res[k] for k in ("elbo", "recon", "kl_z", "kl_r")} | {"components_used": ev.components_in_use(model)}
    a = res["assignments"]
    props = {name: property_scores(a[:, p].numpy(), ds.y_test[:, p].numpy()) for p, name in enumerate(ds.property_names)}
    judge_iters = 50 if args.tiny else 3000
    judge, judge_acc = report.train_judge(ds, judge_iters, seed=params.seed, device=device)
    agreement, per_value = report.judge_samples(model, judge, ds, 64 if args.tiny else 2000, params.seed)
    for p, name in enumerate(ds.property_names):
        props[name] |= {"judged_agreement": agreement[p], "judged_per_value": per_value[p], "judge_accuracy": judge_acc[p],
                        "paper_accuracy": report.PAPER_CELEBA[name][0], "paper_human_judgement": report.PAPER_CELEBA[name][1]}
    metrics |= {"properties": props, "data": ds.info, "train_images": len(ds.x_train), "test_images": len(ds.x_test),
                "schedule": iters, "schedule_scale": scale, "mode": mode, "phases": phases, "judge_iters": judge_iters,
                "environment": environment(device)}
    atomic_write_json(out / "metrics.json", metrics)

    import matplotlib
    matplotlib.use("Agg")  # files only
    from . import plots
    names = dict(enumerate(ds.property_names))
    torch.manual_seed(params.seed)
    plots.sample_grid(model, ds, [0, 2], 2, out / "samples_male_smiling.png", per_cell=16, names=names)
    plots.sample_grid(model, ds, [3, 4], 8, out / "samples_factors_3_4.png", per_cell=16, names=names)
    plots.training_curves([out / f"curve_{n}.csv" for n in PHASES], out / "training_curves.png")

    lines = ["# GPU check: CelebA, celeba_paper preset (I = 5, K = (2, 2, 2, 64, 64), D = 64)", "",
             f"- Device: {metrics['environment'].get('gpu')}; step {mode}; schedule scale {scale:.4f} of the paper's "
             f"{full['pretrain']} + {full['prior_init']} + {full['joint']} iterations",
             f"- Images: {len(ds.x_train)} training, {len(ds.x_test)} test (of {ds.info.get('listed')} listed)",
             f"- Test ELBO (11): {metrics['elbo']:.1f} nats (recon {metrics['recon']:.1f}, KL[z] {metrics['kl_z']:.1f}, "
             f"KL[r] {metrics['kl_r']:.2f})", "",
             "| property | accuracy | balanced | majority | paper | judged agreement | paper (human) | judge acc. |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {v['majority_baseline']:.3f} | "
              f"{v['paper_accuracy']} | {v['judged_agreement']:.3f} | {v['paper_human_judgement']} | "
              f"{v['judge_accuracy']:.3f} |" for n, v in props.items()]
    lines += ["", "| phase | iterations | wall s | it/s | mode |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {i['iters']} | {i['wall_s']:.1f} | {i['it_s']:.0f} | {i['mode']} |" for n, i in phases.items()]
    lines.append(f"- Whole check: {time.perf_counter() - t_start:.0f} s")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    print(text, flush=True)
    return metrics


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
    from . import report
    from .pack import train_pack

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
        cfgs = {p: dataclasses.replace(train_config(params, p), progress=False, checkpoint_every_s=1e9, **flags)
                for p in ("pretrain", "prior_init", "joint")}

        def members():
            out_ = []
            for k in args.figure3_K:
                torch.manual_seed(seed)
                out_.append(config.build_model(params.override({"model.K": k}), ds).to(device))
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
        df = pd.DataFrame(rows).reindex(columns=report.RESULT_COLUMNS)
        atomic_write_text(out / "results.csv", df.to_csv(index=False))
        report.figure3(df, out)
    return {"rows": rows}


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with binarized_mnist_{train,valid,test}.mat (or .amat)")
    p.add_argument("--celeba", help="instead of MNIST: a CelebA folder (img_align_celeba.zip, list_attr_celeba.txt, "
                   "list_eval_partition.txt), e.g. one written by --make-celeba-subset")
    p.add_argument("--make-celeba-subset", nargs=2, metavar=("SRC", "DEST"),
                   help="only write a CelebA folder of --subset-train + --subset-test images of SRC to DEST")
    p.add_argument("--subset-train", type=int, default=5000)
    p.add_argument("--subset-test", type=int, default=2000)
    p.add_argument("--out", help="folder for every result (created)")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for the three training phases")
    p.add_argument("--total-s", type=float, default=540.0,
                   help="the whole check's budget: training gets at most what is left of it after the benchmark, "
                        "less a reserve for evaluation and figures")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the benchmark")
    p.add_argument("--bench-compile-bf16", action="store_true", help="also time the compiled step under bf16")
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--iw-points", type=int, default=1000)
    p.add_argument("--figure3", action="store_true", help="instead of the check: Figure 3, every K of each data set "
                   "and seed trained as one pack (--data for MNIST, --omniglot for Omniglot), scaled to --total-s")
    p.add_argument("--omniglot", help="with --figure3: a folder with images_background.zip and images_evaluation.zip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --figure3: the seeds")
    p.add_argument("--figure3-K", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--tiny", action="store_true", help="CPU, a few iterations on a subset: checks the code path")
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=None,
                   help="instead of the check: compare these joint-step orders (test ELBO, it/s)")
    p.add_argument("--orders-iters", type=int, nargs=3, default=[20000, 4000, 25000],
                   metavar=("PRETRAIN", "PRIOR_INIT", "JOINT"), help="iterations per phase for --orders")
    p.add_argument("--mode", choices=list(bench.MODES), default=None, help="step mode for --orders (default: "
                   "compiled on CUDA, eager on CPU)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.make_celeba_subset:
        src, dest = map(Path, args.make_celeba_subset)
        return make_celeba_subset(src, dest, args.subset_train, args.subset_test)
    if args.out is None or (args.data is None) == (args.celeba is None):
        raise SystemExit("give --out and one of --data (binarised MNIST) or --celeba (a CelebA folder)")
    folder, out = Path(args.celeba or args.data), Path(args.out)
    if not folder.is_dir():  # before anything is written
        raise SystemExit(f"--{'celeba' if args.celeba else 'data'} {folder}: not a folder (it must hold "
                         f"{'the CelebA zip and attribute files' if args.celeba else 'the binarised MNIST MAT files'})")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    log(f"device {env['gpu']}, torch {env['torch']}, CUDA {env.get('cuda', '-')}")
    atomic_write_json(out / "environment.json", env)
    if args.celeba:
        return celeba_check(args, device, out, t_start)
    if args.figure3:
        return figure3_check(args, device, out, t_start)

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
    model = config.build_model(params, ds).to(device)
    labels = None
    data = TrainData(ds.x_train.to(device), ds.to_float, labels)
    phases, flags = {}, bench.MODES[mode]
    for name, fn in PHASES.items():
        cfg = train_config(params, name)
        n = iters[name]
        cfg = dataclasses.replace(cfg, iters=n, progress=False, checkpoint_every_s=1e9,
                                  log_every=max(1, min(cfg.log_every, n // 40)), **flags)
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
    from . import plots
    torch.manual_seed(params.seed)
    plots.sample_grid(model, ds, [0, 0], 16, out / "samples_grid.png")
    plots.cluster_figure(model, ds, 0, out / "clusters.png")
    plots.training_curves([out / f"curve_{n}.csv" for n in PHASES], out / "training_curves.png")

    text = summary_text(env, phases, scale, metrics, mode, time.perf_counter() - t_start, full)
    atomic_write_text(out / "summary.md", text)
    print(text, flush=True)
    return metrics


if __name__ == "__main__":
    main()
