"""Stage prior_init: factorial k-means seeding (and latent rotation), then local step + SVI with the encoder fixed."""
from _common import CHECKPOINTS, CURVES, DATA, MODELS, main

from fmvae.core.pipeline import train_stage

if __name__ == "__main__":
    main(lambda params: train_stage("prior_init", params, DATA, MODELS / "pretrain.pt", MODELS / "prior_init.pt",
                                    CHECKPOINTS / "prior_init", CURVES / "prior_init.csv"))
