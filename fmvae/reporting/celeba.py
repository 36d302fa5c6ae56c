"""CelebA, section 4.2, from a trained semi-supervised model: what the paper shows, and what a
reader needs beside it to trust it.

    property_scores       accuracy of argmax q(r_i|x), balanced accuracy and the majority baseline
    figure6               Figure 6: one column per (Male, Eyeglasses, Smiling) setting in the
                          paper's order; each row one draw of the other factors, held along it
    factor_figure         Figure 8 / appendix F for one free factor: its heaviest components along
                          the columns, everything else held along each row
    figure5               Figure 5: mean, standard deviation and one sample of p(x|z) for a few z
    attributes_of_test_images  the 40 attributes of the prepared test images, from the attribute file
    factor_swap           the judge on reconstructions of the test images and on the same
                          encodings with one labelled factor moved to its other component: does
                          the decoder read that factor at all
    factor_attribute_nmi  normalised mutual information of each factor's argmax q(r_i|x) with each
                          attribute (and nmi_heatmap to draw it)

The library picks no matplotlib backend: stages/celeba_table.py does.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torchvision.utils import make_grid

from fmvae.data import DataError
from fmvae.data.celeba import ATTRIBUTES, PARTITION, ImageSource, read_celeba_attributes
from fmvae.reporting.judge import predict
from fmvae.reporting.plots import component_label, components, save_figure, to_unit

# Figure 6's column titles: a property's value 1 and 0, as the paper abbreviates them.
ABBREVIATIONS = {"Male": ("m", "f"), "Eyeglasses": ("g", "ng"), "Smiling": ("s", "ns")}


def property_scores(pred, true) -> dict:
    """Accuracy, balanced accuracy (the mean of the per-class recalls: Eyeglasses is 7% positive, so
    plain accuracy rewards ignoring it) and the majority baseline (the accuracy of always answering
    the commoner value) of one binary property."""
    pred, true = np.asarray(pred), np.asarray(true)
    recalls = [float((pred[true == c] == c).mean()) for c in np.unique(true)]
    majority = max(float((true == c).mean()) for c in np.unique(true))
    return {"accuracy": float((pred == true).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "majority_baseline": majority}


def normalized_mutual_information(a, b) -> float:
    """I(a; b) / ((H(a) + H(b)) / 2) of two label arrays (the arithmetic normalisation, scikit-learn's
    default): 1 when one determines the other up to relabelling, about 0 when independent, 0 when
    either is constant (a factor that puts every image in one component says nothing)."""
    a, b = np.unique(np.asarray(a), return_inverse=True)[1], np.unique(np.asarray(b), return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    ha, hb = entropy(pa), entropy(pb)
    if ha == 0.0 or hb == 0.0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, mi / ((ha + hb) / 2))


@torch.no_grad()
def factor_swap(model, judge, ds, batch: int = 500) -> list[dict]:
    """What the decoder does with each labelled factor, measured on real faces. For every test image,
    z = its encoder mean; the judge reads the decoder mean of z (the reconstruction) and of z with
    factor p moved from the component of the image's own value y to the other one,
    z_p + m_{p,1-y} - m_{p,y}, all else kept. Per binary property: `judge_on_reconstructions`
    (agreement with y), `judge_sees_factor_swap` (the share judged 1 - y after the move) and
    `swap_per_value` (that share among the images moved to each value). A factor the decoder reads
    flips the judge; one it ignores leaves the reconstruction's answer, and then no clamped sample
    shows the property either: Table 1's agreement for it is near chance whatever q(r|x) scores.
    Each component of a labelled factor is its value (the clamping in training)."""
    dev = model.prior.lam.device
    means = model.prior.mean_params()[0].float().to(dev)  # (I, K, D)
    x, y = ds.x_test, ds.y_test.to(dev)
    recon, swapped = [], [[] for _ in ds.property_K]  # swapped[p]: the judge's reading of property p
    for s in range(0, len(x), batch):
        mu = model.encode(ds.to_float(x[s:s + batch].to(dev)))[0]  # (B, I, D)
        labels = y[s:s + batch]
        recon.append(_judge(judge, model, mu, ds))
        for p, readings in enumerate(swapped):
            moved = mu.clone()
            moved[:, p] += means[p, 1 - labels[:, p]] - means[p, labels[:, p]]
            readings.append(_judge(judge, model, moved, ds)[:, p])
    recon = torch.cat(recon)
    rows = []
    for p, name in enumerate(ds.property_names):
        flipped = torch.cat(swapped[p]) == 1 - y[:, p]
        rows.append({"property": name, "judge_on_reconstructions": float((recon[:, p] == y[:, p]).float().mean()),
                     "judge_sees_factor_swap": float(flipped.float().mean()),
                     "swap_per_value": " ".join(f"{v}:{float(flipped[y[:, p] == 1 - v].float().mean()):.2f}"
                                                for v in range(ds.property_K[p]))})
    return rows


def _judge(judge, model, z, ds) -> torch.Tensor:
    images = model.decode_mean(z.reshape(len(z), -1))
    return predict(judge, images.clamp(-1, 1) if ds.kind == "rgb" else images)


def attributes_of_test_images(folder: Path, ds) -> tuple[list[str], np.ndarray]:
    """All 40 attributes (0/1) of the prepared data set's test images, read again from the attribute
    file in `folder` with the loader's own selection (the images present, partition 2, in file
    order). Checked against the three properties the data set holds: a different selection (other
    files, another partition file) is refused instead of silently misaligned."""
    names = (folder / ATTRIBUTES).read_text().splitlines()[1].split()
    files, values = read_celeba_attributes(folder / ATTRIBUTES, names)
    partition = dict(ln.split() for ln in (folder / PARTITION).read_text().splitlines() if ln.strip())
    absent = set(ImageSource(folder).missing(files))
    test = np.array([f not in absent and partition.get(f) == "2" for f in files])
    values = values[test]
    mine = values[:, [names.index(p) for p in ds.property_names]]
    if mine.shape != tuple(ds.y_test.shape) or not np.array_equal(mine, ds.y_test.numpy()):
        raise DataError(f"celeba: the attribute file in {folder} selects {len(values)} test images whose "
                        f"{ds.property_names} do not match the {len(ds.y_test)} prepared ones; prepare the data again "
                        "from this folder")
    return names, values


def factor_attribute_nmi(assignments: torch.Tensor, attributes: np.ndarray, names: list[str],
                         properties: list[str] = ()) -> pd.DataFrame:
    """Rows: factors (argmax q(r_i|x) per test image), the first ones named after the properties
    they were clamped to; columns: attributes; cells: their NMI. A factor of 64 components can
    reach at most 2 H(a) / (H(f) + H(a)) with a binary attribute a (about 0.28 when H(f) = log 64 and
    a is balanced): its cells read against that ceiling, not against 1."""
    a = np.asarray(assignments)
    rows = [f"factor {i}" + (f" ({properties[i]})" if i < len(properties) else "") for i in range(a.shape[1])]
    return pd.DataFrame([[normalized_mutual_information(a[:, i], attributes[:, j]) for j in range(len(names))]
                         for i in range(a.shape[1])], columns=names, index=rows)


def nmi_heatmap(table: pd.DataFrame, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(0.32 * table.shape[1] + 2.5, 0.45 * table.shape[0] + 2.2))
    vmax = max(0.05, float(table.to_numpy().max()))
    shown = ax.imshow(table.to_numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if v >= 0.05:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 * vmax else "k")
    fig.colorbar(shown, ax=ax, label="normalised mutual information")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------
# Samples with some factors held along a row
# --------------------------------------------------------------------------
@torch.no_grad()
def held_row_means(model, columns: torch.Tensor, rows: int) -> torch.Tensor:
    """Decoder means (rows, C, ch, H, W). Each row draws every factor's component k from E[pi] and its
    z_i once from the predictive (10); each column then sets the components it names (columns: (C, I),
    -1 where the row's draw stays) and draws only those factors' z_i afresh, so that along a row only
    the named factors change. Uses the global RNG."""
    dev = model.prior.lam.device
    columns = columns.to(dev)
    z_row, k_row = model.prior.sample(rows)
    cells = k_row.repeat_interleave(len(columns), 0)
    named = (columns >= 0).repeat(rows, 1)
    clamps = torch.where(named, columns.repeat(rows, 1), cells)
    z_new, k = model.prior.sample(len(clamps), clamps)
    assert torch.equal(k, clamps)
    changed = named.repeat_interleave(model.D, 1)  # (cells, I*D): the named factors' blocks of z
    z = torch.where(changed, z_new, z_row.repeat_interleave(len(columns), 0))
    x = model.decode_mean(z.to(dev))
    return x.view(rows, len(columns), *x.shape[1:])


def _grid_figure(ds, cells: torch.Tensor, col_labels: list[str], row_label: str, title: str, path: Path) -> Path:
    rows, cols = cells.shape[:2]
    images = to_unit(ds, cells.flatten(0, 1))
    pad = 2
    grid = make_grid(images, nrow=cols, padding=pad, pad_value=1.0)
    h, w = images.shape[-2:]
    fig, ax = plt.subplots(figsize=(0.85 * cols + 1.2, 0.85 * rows + 1.4))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(cols)], col_labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.set_ylabel(row_label, fontsize=8)
    ax.set_title(title, fontsize=9, pad=22)
    return save_figure(fig, path)


def property_columns(names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The paper's column order for the labelled factors 0..P-1: value 1 before 0, the first
    property slowest ((m,g,s), (m,g,ns), ..., (f,ng,ns)); returns the components and the titles."""
    settings = list(itertools.product((1, 0), repeat=len(names)))
    titles = ["(" + ",".join(ABBREVIATIONS.get(n, (f"{n}=1", f"{n}=0"))[1 - v] for n, v in zip(names, s)) + ")"
              for s in settings]
    return torch.tensor(settings, dtype=torch.long), titles


def figure6(model, ds, path: Path, rows: int = 8) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Figure 6: columns iterate the labelled factors' settings, each row one draw of the free factors'
    (k, z) held along it (section 4.2); cells the mean of p(x|z). Returns the path, the cells
    (rows, 8, ch, H, W) and the columns' components (8, P)."""
    settings, titles = property_columns(ds.property_names)
    columns = torch.full((len(settings), model.I), -1, dtype=torch.long)
    columns[:, :settings.shape[1]] = settings
    cells = held_row_means(model, columns, rows)
    free = ", ".join(f"k{i + 1}" for i in range(settings.shape[1], model.I))
    title = (f"Figure 6: means of p(x|z), z from (10) with ({', '.join(ds.property_names)}) set per column; "
             f"each row one draw of ({free}) and their z")
    return _grid_figure(ds, cells, titles, f"{rows} draws of the free factors", title, path), cells, settings


def factor_figure(model, ds, factor: int, path: Path, n_components: int = 10, rows: int = 6) -> tuple[Path, torch.Tensor]:
    """Appendix F for one factor: its `n_components` heaviest components along the columns, every
    other factor's (k, z) drawn once per row and held; cells the mean of p(x|z)."""
    comps = components(model, factor, n_components, named=False)
    columns = torch.full((len(comps), model.I), -1, dtype=torch.long)
    columns[:, factor] = torch.tensor(comps)
    cells = held_row_means(model, columns, rows)
    title = (f"factor {factor} (K = {model.K[factor]}): its {len(comps)} heaviest components (mixture weight) "
             "along the columns; each row one draw of the other factors, held")
    labels = [component_label(model, factor, k, {}).replace(" (", "\n(") for k in comps]
    return _grid_figure(ds, cells, labels, f"{rows} draws of the other factors", title, path), cells


@torch.no_grad()
def figure5(model, ds, path: Path, n: int = 6) -> Path:
    """Figure 5: for n draws of z from (10), the mean of p(x|z), its standard deviation (one colour
    scale for all, with a colour bar) and one sample x ~ p(x|z)."""
    z, _ = model.prior.sample(n)
    mean, std = model.decoder(z.to(model.prior.lam.device))
    sample = mean + std * torch.randn_like(std)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n + 1.2, 4.6), squeeze=False)
    vmax = float(std.mean(1).max())
    for j in range(n):
        axes[0][j].imshow(to_unit(ds, mean[j:j + 1])[0].permute(1, 2, 0).numpy())
        shown = axes[1][j].imshow(std[j].mean(0).cpu().numpy(), cmap="viridis", vmin=0, vmax=vmax)
        axes[2][j].imshow(to_unit(ds, sample[j:j + 1])[0].permute(1, 2, 0).numpy())
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    for r, label in enumerate(("mean", "std (mean\nof R, G, B)", "sample")):
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.subplots_adjust(right=0.88, wspace=0.05, hspace=0.05)
    fig.colorbar(shown, cax=fig.add_axes([0.90, 0.38, 0.015, 0.24]), label="std of p(x|z), pixel values in [-1, 1]")
    fig.suptitle(f"Figure 5: p(x|z) for {n} z drawn from (10): mean, standard deviation (in [0.001, 0.4]) and a sample",
                 fontsize=9)
    return save_figure(fig, path)
