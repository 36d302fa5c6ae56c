"""The paper's reports from sweep results and trained models: Figure 3 and the property tables.

Everything here takes plain tables (pandas) or a model plus a Dataset, so any
data set with labelled properties (mnist's digit, synthetic's shape and position,
CelebA's Male / Eyeglasses / Smiling) produces the same table.
"""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text

# Test ELBOs the paper reports (section 4.1): data set -> (K, ELBO).
PAPER_ELBO = {"binarized_mnist": (512, -85.77), "omniglot": (256, -90.89)}
# CelebA (section 4.2, Table 1): property -> (accuracy of argmax q(r_i|x), human judgement of clamped samples).
PAPER_CELEBA = {"Male": (0.97, 0.94), "Eyeglasses": (0.99, 0.85), "Smiling": (0.91, 0.81)}
TERMS = ("elbo", "recon", "kl_z", "kl_r")
# one row per trial: its grid point, what a finished trial reports (its terms and its budget:
# iterations per phase, batch, data sizes), then its status
TRIAL_REPORT = ["elbo", "recon", "kl_z", "kl_r", "components_used", "pretrain_iters", "prior_init_iters",
                "joint_iters", "batch_size", "train_points", "test_points", "wall_s"]
RESULT_COLUMNS = ["dataset", "K", "I", "seed", *TRIAL_REPORT, "status", "error", "fingerprint"]


TERM_TITLES = {"elbo": "test ELBO (11)", "recon": "reconstruction E[log p(x|z)]", "kl_z": "KL[z]", "kl_r": "KL[r]",
               "elbo_change": "test ELBO minus its seed's K = {k} trial"}
# the paper's budget (appendix E), written beside ours on Figure 3
PAPER_BUDGET = "paper: 1e5 + 2e4 + 2e5 iterations, full training sets"


def paired_change(results: pd.DataFrame, term: str = "elbo") -> pd.Series:
    """Each finished trial's `term` minus that of its own seed's smallest-K trial (same data set, I
    and seed): the K effect read free of the offset a seed's pre-training gives all its K."""
    done = results[results["status"] == "done"]
    keys = ["dataset", "I", "seed"]
    base = done.sort_values("K").groupby(keys)[term].transform("first")
    return (done[term] - base).rename(f"{term}_change")


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, min and max over seeds of each term, per (dataset, I, K), the seed band (max - min)
    of the ELBO, and the same statistics of the ELBO's change from each seed's own smallest-K trial
    (paired_change); finished trials only."""
    done = results[results["status"] == "done"].assign(elbo_change=paired_change(results))
    cols = list(TERMS) + ["elbo_change"]
    g = done.groupby(["dataset", "I", "K"])[cols]
    out = (g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_std")).join(g.min().add_suffix("_min"))
           .join(g.max().add_suffix("_max")).join(g.size().rename("seeds")))
    out["elbo_band"] = out["elbo_max"] - out["elbo_min"]
    out["elbo_change_band"] = out["elbo_change_max"] - out["elbo_change_min"]
    return out.reset_index().sort_values(["dataset", "I", "K"])


def sweep_summary(results: pd.DataFrame) -> dict:
    """The sweep's metrics for `dvc metrics show` / `dvc exp show`, per data set: trials done and failed,
    the K of the best mean test ELBO over seeds, that ELBO, and its paired gain over each seed's smallest-K
    trial (paired_change: mean, min and max over seeds)."""
    summary = {}
    for dataset, part in results.groupby("dataset"):
        agg = aggregate(part)
        best = agg.loc[agg["elbo_mean"].idxmax()] if len(agg) else None
        summary[dataset] = {"trials_done": int((part["status"] == "done").sum()),
                            "trials_failed": int((part["status"] != "done").sum())}
        if best is not None:
            summary[dataset] |= {"best_K": int(best["K"]), "best_elbo": round(float(best["elbo_mean"]), 4),
                                 "best_gain": round(float(best["elbo_change_mean"]), 4),
                                 "best_gain_min": round(float(best["elbo_change_min"]), 4),
                                 "best_gain_max": round(float(best["elbo_change_max"]), 4),
                                 "seeds": int(best["seeds"])}
    return summary


def pretraining_wide(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The long pre-training curves (dataset, seed, I, step, elbo, kl) as one wide table per data set,
    step then elbo_seed<s>[_I<i>] and kl_seed<s>[_I<i>] columns: what `dvc plots` draws as one line per column."""
    tables = {}
    for dataset, part in curves.groupby("dataset"):
        series = part.assign(run=[f"seed{s}" + (f"_I{i}" if part["I"].nunique() > 1 else "")
                                  for s, i in zip(part["seed"], part["I"])])
        wide = series.pivot_table(index="step", columns="run", values=["elbo", "kl"])
        wide.columns = [f"{term}_{run}" for term, run in wide.columns]
        tables[dataset] = wide.reset_index()
    return tables


def budget(results: pd.DataFrame) -> str:
    """The training budget behind a set of trials, as one line for a figure."""
    def values(col):
        return "/".join(f"{v:,}" for v in sorted(results[col].dropna().astype(int).unique()))
    return (f"pre-train {values('pretrain_iters')} + prior init {values('prior_init_iters')} + joint "
            f"{values('joint_iters')} iterations, batch {values('batch_size')}; {values('train_points')} training, "
            f"{values('test_points')} test images")


def write_table(df: pd.DataFrame, stem: Path) -> None:
    """The same table as stem.csv and stem.md, each written atomically."""
    atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    blanks = df.astype(object).where(df.notna(), None)  # an empty cell, not "nan", where a value is missing
    atomic_write_text(stem.with_suffix(".md"), blanks.to_markdown(index=False, floatfmt=".3f", missingval="") + "\n")


def _figure3_row(axes, done: pd.DataFrame, dataset: str) -> None:
    """One data set's five panels: each term against K on a log2 axis, mean over seeds with the
    min-max band and every seed's value as a dot; the fifth the ELBO paired by seed (paired_change),
    so that the K effect shows without the seeds' common offsets."""
    agg = aggregate(done)
    done = done.assign(elbo_change=paired_change(done))
    seeds = sorted(done["seed"].unique())
    for ax, term in zip(axes, TERMS + ("elbo_change",)):
        for I, part in agg.groupby("I"):
            K = part["K"].to_numpy()
            line, = ax.plot(K, part[f"{term}_mean"], "o-", ms=4,
                            label=f"I = {I}: mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
            ax.fill_between(K, part[f"{term}_min"], part[f"{term}_max"], color=line.get_color(), alpha=0.2,
                            label="min-max over seeds" if len(seeds) > 1 else None)
            trials = done[done["I"] == I]
            ax.plot(trials["K"], trials[term], ".", color=line.get_color(), alpha=0.5, ms=4)
        if term == "elbo" and dataset in PAPER_ELBO:
            k, v = PAPER_ELBO[dataset]
            ax.plot([k], [v], "r*", ms=12, label=f"paper: {v} at K = {k}")
        ax.set_xscale("log", base=2)
        ticks = sorted(done["K"].unique())
        ax.set_xticks(ticks, [str(k) for k in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("K (components, log2 axis)")
        ax.set_ylabel("nats per image")
        ax.set_title(f"{dataset}: {TERM_TITLES[term].format(k=min(done['K']))}", fontsize=9)
        if term == "elbo_change":  # zero at the smallest K by construction: the line to read the K effect from
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def _save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def figure3(results: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The paper's Figure 3: test ELBO, reconstruction, KL[z] and KL[r] against K, from the sweep's
    results. Writes figure3_<dataset>.{csv,md,png} per data set and figure3.png with every data set
    (one row each, as the paper puts MNIST and Omniglot side by side); the budget is on each figure."""
    import matplotlib.pyplot as plt

    done = results[results["status"] == "done"]
    datasets = sorted(done["dataset"].unique())
    if not datasets:
        raise ValueError("figure3: no finished trials in the sweep's results")
    written = []
    for dataset in datasets:
        part = done[done["dataset"] == dataset]
        write_table(aggregate(part), out_dir / f"figure3_{dataset}")
        fig, axes = plt.subplots(1, 5, figsize=(20, 3.6), constrained_layout=True)
        _figure3_row(axes, part, dataset)
        fig.suptitle(f"Figure 3, {dataset}: {budget(part)} ({PAPER_BUDGET})", fontsize=9)
        written += [_save_png(fig, out_dir / f"figure3_{dataset}.png"), out_dir / f"figure3_{dataset}.csv",
                    out_dir / f"figure3_{dataset}.md"]
        plt.close(fig)
    fig, axes = plt.subplots(len(datasets), 5, figsize=(20, 3.6 * len(datasets)), squeeze=False,
                             constrained_layout=True)
    for row, dataset in zip(axes, datasets):
        _figure3_row(row, done[done["dataset"] == dataset], dataset)
    lines = [f"{d}: {budget(done[done['dataset'] == d])}" for d in datasets]
    fig.suptitle("Figure 3: the test bound (11) and its parts against K\n" + "\n".join(lines) + f"\n({PAPER_BUDGET})",
                 fontsize=9)
    written.append(_save_png(fig, out_dir / "figure3.png"))
    plt.close(fig)
    return written


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
        preds = predict(clf, ds.to_float(ds.x_test.to(device)))
    acc = [float((preds[:, p] == ds.y_test[:, p].to(device)).float().mean()) for p in range(len(ds.property_K))]
    return clf, acc


@torch.no_grad()
def predict(clf, x, batch: int = 500) -> torch.Tensor:
    return torch.cat([torch.stack([l.argmax(-1) for l in clf(x[s:s + batch])], -1) for s in range(0, len(x), batch)])


@torch.no_grad()
def judge_samples(model, clf, ds, n: int = 1000, seed: int = 0) -> tuple[list[float], list[list[float]]]:
    """Agreement of the judge with the clamped value of each property, for decoder means of samples
    drawn with every labelled factor's k clamped uniformly at random and the other factors sampled
    (the paper's Table 1 set-up). Returns the agreement per property and, per property, the
    agreement among the samples clamped to each of its values (which digits fail, say)."""
    torch.manual_seed(seed)
    dev = model.prior.lam.device
    clamp = torch.full((n, model.I), -1, dtype=torch.long, device=dev)
    for p, k in enumerate(ds.property_K):
        clamp[:, p] = torch.randint(k, (n,), device=dev)
    z, _ = model.prior.sample(n, clamp)
    images = model.decode_mean(z.to(dev))
    if ds.kind == "rgb":
        images = images.clamp(-1, 1)
    hit = (predict(clf, images) == clamp[:, :len(ds.property_K)]).float()
    per_value = [[float(hit[clamp[:, p] == v, p].mean()) for v in range(k)] for p, k in enumerate(ds.property_K)]
    return [float(hit[:, p].mean()) for p in range(len(ds.property_K))], per_value


def property_table(names: list[str], accuracy: list[float], judged: list[float], judge_accuracy: list[float],
                   dataset: str, judged_per_value: list[list[float]] | None = None) -> pd.DataFrame:
    rows = []
    for p, (name, acc, agree, jacc) in enumerate(zip(names, accuracy, judged, judge_accuracy)):
        paper = PAPER_CELEBA.get(name) if dataset == "celeba" else None
        rows.append({"property": name, "accuracy_argmax_q_r": acc, "paper_accuracy": paper[0] if paper else None,
                     "judge_agreement_clamped_samples": agree, "paper_human_judgement": paper[1] if paper else None,
                     "judge_test_accuracy": jacc})
        if judged_per_value is not None:
            rows[-1]["agreement_per_value"] = " ".join(f"{v}:{a:.2f}" for v, a in enumerate(judged_per_value[p]))
    return pd.DataFrame(rows)


# Published semi-supervised MNIST accuracies with 100 labels and 50,000 unlabelled training images
# (Kingma et al. 2014, "Semi-supervised learning with deep generative models", Table 1).
KINGMA_2014_MNIST_100 = {"M2": 0.880, "M1+M2": 0.967}


def semi_supervised_table(runs: list[dict]) -> pd.DataFrame:
    """Our semi-supervised runs beside the published figures. Each run: name, labels (count),
    unlabelled (count), acc (argmax q(r|x) on held-out images), agreement (judge vs clamped samples),
    judge_acc (the judge's own test accuracy), elbo."""
    rows = [{"model": f"fmvae ({r['name']})", "labels": r["labels"], "unlabelled_train_images": r["unlabelled"],
             "accuracy_argmax_q_r": r["acc"], "judge_agreement_clamped_samples": r["agreement"],
             "judge_test_accuracy": r["judge_acc"], "test_elbo": r["elbo"]} for r in runs]
    rows += [{"model": f"Kingma et al. 2014, {m}", "labels": 100, "unlabelled_train_images": 50000,
              "accuracy_argmax_q_r": a} for m, a in KINGMA_2014_MNIST_100.items()]
    return pd.DataFrame(rows)


def property_reports(model, ds, params, out_dir: Path, dev: torch.device) -> pd.DataFrame | None:
    """Per labelled property: accuracy of argmax q(r_i|x) on the test set, and the agreement of an
    automatic judge (a classifier trained on the real labelled images) with the clamped value of
    samples; written as <out_dir>/<dataset>_table.{md,csv}, and as <out_dir>/properties.json (a plain
    output, not a metrics file: acc_<p>, agreement_<p>, judge_acc_<p>, read by stages/semi_table.py).
    Data sets without labels, or trained without them, get an empty table and an empty properties.json."""
    from .evaluate import evaluate_bound, supervised_accuracy
    stem = out_dir / f"{ds.name}_table"
    if ds.y_train is None or not params.semi.fraction > 0:
        why = "has no labelled properties" if ds.y_train is None else "was trained without labels (semi.fraction = 0)"
        write_table(property_table([], [], [], [], ds.name), stem)
        atomic_write_json(out_dir / "properties.json", {})
        print(f"properties: {ds.name} {why}; wrote an empty {stem}.md")
        return None
    res = evaluate_bound(model, ds.x_test.to(dev), ds.to_float)
    acc = [supervised_accuracy(res["assignments"][:, p], ds.y_test[:, p]) for p in range(len(ds.property_K))]
    p = params.properties
    judge, judge_acc = train_judge(ds, p.judge_iters, seed=params.seed, device=dev)
    agreement, per_value = judge_samples(model, judge, ds, p.samples, params.seed)
    table = property_table(ds.property_names, acc, agreement, judge_acc, ds.name, per_value)
    write_table(table, stem)
    atomic_write_json(out_dir / "properties.json", {f"{key}_{name}": v[i] for i, name in enumerate(ds.property_names)
                                                    for key, v in (("acc", acc), ("agreement", agreement),
                                                                   ("judge_acc", judge_acc))})
    print(table.to_string(index=False))
    return table
