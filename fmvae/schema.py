"""The one home of every parameter's default: key -> (default, type(s), check, what the check means).

params.yaml states exactly these defaults (the default profile: binarised MNIST on a 2-core
CPU); TrainConfig's defaults are read from here; presets override some of them. A test fails
if any of them drifts (tests/test_trust.py).
"""
from __future__ import annotations

from .data import DATASETS, OMNIGLOT_SPLITS

ORDERS = ("reuse", "paper", "fused")  # the joint step's orders (fmvae.train.joint_step)

_pos = lambda v: v > 0
_nonneg = lambda v: v >= 0
_unit = lambda v: 0 <= v <= 1

# key -> (default, type(s), check, what the check means)
SCHEMA = {
    "seed": (0, int, _nonneg, ">= 0"),
    "device": ("auto", str, lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda"), "auto, cpu or cuda[:n]"),
    "data.name": ("binarized_mnist", str, lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "data.mirror": ("", str, None, ""),
    "data.raw_dir": ("data/raw", str, None, ""),
    "data.omniglot_split": ("characters", str, lambda v: v in OMNIGLOT_SPLITS, "characters (15 + 5 drawings of each character, the paper's) or alphabets"),
    "data.partial": (False, bool, None, "true or false (true: load the images present when some listed ones are absent)"),
    "model.I": (1, int, _pos, ">= 1"),
    "model.K": (16, (int, list), lambda v: all(isinstance(k, int) and k >= 1 for k in ([v] if isinstance(v, int) else v)) and v != [], "an int >= 1 or a list of them, one per factor"),
    "model.D": (32, int, _pos, ">= 1"),
    "model.channels": ([], list, lambda v: len(v) <= 6 and all(isinstance(c, int) and c >= 1 for c in v), "[] (the architecture's own) or up to 6 ints >= 1: conv64's widths, one stride-2 layer each"),
    "model.arch": ("auto", str, lambda v: v in ("auto", "conv28", "conv64", "mlp"), "auto, conv28, conv64 or mlp"),
    "train.batch_size": (64, int, _pos, ">= 1"),
    "train.lr": (1e-3, float, _pos, "> 0"),
    "train.log_every": (100, int, _pos, ">= 1"),
    "train.checkpoint_every_s": (120.0, float, _nonneg, ">= 0"),
    "train.ema_decay": (0.999, float, lambda v: 0 <= v < 1, "in [0, 1) (0: no averaging; stages use the last iterate)"),
    "train.nan_policy": ("stop", str, lambda v: v in ("stop", "skip"), "stop or skip"),
    "train.bf16": (False, bool, None, "true or false"),
    "train.compile": (False, bool, None, "true or false (torch.compile the differentiable part of each step)"),
    "train.cuda_graph": (True, bool, None, "true or false (on CUDA: replay each iteration from a CUDA graph)"),
    "pretrain.iters": (5000, int, _nonneg, ">= 0"),
    "pretrain.kl_anneal_iters": (1000, int, _nonneg, ">= 0"),
    "prior_init.iters": (1000, int, _nonneg, ">= 0"),
    "prior_init.init_points": (10000, int, _pos, ">= 1"),
    "prior_init.restarts": (8, int, _pos, ">= 1"),
    "prior_init.rotate": (True, bool, None, "true or false"),
    "svi.tau0": (10.0, float, _nonneg, ">= 0"),
    "svi.kappa": (0.7, float, lambda v: 0.5 < v <= 1, "in (0.5, 1]"),
    "joint.iters": (6000, int, _nonneg, ">= 0"),
    "joint.kl_z_weight": (1.0, float, _pos, "> 0"),
    "joint.kl_z_anneal_iters": (0, int, _nonneg, ">= 0"),
    "joint.lr_decay": (0.5, float, lambda v: 0 <= v <= 1, "in [0, 1] (the last fraction of the joint phase over which Adam's step size falls linearly to 0; 0: constant)"),
    "joint.order": ("reuse", str, lambda v: v in ORDERS, "one of " + ", ".join(ORDERS)),
    "joint.snapshots": (5, int, _nonneg, ">= 0 (models kept at the last steps, for the spread of the test bound)"),
    "joint.snapshot_every": (200, int, _pos, ">= 1 (iterations between those snapshots)"),
    "semi.delta": (0.0, float, _nonneg, ">= 0"),
    "semi.fraction": (0.0, float, _unit, "in [0, 1]"),
    "semi.delta_until": (1.0, float, lambda v: 0 < v <= 1, "in (0, 1]: the fraction of the joint phase Delta applies; after it Delta = 0 and the labelled factors return to SVI (section 2.5); 1: throughout"),
    "semi.average_factors": (False, bool, None, "true or false (the labelled factors' gradient-trained prior parameters averaged like the networks' weights, train.ema_decay)"),
    "semi.swap_weight": (0.0, float, _nonneg, ">= 0: weight of the swap-consistency term (fmvae.levers, a departure from the paper); 0: off"),
    "semi.adversary_weight": (0.0, float, _nonneg, ">= 0: weight of the encoder's term that makes the adversary's predictions of a named property from the other blocks uniform (fmvae.levers, a departure from the paper); 0: off"),
    "evaluate.recon_samples": (1, int, _pos, ">= 1"),
    "evaluate.iw_samples": (100, int, _nonneg, ">= 0 (0 skips the IWAE estimate)"),
    "evaluate.iw_points": (500, int, _pos, ">= 1"),
    "properties.judge_iters": (500, int, _pos, ">= 1"),
    "properties.samples": (1000, int, _pos, ">= 1"),
    "plot.factors": ([0, 0], list, lambda v: len(v) == 2 and all(isinstance(i, int) and i >= 0 for i in v), "two factor indices"),
    "plot.max_components": (10, int, _pos, ">= 1"),
    "plot.samples_per_cell": (100, int, _pos, ">= 1 (each grid cell averages this many conditional samples)"),
    "sweep.data": (["binarized_mnist", "omniglot"], list, lambda v: v != [] and len(set(v)) == len(v) and all(d in DATASETS for d in v), "a non-empty list of distinct data sets from " + ", ".join(DATASETS)),
    "sweep.K": ([2, 4, 8, 16, 32, 64, 128, 256, 512], list, lambda v: v != [] and all(isinstance(k, int) and k >= 1 for k in v), "a non-empty list of ints >= 1"),
    "sweep.seeds": ([0, 1, 2], list, lambda v: v != [] and all(isinstance(k, int) and k >= 0 for k in v), "a non-empty list of ints >= 0"),
    "sweep.I": ([1], list, lambda v: v != [] and all(isinstance(k, int) and k >= 1 for k in v), "a non-empty list of ints >= 1"),
    "sweep.cpus_per_trial": (2.0, float, _pos, "> 0"),
    "sweep.gpus_per_trial": (0.25, float, _unit, "in [0, 1] (a fraction lets trials share a GPU)"),
    "sweep.pack": (1, int, _pos, ">= 1 (the most trials of one data set and I trained as one vectorised model, fmvae.pack; 1: each trial alone, the CPU's best)"),
    "sweep.max_failures": (1, int, _nonneg, ">= 0 (retries of a trial that raises)"),
    "sweep.iters.pretrain": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
    "sweep.iters.prior_init": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
    "sweep.iters.joint": (None, (int, type(None)), lambda v: v is None or v >= 0, "null or >= 0"),
}


def default(key: str):
    return SCHEMA[key][0]
