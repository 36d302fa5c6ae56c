"""Stage joint_train: gamma -> Adam on theta, phi -> recompute gamma -> SVI on q(xi)."""
from _common import CHECKPOINTS, CURVES, DATA, MODELS, main

from fmvae.core.pipeline import train_stage

if __name__ == "__main__":
    main(lambda params: train_stage("joint", params, DATA, MODELS / "prior_init.pt", MODELS / "joint.pt",
                                    CHECKPOINTS / "joint", CURVES / "joint.csv",
                                    snapshots_out=MODELS / "joint_snapshots.pt"))
