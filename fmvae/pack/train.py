"""train_pack: a phase for every member at once through the same step functions and loop as a model alone
(fmvae.core.phases, fmvae.core.loop); a member whose terms turn non-finite leaves and the rest go on."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from fmvae.core.loop import NumericalError, TrainData, WeightAverage, make_optimizer, run_loop
from fmvae.core.model import FMVAE
from fmvae.core.phases import joint_step, pretrain_step, snapshot_steps
from fmvae.io import CheckpointDir
from fmvae.pack.checkpoints import PackCheckpoints, member_row
from fmvae.pack.memory import check_memory
from fmvae.pack.model import PackBatcher, PackedModel
from fmvae.params import TrainConfig


def _per_member(step_fn, members: int):
    """The steps' terms, each (M,), as scalars named "<term>/<member>": the loop checks, averages and
    logs each on its own, and a non-finite one names its member."""
    def flat(step, x, labels):
        terms = step_fn(step, x, labels)
        return None if terms is None else {f"{k}/{m}": v[m] for k, v in terms.items() for m in range(members)}
    return flat


def _check_configs(cfgs: Sequence[TrainConfig]) -> TrainConfig:
    base = dataclasses.replace(cfgs[0], seed=0)
    for cfg in cfgs[1:]:
        if dataclasses.replace(cfg, seed=0) != base:
            raise ValueError("a pack's members share every training setting but the seed")
    if base.nan_policy != "stop":
        raise ValueError('a pack runs with train.nan_policy "stop" (a skipped batch would be every member\'s)')
    if base.order != "reuse":
        raise ValueError('a pack runs the default joint order, "reuse"')
    return cfgs[0]


def train_pack(phase: str, models: Sequence[FMVAE], data: TrainData | Sequence[TrainData],
               cfgs: Sequence[TrainConfig], folders: Sequence, fingerprints: Sequence[str], on_logs=None,
               metas=None) -> list:
    """Pre-train ("pretrain") or jointly train ("joint") `models` as one pack, each with its own
    TrainConfig (the same but for the seed), training set (one for all, or one each, of one size),
    checkpoint folder and fingerprint. Returns, per member,
    its training curve as the trial alone logs it, or the NumericalError that stopped it: a member
    whose terms turn non-finite stops alone (its checkpoints keep its last good state) and the others
    go on from their own newest checkpoints. The models leave with their (averaged) weights.
    A pack the GPU's memory cannot hold is refused first (PackTooLarge, naming the largest that fits)."""
    _check_configs(cfgs)
    M = len(models)
    datas = [data] * M if isinstance(data, TrainData) else list(data)
    if len({len(d) for d in datas}) != 1:
        raise ValueError("a pack's members train on data sets of one size (the SVI steps scale by it)")
    check_memory(phase, models, datas, cfgs[0])
    on_logs = list(on_logs) if on_logs is not None else [None] * M
    metas = list(metas) if metas is not None else [{}] * M
    results: list = [None] * M
    alive = list(range(M))
    while alive:
        try:
            pick = lambda items: [items[m] for m in alive]
            histories = _train_once(phase, pick(models), pick(datas), pick(cfgs), pick(folders), pick(fingerprints),
                                    pick(on_logs), pick(metas))
        except NumericalError as err:
            named = {int(term.rsplit("/", 1)[1]) for term in err.term.split(", ")}
            for j in named:
                m = alive[j]
                results[m] = NumericalError(phase, err.step, ", ".join(t.rsplit("/", 1)[0] for t in
                                                                       err.term.split(", ") if t.endswith(f"/{j}")))
            alive = [m for j, m in enumerate(alive) if j not in named]
            continue
        for m, history in zip(alive, histories):
            results[m] = history
        break
    return results


def _train_once(phase, models, datas, cfgs, folders, fingerprints, on_logs, metas) -> list[list[dict]]:
    cfg, M = cfgs[0], len(models)
    seeds = [c.seed for c in cfgs]
    pack = PackedModel(models, seeds)
    params = pack.network_parameters()
    opt = make_optimizer(params, cfg.lr, capturable=cfg.cuda_graph and all(p.is_cuda for p in params))
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    n_total = len(datas[0])
    if phase == "pretrain":
        step_fn, log_extras, snapshot_at = pretrain_step(pack, opt, cfg), None, ()
    elif phase == "joint":
        step_fn, snapshot_at = joint_step(pack, opt, cfg, n_total, params), tuple(snapshot_steps(cfg))

        def log_extras(row):  # as joint_train's, per member
            with torch.no_grad():
                global_kl = (pack.prior.global_kl() / n_total).tolist()
            for m, g in enumerate(global_kl):
                row[f"global_kl/{m}"] = g
                row[f"elbo/{m}"] = row[f"bound/{m}"] - g
    else:
        raise ValueError(f"a pack trains the pretrain or joint phase, not {phase!r}")

    def on_log(row, history):
        for m, callback in enumerate(on_logs):
            if callback is not None:
                callback(member_row(row, m), [member_row(r, m) for r in history])

    ckpt = PackCheckpoints(pack, [CheckpointDir(f) for f in folders], fingerprints, phase,
                           [dataclasses.asdict(c) for c in cfgs], metas)
    history = run_loop(phase, pack, _per_member(step_fn, M), cfg, PackBatcher(datas, cfg.batch_size, seeds, pack), opt,
                       ckpt, ckpt.fingerprint, on_log, log_extras=log_extras, average=average,
                       snapshot_at=snapshot_at)
    if average is not None:
        average.copy_to()
    pack.write_members()
    return [[member_row(r, m) for r in history] for m in range(M)]
