"""Figures drawn as the paper draws them.

    sample_grid      Figures 1/6/8/9/10: the components of two factors iterated, rows x columns;
                     each cell the mean of `per_cell` conditional samples (the other factors
                     sampled), labelled with the property and its value for semi-supervised
                     factors, with component index and mixture weight otherwise
    cluster_figure   Figure 4: per component its mean, its variance (one colour scale for all
                     rows, with a colour bar) and samples; each row its mixture weight
    training_curves  one panel per term, the three phases on one iteration axis

Pictures are tiled with torchvision.utils.make_grid (one image per grid). The library picks no
matplotlib backend: the scripts that draw (stages/plot.py, fmvae.tools.gpu_check) choose it.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torchvision.utils import make_grid

from fmvae.io import atomic_write_bytes
from fmvae.params import PHASE_SECTIONS

log = logging.getLogger(__name__)
PHASES = tuple(PHASE_SECTIONS)  # the training phases, in order


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    log.info("wrote %s", path)
    return path


def to_unit(ds, x: torch.Tensor) -> torch.Tensor:
    """Decoder means -> images in [0, 1], (N, C, H, W)."""
    x = x.detach().float().cpu()
    x = (x + 1) / 2 if ds.kind == "rgb" else x
    return x.clamp(0, 1)


def components(model, factor: int, n: int, named: bool) -> list[int]:
    """The components to show: a named property's values in order; otherwise the n heaviest."""
    if named:
        return list(range(min(n, model.K[factor])))
    w = model.prior.mixture_weights()[factor]
    return w.argsort(descending=True)[: min(n, model.K[factor])].tolist()


def component_label(model, factor: int, k: int, names: dict) -> str:
    if factor in names:
        return f"{names[factor]} = {k}"
    return f"k={k} ({model.prior.mixture_weights()[factor, k]:.3f})"


@torch.no_grad()
def conditional_means(model, clamps: torch.Tensor, per_cell: int, chunk: int = 2000) -> torch.Tensor:
    """Mean decoder output of `per_cell` samples for each row of clamps (C, I) (-1: sampled).

    Each sample draws its own components for the free factors and its own z (2.6, (10))."""
    fixed = clamps.to(model.prior.lam.device).repeat_interleave(per_cell, 0)
    z, k = model.prior.sample(len(fixed), fixed)
    assert torch.equal(torch.where(fixed >= 0, k, fixed), fixed)
    x = torch.cat([model.decode_mean(z[s:s + chunk].to(fixed.device)) for s in range(0, len(z), chunk)])
    return x.view(len(clamps), per_cell, *x.shape[1:]).mean(1)


def sample_grid(model, ds, factors, max_components: int, path: Path, per_cell: int = 100,
                names: dict | None = None) -> tuple[Path, torch.Tensor]:
    """Rows: components of factor a; columns: components of factor b; each cell the mean of
    `per_cell` conditional samples with both clamped and the other factors sampled.

    With a == b (e.g. I = 1) a row clamps one component and its columns are single samples (a
    mean of samples of one component would repeat one blurred image). `names` maps a factor to
    its property name (semi-supervised factors). Returns the path and the cells (R, C, ch, H, W).
    """
    names = names or {}
    a, b = factors
    rows = components(model, a, max_components, a in names)
    if a == b:
        cols = list(range(max_components))
        clamps = torch.full((len(rows) * len(cols), model.I), -1, dtype=torch.long)
        clamps[:, a] = torch.tensor(rows).repeat_interleave(len(cols))
        cells = conditional_means(model, clamps, 1)
        col_labels, x_label = [f"sample {j + 1}" for j in cols], "independent samples (Student-t predictive)"
    else:
        cols = components(model, b, max_components, b in names)
        clamps = torch.full((len(rows) * len(cols), model.I), -1, dtype=torch.long)
        clamps[:, a] = torch.tensor(rows).repeat_interleave(len(cols))
        clamps[:, b] = torch.tensor(cols).repeat(len(rows))
        cells = conditional_means(model, clamps, per_cell)
        col_labels = [component_label(model, b, k, names) for k in cols]
        x_label = f"factor {b}" + (f" ({names[b]})" if b in names else ": component (mixture weight)")
    images = to_unit(ds, cells)
    pad = 2
    grid = make_grid(images, nrow=len(cols), padding=pad, pad_value=1.0)
    h, w = images.shape[-2:]
    fig, ax = plt.subplots(figsize=(0.75 * len(cols) + 1.8, 0.75 * len(rows) + 1.2))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))])
    ax.set_yticklabels([component_label(model, a, k, names) for k in rows], fontsize=7)
    ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(len(cols))])
    ax.set_xticklabels(col_labels, fontsize=6, rotation=60 if a != b else 0, ha="left" if a != b else "center")
    ax.xaxis.tick_top()
    ax.set_ylabel(f"factor {a}" + (f" ({names[a]})" if a in names else ": component (mixture weight)"))
    ax.set_xlabel(x_label)
    mean_of = f"each cell the mean of {per_cell} samples" if a != b and per_cell > 1 else "one sample per cell"
    ax.set_title(f"{ds.name}, K = {list(model.K)}: conditional samples, {mean_of}", fontsize=9, pad=40 if a != b else 18)
    return save_figure(fig, path), cells.view(len(rows), len(cols), *cells.shape[1:])


@torch.no_grad()
def cluster_figure(model, ds, factor: int, path: Path, n_clusters: int = 8, n_draws: int = 100,
                   n_show: int = 6, names: dict | None = None) -> Path:
    """Figure 4: for each shown component the mean and variance of `n_draws` decoded samples
    (the variance on one colour scale for every row, with its colour bar) and a few samples.
    A named property's factor shows every value (a digit factor all ten); a free one its
    `n_clusters` heaviest components."""
    names = names or {}
    named = factor in names
    comps = components(model, factor, model.K[factor] if named else n_clusters, named)
    stats = []
    for k in comps:
        clamp = torch.full((n_draws, model.I), -1, dtype=torch.long)
        clamp[:, factor] = k
        imgs = to_unit(ds, conditional_means(model, clamp, 1))
        stats.append((imgs.mean(0), imgs.var(0).mean(0), imgs[:n_show]))
    vmax = max(float(v.max()) for _, v, _ in stats) or 1.0
    fig, axes = plt.subplots(len(comps), 3, figsize=(2.0 + 0.9 * n_show, 1.05 * len(comps) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, n_show]})
    for r, (k, (mean, var, samples)) in enumerate(zip(comps, stats)):
        axes[r][0].imshow(mean.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        shown = axes[r][1].imshow(var.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        axes[r][2].imshow(make_grid(samples, nrow=n_show, padding=2, pad_value=1.0).permute(1, 2, 0).numpy(),
                          cmap="gray", vmin=0, vmax=1)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(component_label(model, factor, k, names).replace(" (", "\npi = ").rstrip(")"),
                              fontsize=7)
    for c, title in enumerate(("mean", "variance", f"samples (of {n_draws} drawn)")):
        axes[0][c].set_title(title, fontsize=8)
    fig.subplots_adjust(right=0.88, wspace=0.08)
    fig.colorbar(shown, cax=fig.add_axes([0.90, 0.15, 0.015, 0.68]), label="pixel variance (all rows)")
    what = names.get(factor, f"factor {factor}")
    shown_what = f"each of its {len(comps)} values clamped" if named else f"the {len(comps)} heaviest components"
    fig.suptitle(f"{ds.name}: K = {model.K[factor]}, {what}; {shown_what}", fontsize=9)
    return save_figure(fig, path)


TERMS = (("elbo", "ELBO"), ("recon", "reconstruction E[log p(x|z)]"), ("kl_z", "KL[z]"), ("kl_r", "KL[r]"),
         ("ce", "cross-entropy of labels (8)"))


def training_curves(curve_files, path: Path) -> Path:
    """One panel per term, the phases one after another on a shared iteration axis, their
    boundaries marked; nats per point. Pre-training's KL (to N(0, I)) is drawn in the KL[z] panel."""
    frames, offset, bounds = {}, 0, []
    for f in map(Path, curve_files):
        if not f.exists() or f.stat().st_size == 0:
            continue
        df = pd.read_csv(f)
        phase = next((p for p in PHASES if f.stem.endswith(p)), f.stem)
        df = df.rename(columns={"kl": "kl_z"}) if phase == "pretrain" else df
        df["iteration"] = df["step"] + offset
        frames[phase] = df
        offset += int(df["step"].max())
        bounds.append((offset, phase))
    terms = [(t, label) for t, label in TERMS if any(t in df and df[t].abs().max() > 0 for df in frames.values())]
    ncols = min(3, max(1, len(terms)))
    nrows = -(-max(1, len(terms)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.ravel()[len(terms):]:
        ax.set_visible(False)
    colours = dict(zip(PHASES, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (term, label) in zip(axes.ravel(), terms):
        for phase, df in frames.items():
            if term in df:
                name = "KL to N(0, I)" if phase == "pretrain" and term == "kl_z" else phase
                ax.plot(df["iteration"], df[term], color=colours.get(phase), label=name, lw=1.2)
        for end, _ in bounds[:-1]:
            ax.axvline(end, color="grey", ls="--", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration (all phases)")
        ax.set_ylabel("nats per point")
        ax.legend(fontsize=7)
    fig.suptitle("training curves (dashed: phase boundaries)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def model_figures(model, ds, params, out_dir: Path, curves) -> list[Path]:
    """Sample grid over two factors (Figures 1/6/8), per-component mean/variance/samples (Figure 4),
    training curves. Factors clamped to a property in training are labelled with its name."""
    p = params.plot
    names = ({i: n for i, n in enumerate(ds.property_names) if i < model.I}
             if params.semi.fraction > 0 else {})
    grid, _ = sample_grid(model, ds, p.factors, p.max_components, out_dir / "samples_grid.png",
                          per_cell=p.samples_per_cell, names=names)
    return [grid, cluster_figure(model, ds, p.factors[0], out_dir / "clusters.png", names=names),
            training_curves(curves, out_dir / "training_curves.png")]
