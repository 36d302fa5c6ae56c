"""How many members fit: the peak bytes of a pack of one and of two, measured on the GPU before training."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from fmvae.core.loop import TrainData, WeightAverage, make_optimizer
from fmvae.core.model import FMVAE
from fmvae.core.phases import joint_step, pretrain_step
from fmvae.pack.model import PackBatcher, PackedModel
from fmvae.params import TrainConfig


class PackTooLarge(ValueError):
    """A pack the device's memory cannot hold, refused before it trains."""


MEMORY_MARGIN = 0.8  # of the free memory a pack may plan on: the allocator's fragmentation, a CUDA graph's pool


def _peak_step_bytes(phase: str, model: FMVAE, data: TrainData, cfg: TrainConfig, members: int) -> int:
    """Peak device bytes, beyond what is allocated already, of building a pack of `members` copies of
    `model` (weights, Adam's moments, the weight average) and running one eager step of `phase` on it
    (on a CPU the step runs and 0 is returned: the CPU tests run the probe the GPU relies on)."""
    device = data.x.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    probe = PackedModel([model] * members, list(range(members)))  # stacks copies: the model is left as it is
    params = probe.network_parameters()
    opt = make_optimizer(params, cfg.lr)
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    eager = dataclasses.replace(cfg, cuda_graph=False, compile=False)
    step_fn = (pretrain_step(probe, opt, eager) if phase == "pretrain" else
               joint_step(probe, opt, eager, len(data), params))
    step_fn(0, *PackBatcher([data] * members, cfg.batch_size, list(range(members)), probe)())
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del probe, params, opt, average, step_fn
    torch.cuda.empty_cache()
    return peak


def largest_pack(one: int, two: int, free: int) -> int:
    """The most members that fit in MEMORY_MARGIN of `free` bytes, from the peak bytes of a pack of
    one and of two (a pack's memory is affine in its members: weights, moments and activations
    scale with them, the data set and the CUDA context do not)."""
    per_member = max(two - one, 1)
    return max(int((MEMORY_MARGIN * free - (one - per_member)) // per_member), 0)


def _measured(phase: str, models: Sequence[FMVAE], datas: Sequence[TrainData], cfg: TrainConfig):
    """(peak bytes of a pack of one, of two, free bytes) on a GPU; None on a CPU, where nothing is
    checked: host memory holds far larger packs than pay there (docs/gpu.md)."""
    device = datas[0].x.device
    if device.type != "cuda":
        return None
    one, two = (_peak_step_bytes(phase, models[0], datas[0], cfg, n) for n in (1, 2))
    free, _ = torch.cuda.mem_get_info(device)
    return one, two, free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_memory(phase: str, models: Sequence[FMVAE], datas: Sequence[TrainData], cfg: TrainConfig) -> None:
    """Refuse, before any training, a pack that would not fit the GPU's free memory (and the
    allocator's cache), naming the largest that would: measured by one step of a pack of one and of
    two copies of the first member."""
    measured = _measured(phase, models, datas, cfg) if len(models) > 1 else None
    if measured is None:
        return
    one, two, free = measured
    largest = largest_pack(one, two, free)
    if len(models) > largest:
        need = one + (len(models) - 1) * (two - one)
        raise PackTooLarge(f"a pack of {len(models)} {phase} members needs about {need / 2**30:.1f} GiB on "
                           f"{datas[0].x.device}, {free / 2**30:.1f} GiB free: the largest pack that fits is "
                           f"{largest} (set sweep.pack)")
