"""Stage pretrain: encoder and decoder under a N(0, I) prior."""
from _common import CHECKPOINTS, CURVES, DATA, MODELS, main

from fmvae.core.pipeline import train_stage

if __name__ == "__main__":
    main(lambda params: train_stage("pretrain", params, DATA, None, MODELS / "pretrain.pt",
                                    CHECKPOINTS / "pretrain", CURVES / "pretrain.csv"))
