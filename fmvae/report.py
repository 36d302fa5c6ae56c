"""The paper's reports from sweep results and trained models: Figure 3 and the property tables.

Everything here takes plain tables (pandas) or a model plus a Dataset, so any
data set with labelled properties (mnist's digit, synthetic's shape and position,
CelebA's Male / Eyeglasses / Smiling) produces the same table.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .checkpoint import atomic_write_text

# Test ELBOs the paper reports (section 4.1): data set -> (K, ELBO).
PAPER_ELBO = {"binarized_mnist": (512, -85.77), "omniglot": (256, -90.89)}
# CelebA (section 4.2, Table 1): property -> (accuracy of argmax q(r_i|x), human judgement of clamped samples).
PAPER_CELEBA = {"Male": (0.97, 0.94), "Eyeglasses": (0.99, 0.85), "Smiling": (0.91, 0.81)}
TERMS = ("elbo", "recon", "kl_z", "kl_r")
RESULT_COLUMNS = ["dataset", "K", "I", "seed", "elbo", "recon", "kl_z", "kl_r", "components_used", "iterations",
                  "wall_s", "status", "error", "fingerprint"]


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds of each term, per (dataset, I, K); finished trials only."""
    done = results[results["status"] == "done"]
    g = done.groupby(["dataset", "I", "K"])[list(TERMS)]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_std")).join(g.size().rename("seeds"))
    return out.reset_index().sort_values(["dataset", "I", "K"])


def write_table(df: pd.DataFrame, stem: Path) -> None:
    """The same table as stem.csv and stem.md, each written atomically."""
    atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    atomic_write_text(stem.with_suffix(".md"), df.to_markdown(index=False, floatfmt=".3f") + "\n")


def figure3(results: pd.DataFrame, dataset: str, out_dir: Path) -> Path:
    """Test ELBO, reconstruction, KL[z] and KL[r] against log2 K (mean +- std over seeds), like Figure 3."""
    import matplotlib.pyplot as plt

    agg = aggregate(results[results["dataset"] == dataset])
    write_table(agg, out_dir / f"figure3_{dataset}")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    for ax, term, title in zip(axes, TERMS, ("test ELBO", "E[log p(x|z)]", "KL[z]", "KL[r]")):
        for I, part in agg.groupby("I"):
            x = np.log2(part["K"].to_numpy())
            y, s = part[f"{term}_mean"].to_numpy(), part[f"{term}_std"].fillna(0).to_numpy()
            ax.plot(x, y, "o-", label=f"I = {I}")
            ax.fill_between(x, y - s, y + s, alpha=0.25)
        if term == "elbo" and dataset in PAPER_ELBO:
            k, v = PAPER_ELBO[dataset]
            ax.plot([np.log2(k)], [v], "r*", markersize=12, label=f"paper: {v} at K = {k}")
        ax.set_title(title), ax.set_xlabel("log2 K")
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: test bound (11) and its parts against K (mean, band = std over seeds)", y=1.04)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    from .checkpoint import atomic_write_bytes
    path = out_dir / f"figure3_{dataset}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------
# Property tables: argmax q(r_i|x) accuracy and an automatic judge of samples
# --------------------------------------------------------------------------
class PropertyClassifier(nn.Module):
    """A small CNN with one head per labelled property: the automatic judge of generated images."""

    def __init__(self, in_channels: int, property_K: list[int]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(256, k) for k in property_K)

    def forward(self, x):
        h = self.body(x)
        return [head(h) for head in self.heads]


def train_judge(ds, iters: int = 500, batch: int = 64, seed: int = 0, device="cpu") -> tuple[PropertyClassifier, list[float]]:
    """Fit the judge on the real labelled training images; return it and its test accuracy per property."""
    torch.manual_seed(seed)
    clf = PropertyClassifier(ds.x_shape[0], ds.property_K).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    for _ in range(iters):
        idx = torch.randint(len(x), (batch,), device=x.device, generator=gen)
        logits = clf(ds.to_float(x[idx]))
        loss = sum(nn.functional.cross_entropy(l, y[idx, p], ignore_index=-1) for p, l in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        preds = _predict(clf, ds.to_float(ds.x_test.to(device)))
    acc = [float((preds[:, p] == ds.y_test[:, p].to(device)).float().mean()) for p in range(len(ds.property_K))]
    return clf, acc


@torch.no_grad()
def _predict(clf, x, batch: int = 500) -> torch.Tensor:
    return torch.cat([torch.stack([l.argmax(-1) for l in clf(x[s:s + batch])], -1) for s in range(0, len(x), batch)])


@torch.no_grad()
def judge_samples(model, clf, ds, n: int = 1000, seed: int = 0) -> list[float]:
    """Agreement of the judge with the clamped value of each property, for decoder means of samples
    drawn with every labelled factor's k clamped uniformly at random (the paper's Table 1 set-up)."""
    torch.manual_seed(seed)
    dev = model.prior.lam.device
    P = len(ds.property_K)
    clamp = torch.full((n, model.I), -1, dtype=torch.long, device=dev)
    for p, k in enumerate(ds.property_K):
        clamp[:, p] = torch.randint(k, (n,), device=dev)
    z, _ = model.prior.sample(n, clamp)
    images = model.decode_mean(z.to(dev))
    if ds.kind == "rgb":
        images = images.clamp(-1, 1)
    preds = _predict(clf, images)
    return [float((preds[:, p] == clamp[:, p]).float().mean()) for p in range(P)]


def property_table(names: list[str], accuracy: list[float], judged: list[float], judge_accuracy: list[float],
                   dataset: str) -> pd.DataFrame:
    rows = []
    for name, acc, agree, jacc in zip(names, accuracy, judged, judge_accuracy):
        paper = PAPER_CELEBA.get(name) if dataset == "celeba" else None
        rows.append({"property": name, "accuracy_argmax_q_r": acc, "paper_accuracy": paper[0] if paper else None,
                     "judge_agreement_clamped_samples": agree, "paper_human_judgement": paper[1] if paper else None,
                     "judge_test_accuracy": jacc})
    return pd.DataFrame(rows)

