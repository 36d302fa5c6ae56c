"""The judge of generated properties: a small CNN trained on the real labelled images, its agreement with
the clamped samples, and the per-property tables (accuracy of argmax q(r|x), agreement, the judge's own
accuracy). Any data set with labelled properties (mnist's digit, synthetic's shape and position,
CelebA's Male / Eyeglasses / Smiling) gives the same table."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from fmvae import provenance
from fmvae.io import CorruptCheckpoint, atomic_write_json, cache_root, load_checked, save_checked
from fmvae.reporting.tables import write_table

log = logging.getLogger(__name__)


# CelebA (section 4.2, Table 1): property -> (accuracy of argmax q(r_i|x), human judgement of clamped samples).
PAPER_CELEBA = {"Male": (0.97, 0.94), "Eyeglasses": (0.99, 0.85), "Smiling": (0.91, 0.81)}


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


def data_digest(ds) -> str:
    """sha256 of what a judge learns from and is scored on: the images, their labels, their kind."""
    h = hashlib.sha256(repr((ds.kind, list(ds.property_K))).encode())
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_judge(ds, iters: int, seed: int) -> tuple[PropertyClassifier, list[float]]:
    """train_judge(ds, iters, seed) on the CPU, trained once and kept in FMVAE_CACHE/judges (default
    ~/.cache/fmvae; checksummed, written atomically) under a key of everything its weights depend on: the
    data, the steps, the seed, the thread count, CPU and torch's CPU kernel set (other float sums: another judge), torch's version
    and this module's source. The CelebA table and the diagnostics of one run each need that run's judge
    (nine minutes on one thread of the 2-core host): the second reads it back."""
    host = provenance.host()
    key = provenance.fingerprint(data_digest(ds), iters, seed, torch.get_num_threads(), host["cpu"],
                                 host["cpu_capability"], torch.__version__, hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    path = cache_root() / "judges" / f"{key}.pt"
    clf = PropertyClassifier(ds.x_shape[0], ds.property_K)
    try:
        kept = load_checked(path)
        clf.load_state_dict(kept["state"])
        log.info("judge %s read back from %s", key, path)
        return clf, kept["accuracy"]
    except FileNotFoundError:
        pass
    except CorruptCheckpoint as err:
        log.warning("%s; training the judge again", err)
    clf, acc = train_judge(ds, iters, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checked({"state": clf.state_dict(), "accuracy": acc}, path)
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
    from fmvae.core.evaluate import evaluate_bound, supervised_accuracy
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
