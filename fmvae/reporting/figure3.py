"""Figure 3 from sweep results: each bound term against K, the mean over seeds with its spread, the ELBO paired
by seed; the summary and the columns a sweep's results carry."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from fmvae.io import atomic_write_bytes
from fmvae.reporting.tables import write_table


# Test ELBOs the paper reports (section 4.1): data set -> (K, ELBO).
PAPER_ELBO = {"binarized_mnist": (512, -85.77), "omniglot": (256, -90.89)}


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
