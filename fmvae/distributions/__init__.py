"""Exponential-family building blocks of the prior, one module per family."""
from . import dirichlet, normal_gamma

__all__ = ["dirichlet", "normal_gamma"]
