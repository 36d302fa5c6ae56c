"""python -m fmvae.tools.gpu_check: the arguments, the device, then one of the checks."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fmvae.io import atomic_write_json
from fmvae.params import ORDERS
from fmvae.tools import bench
from fmvae.tools.gpu_check.celeba import celeba_check, make_celeba_subset
from fmvae.tools.gpu_check.common import environment, log
from fmvae.tools.gpu_check.figure3 import figure3_check
from fmvae.tools.gpu_check.mnist import mnist_check


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

    return mnist_check(args, device, out, t_start, env)
