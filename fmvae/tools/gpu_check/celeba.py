"""--celeba: the paper's semi-supervised CelebA model scaled to the budget; --make-celeba-subset."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch
import yaml

from fmvae import data as data_mod
from fmvae.core import build, evaluate as ev
from fmvae.core.loop import TrainData
from fmvae.core.phases import PHASES, joint_train
from fmvae.io import atomic_write_json, atomic_write_text
from fmvae.params import validate
from fmvae.tools import bench
from fmvae.tools.gpu_check.common import PRESET, environment, log, phase_config, schedule, train_phase


CELEBA_PRESET = PRESET.with_name("celeba_paper.yaml")


def make_celeba_subset(src: Path, dest: Path, n_train: int, n_test: int) -> dict:
    """A CelebA folder with the first n_train training-partition and n_test test-partition images of
    src that are present: a zip of their JPEGs as distributed, and the attribute and partition files
    listing exactly them (a consistent, complete set). Returns the counts and the index range."""
    import zipfile
    from fmvae.data.celeba import ATTRIBUTES, PARTITION, ZIP
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
    from fmvae.reporting.judge import PAPER_CELEBA, judge_samples, train_judge
    from fmvae.reporting.celeba import property_scores
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
    model = build.build_model(params, ds).to(device)
    labels = data_mod.semi_supervised_labels(ds.y_train, params.semi.fraction, model.I, params.seed)
    data = TrainData(ds.x_train.to(device), ds.to_float, labels.to(device))
    phases, flags = {}, bench.MODES[mode]
    for name, fn in PHASES.items():
        cfg = phase_config(params, name, flags, iters=iters[name], log_every=max(1, min(500, iters[name] // 40)))
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
    judge, judge_acc = train_judge(ds, judge_iters, seed=params.seed, device=device)
    agreement, per_value = judge_samples(model, judge, ds, 64 if args.tiny else 2000, params.seed)
    for p, name in enumerate(ds.property_names):
        props[name] |= {"judged_agreement": agreement[p], "judged_per_value": per_value[p], "judge_accuracy": judge_acc[p],
                        "paper_accuracy": PAPER_CELEBA[name][0], "paper_human_judgement": PAPER_CELEBA[name][1]}
    metrics |= {"properties": props, "data": ds.info, "train_images": len(ds.x_train), "test_images": len(ds.x_test),
                "schedule": iters, "schedule_scale": scale, "mode": mode, "phases": phases, "judge_iters": judge_iters,
                "environment": environment(device)}
    atomic_write_json(out / "metrics.json", metrics)

    import matplotlib
    matplotlib.use("Agg")  # files only
    from fmvae.reporting import plots
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
