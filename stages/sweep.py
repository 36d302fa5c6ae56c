"""Ray Tune sweep over the `sweep` params -> reports/sweep/results.csv.

    python stages/sweep.py                              # params.yaml's grid (GPU-sized); local Ray, or RAY_ADDRESS
    python stages/sweep.py --sweep-params sweep/params.yaml   # a sweep's own params file (the committed CPU run)
    python stages/sweep.py --address HOST:6379          # join a running Ray cluster
    python stages/sweep.py --retry-failed               # rerun trials recorded as failed

Interrupt it and run it again: finished trials are kept, unfinished ones resume.
"""
import argparse

from _common import CHECKPOINTS, REPORTS, main

from fmvae.checkpoint import atomic_write_text
from fmvae.sweep import run_sweep


def sweep(params, args):
    df = run_sweep(params, CHECKPOINTS / "sweep", args.address, args.retry_failed)
    atomic_write_text(REPORTS / "sweep" / "results.csv", df.to_csv(index=False))
    print(df.drop(columns=["error", "fingerprint"]).to_string(index=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-params", default=None, help="a YAML file whose `sweep:` section replaces params.yaml's")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--retry-failed", action="store_true", help="restart trials that failed before")
    args = parser.parse_args()
    main(lambda params: sweep(params, args), args.sweep_params)
