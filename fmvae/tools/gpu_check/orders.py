"""--orders: the joint step's orders compared from one pre-trained and initialised model."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fmvae.core import build, evaluate as ev
from fmvae.core.loop import TrainData
from fmvae.core.phases import init_prior, joint_train, pretrain
from fmvae.io import atomic_write_json, atomic_write_text
from fmvae.tools import bench
from fmvae.tools.gpu_check.common import log, phase_config, train_phase


def compare_orders(args, params, ds, device, mode: str, out: Path) -> list[dict]:
    """Joint training in each order from one shared pre-trained and initialised model: same seed,
    same iterations; test ELBO, its parts and it/s per order (orders.json, orders.md)."""
    pre, init, joint = args.orders_iters
    torch.manual_seed(params.seed)
    model = build.build_model(params, ds).to(device)
    data = TrainData(ds.x_train.to(device), ds.to_float)
    flags = bench.MODES[mode]
    for name, fn, n in (("pretrain", pretrain, pre), ("prior_init", init_prior, init)):
        cfg = phase_config(params, name, flags, iters=n, log_every=max(1, n // 20))
        if name == "pretrain":
            cfg = dataclasses.replace(cfg, kl_anneal_iters=max(1, n // 10))
        train_phase(name, fn, model, data, cfg, out)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for order in args.orders:
        model.load_state_dict(start_state)
        model.prior.invalidate_stats()
        cfg = phase_config(params, "joint", flags, iters=joint, log_every=max(1, joint // 20), order=order)
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
