"""fmvae: the factorial mixture prior VAE of Paquet, Ghaisas and Tieleman.

    fmvae.params      every setting declared once (typed sections of params.yaml), its loading and checks, TrainConfig
    fmvae.core        what trains and evaluates; its files are the code digest that keys every checkpoint
        distributions/  the exponential families (Normal-Gamma, Dirichlet): natural parameters, statistics, KL
        prior           the prior, q(xi), local step, SVI, sampling
        clustering      symmetry breaking: k-means++, factorial k-means with a latent rotation
        nets, model     encoders and decoders of section 4; FMVAE: the bound (4a)-(4e), (8), (11), IWAE
        levers          the named departures (swap consistency, the adversary)
        loop, phases    how an iteration runs (eager, compiled, CUDA graph) and the loop; what each phase trains
        build, evaluate, pipeline   device and model from params; test bound; the DVC stages' functions
    fmvae.data        data sets, downloads and the local mirror
    fmvae.pack        many small models trained as one vmapped model (the sweep on a GPU)
    fmvae.sweep       the Ray Tune sweep: keys, storage, trainables, driver
    fmvae.reporting   tables, figures, the judge, committed runs and named experiments
    fmvae.tools       the benchmark and the GPU check
    fmvae.io          atomic files and checksummed checkpoints
    fmvae.provenance  git commit, host, package versions, the code digest and fingerprints
"""
__all__ = ["FMVAE", "FactorialMixturePrior", "Hyperprior"]
__version__ = "0.1.0"
_HOME = {"FMVAE": "core.model", "FactorialMixturePrior": "core.prior", "Hyperprior": "core.prior"}


def __getattr__(name: str):
    """`from fmvae import FMVAE` loads fmvae.core.model on first use (PEP 562), so that `import fmvae.data`
    (the download stage, the table scripts) loads no training code and depends on none."""
    if name in _HOME:
        import importlib
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'fmvae' has no attribute {name!r}")
