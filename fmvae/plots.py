"""Figures: conditional sample grids (Figures 1/6/8), cluster statistics (Figure 4), training curves."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _image(ds, x: torch.Tensor):
    """Decoder mean -> something imshow takes: (H, W) grey or (H, W, 3) RGB in [0, 1]."""
    x = x.detach().float().cpu()
    if ds.kind == "rgb":
        return ((x + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    return x[0].clamp(0, 1).numpy() if x.dim() == 3 else x.view(1, -1).numpy()


def _most_used(model, factor: int, n: int) -> list[int]:
    w = model.prior.mixture_weights()[factor]
    return w.argsort(descending=True)[: min(n, model.K[factor])].tolist()


def sample_grid(model, ds, factors, max_components: int, path: Path, per_cell: int = 1) -> Path:
    """Decoder means with k_a (rows) and k_b (columns) clamped, other factors sampled.

    With a == b (e.g. I = 1) the rows are components and the columns independent samples.
    """
    a, b = factors
    rows = _most_used(model, a, max_components)
    cols = _most_used(model, b, max_components) if a != b else list(range(max_components))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(len(cols) * 0.8, len(rows) * 0.8), squeeze=False)
    for r, ka in enumerate(rows):
        clamp = {a: ka} if a == b else None
        batch = model.conditional_samples(len(cols), clamp)[0] if a == b else None
        for c, kb in enumerate(cols):
            img = batch[c] if a == b else model.conditional_samples(per_cell, {a: ka, b: kb})[0].mean(0)
            ax = axes[r][c]
            ax.imshow(_image(ds, img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"k{a}={ka}", fontsize=7)
            if r == 0 and a != b:
                ax.set_title(f"k{b}={kb}", fontsize=7)
    fig.suptitle(f"samples: factor {a} (rows)" + (f" x factor {b} (columns)" if a != b else ", clamped component"))
    return _save(fig, path)


def cluster_figure(model, ds, factor: int, path: Path, n_clusters: int = 6, n_draws: int = 100,
                   n_show: int = 5) -> Path:
    """For the most used components: mean and variance of decoded samples, and a few samples (Figure 4)."""
    comps = _most_used(model, factor, n_clusters)
    fig, axes = plt.subplots(len(comps), 2 + n_show, figsize=((2 + n_show) * 0.9, len(comps) * 0.9), squeeze=False)
    for r, k in enumerate(comps):
        imgs = model.conditional_samples(n_draws, {factor: k})[0]
        panels = [imgs.mean(0), imgs.var(0) / imgs.var(0).max().clamp(min=1e-8)] + list(imgs[:n_show])
        for c, img in enumerate(panels):
            axes[r][c].imshow(_image(ds, img), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(f"k={k}", fontsize=7)
    for c, title in enumerate(["mean", "variance"] + ["sample"] * n_show):
        axes[0][c].set_title(title, fontsize=7)
    return _save(fig, path)


def training_curves(curve_files, path: Path) -> Path:
    """The bound (or its parts) against the step, one panel per phase."""
    files = [Path(f) for f in curve_files if Path(f).exists()]
    fig, axes = plt.subplots(1, max(1, len(files)), figsize=(4.5 * max(1, len(files)), 3.2), squeeze=False)
    for ax, f in zip(axes[0], files):
        df = pd.read_csv(f)
        for col in [c for c in ("elbo", "recon", "kl", "kl_z", "kl_r") if c in df]:
            ax.plot(df["step"], df[col], label=col)
        ax.set_title(f.stem), ax.set_xlabel("iteration"), ax.legend(fontsize=7)
    return _save(fig, path)
