"""fmvae: the factorial mixture prior VAE of Paquet, Ghaisas and Tieleman.

    fmvae.prior       the prior, q(xi), local step, SVI, sampling (fmvae.distributions: the families)
    fmvae.clustering  symmetry breaking: k-means++, factorial k-means with a latent rotation
    fmvae.nets        encoders and decoders of section 4
    fmvae.model       FMVAE: the bound (4a)-(4e), (8), (11), IWAE, conditional samples
    fmvae.train       what each phase trains: pre-training, prior initialisation, joint training
    fmvae.step        how an iteration runs (eager, compiled, CUDA graph) and the loop: checkpoints, resume
    fmvae.evaluate    test bound, accuracies
    fmvae.data        data sets, downloads and the local mirror
    fmvae.params      every setting declared once (typed sections of params.yaml), its loading and checks, TrainConfig
    fmvae.config      what the training stages share: device, model, the code digest
    fmvae.runs        committed runs and the commit whose code made them
"""
__all__ = ["FMVAE", "FactorialMixturePrior", "Hyperprior"]
__version__ = "0.1.0"
_HOME = {"FMVAE": "model", "FactorialMixturePrior": "prior", "Hyperprior": "prior"}


def __getattr__(name: str):
    """`from fmvae import FMVAE` loads fmvae.model on first use (PEP 562), so that `import fmvae.data`
    (the download stage, the table scripts) loads no training code and depends on none."""
    if name in _HOME:
        import importlib
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'fmvae' has no attribute {name!r}")
