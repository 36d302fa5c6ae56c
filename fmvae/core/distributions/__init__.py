"""Exponential-family building blocks of the prior, one module per family."""
from fmvae.core.distributions import dirichlet, normal_gamma

__all__ = ["dirichlet", "normal_gamma"]
