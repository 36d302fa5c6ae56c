"""Ray Tune sweep over the `sweep` params -> reports/sweep/results.csv (one row per trial),
reports/sweep/pretraining.csv / pretraining_curves.csv (each shared pre-training: its averaged
model's test bound under N(0, I) and its training curve), and reports/sweep/provenance.json (the
params, commit, host and versions it ran with: the commit the committed Figure 3 names).

    python stages/sweep.py                              # params.yaml's grid (GPU-sized); local Ray, or RAY_ADDRESS
    python stages/sweep.py --sweep-params sweep/params.yaml   # a sweep's own params file (the committed CPU run)
    python stages/sweep.py --address HOST:6379 --storage s3://bucket/fmvae   # a Ray cluster, state in shared storage
    python stages/sweep.py --retry-failed               # rerun trials recorded as failed
    python stages/sweep.py --callback mlflow            # also log trials to MLflow (pip install mlflow)
    tensorboard --logdir checkpoints/sweep/ray          # every trial's curves: pretrain/*, prior_init/*, joint/*

Interrupt it and run it again: finished trials are kept, unfinished ones resume from their last
checkpoint in the storage (default checkpoints/sweep; FMVAE_SWEEP_STORAGE or --storage: a folder or
any URI Ray Tune accepts). Where the storage is does not change a number, so it is not a param.
"""
import argparse
import os

from _common import CHECKPOINTS, REPORTS, main

from fmvae import provenance
from fmvae.io import atomic_write_json, atomic_write_text
from fmvae.sweep.driver import pretraining_report, run_sweep


def sweep(params, args):
    df = run_sweep(params, args.storage, args.address, args.retry_failed, args.callback)
    atomic_write_text(REPORTS / "sweep" / "results.csv", df.to_csv(index=False))
    pretrained, curves = pretraining_report(params, args.storage)
    atomic_write_text(REPORTS / "sweep" / "pretraining.csv", pretrained.to_csv(index=False))
    atomic_write_text(REPORTS / "sweep" / "pretraining_curves.csv", curves.to_csv(index=False))
    atomic_write_json(REPORTS / "sweep" / "provenance.json", provenance.record(params))
    print(df.drop(columns=["error", "fingerprint"]).to_string(index=False))
    print(pretrained.drop(columns=["pretrain"]).to_string(index=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-params", default=None, help="a YAML file whose `sweep:` section replaces params.yaml's")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--storage", default=os.environ.get("FMVAE_SWEEP_STORAGE") or str(CHECKPOINTS / "sweep"),
                        help="where data, pre-trainings, trial checkpoints and records live: a folder or a URI "
                             "(s3://, gs://, file://); every node must reach it (default: FMVAE_SWEEP_STORAGE or "
                             "checkpoints/sweep)")
    parser.add_argument("--retry-failed", action="store_true", help="restart trials that failed before")
    parser.add_argument("--callback", action="append", default=[], choices=["mlflow", "wandb"],
                        help="also log every trial to MLflow (./mlruns, or MLFLOW_TRACKING_URI) or Weights & Biases "
                             "(project fmvae); needs that package installed; repeatable")
    args = parser.parse_args()
    main(lambda params: sweep(params, args), args.sweep_params)
