"""fmvae: the factorial mixture prior VAE of Paquet, Ghaisas and Tieleman.

    fmvae.prior       the prior, q(xi), local step, SVI, sampling (fmvae.distributions: the families)
    fmvae.clustering  symmetry breaking: k-means++, factorial k-means with a latent rotation
    fmvae.nets        encoders and decoders of section 4
    fmvae.model       FMVAE: the bound (4a)-(4e), (8), (11), IWAE, conditional samples
    fmvae.train       what each phase trains: pre-training, prior initialisation, joint training
    fmvae.step        how an iteration runs (eager, compiled, CUDA graph) and the loop: checkpoints, resume
    fmvae.evaluate    test bound, accuracies
    fmvae.data        data sets, downloads and the local mirror
    fmvae.config      params.yaml schema and validation
"""
from .model import FMVAE
from .prior import FactorialMixturePrior, Hyperprior

__all__ = ["FMVAE", "FactorialMixturePrior", "Hyperprior"]
__version__ = "0.1.0"
