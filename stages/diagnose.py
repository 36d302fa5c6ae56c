"""Where each named property lives in trained runs (fmvae/reporting/diagnostics.py) -> reports/diagnostics/<name>.{json,md}.

    python stages/preset.py mnist_compose          # any named experiment with labelled factors
    python stages/diagnose.py mnist_compose [NAME ...]

For each experiment this loads its prepared data and trained model from DVC's cache at its commit, trains
its judge again as its properties stage did (same seed and steps), and measures on the test images, for
each labelled property p and its factor p: the per-block linear probe, the decoder's read per block,
the block transplant, the move of block p between component means, the prior's fit to the classes, the
judge-free round trip, and for every factor its components' shares and NMI with the property; with a free
factor, it draws the composition figure (NAME_grid.png: the first property's values as rows, the first free
factor's components as columns, each cell one clamped draw). Beside
every judged number it reports the judge's own per-class recall on real test images: the ceiling an
agreement can reach. The report names the run's commit and the code that measured it.
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import torch
from _common import REPORTS, ROOT

matplotlib.use("Agg")  # files only: the script, not the library, chooses the backend

from fmvae.reporting import diagnostics as dg  # noqa: E402
from fmvae.core import evaluate as ev
from fmvae.reporting import plots
from fmvae.io import atomic_write_json, atomic_write_text  # noqa: E402
from fmvae.provenance import git_commit, host
from fmvae.reporting.experiments import full_rev, load_run, run_params, show  # noqa: E402
from fmvae.reporting.judge import cached_judge, predict  # noqa: E402

POINTS = 2000  # test images each measure uses (the first ones of a seeded permutation)


def diagnose(name: str) -> dict:
    rev = full_rev(name)
    params = run_params(rev)
    with tempfile.TemporaryDirectory() as tmp:
        ds, model = load_run(rev, params, Path(tmp))
    if ds.y_test is None or params.semi.fraction <= 0:
        raise SystemExit(f"error: experiment {name!r} has no labelled factors to diagnose")
    torch.set_num_threads(json.loads(show(rev, "reports/provenance.json"))["host"]["torch_threads"])
    judge, judge_acc = cached_judge(ds, params.properties.judge_iters, seed=params.seed)  # the table's judge
    model.eval()
    torch.manual_seed(params.seed)
    pick = torch.randperm(len(ds.x_test), generator=torch.Generator().manual_seed(params.seed))[:POINTS]
    x = ds.to_float(ds.x_test[pick])
    with torch.no_grad():
        mu = model.encode(x)[0]
        real = predict(judge, x)
    assignments = ev.evaluate_bound(model, x, lambda t: t)["assignments"]
    decode = lambda z: model.decoder.mean(z.reshape(len(z), -1))  # differentiable (decode_mean is not)
    means = model.prior.mean_params()[0].float()
    baseline = subprocess.run(["git", "rev-parse", f"{rev}^"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # the commit the experiment ran on (its code)
    out = {"run": name, "rev": rev, "baseline": baseline, "params": params.to_dict(), "measured_by": git_commit(),
           "host": host(), "properties": []}
    for p, prop in enumerate(ds.property_names):
        y = ds.y_test[pick, p]
        judge_p = lambda images, p=p: judge(images)[p]
        k = ds.property_K[p]
        out["properties"].append({
            "property": prop, "factor": p,
            "judge_test_accuracy": judge_acc[p],
            "judge_recall_per_class": [float((real[y == c, p] == c).float().mean()) for c in range(k)],
            "probe_balanced_accuracy_per_block": dg.block_probe(mu, y),
            "decoder_read_share_per_block": dg.decoder_read(mu, y, decode, judge_p),
            "transplant_carries_per_block": dg.block_transplant(mu, y, decode, judge_p),
            "component_move_judged": dg.component_move(mu, y, means[p, :k], p, decode, judge_p),
            "prior_fit": dg.prior_fit(model, mu, y, p),
            "round_trip": dg.round_trip(model, p, seed=params.seed),
            "factor_usage": dg.factor_usage(assignments, y, model.K)})
    free = [i for i in range(model.I) if i >= len(ds.property_names)]
    if free:  # the composition figure: named values (rows) x the first free factor's components, one draw each
        torch.manual_seed(params.seed)
        names = dict(enumerate(ds.property_names))
        plots.sample_grid(model, ds, (0, free[0]), params.plot.max_components,
                          REPORTS / "diagnostics" / f"{name}_grid.png", per_cell=1, names=names)
    return out


def markdown(report: dict) -> str:
    lines = [f"# Diagnostics: {report['run']}", "",
             f"Trained at commit {report['baseline'][:7]} (experiment {report['rev'][:7]}), measured by the code of "
             f"{report['measured_by'][:7]} on "
             f"{report['host']['cpu']} ({report['host']['torch_threads']} threads); {POINTS} test images.", ""]
    fmt = lambda xs: " / ".join(f"{v:.2f}" for v in xs)
    for r in report["properties"]:
        fit = r["prior_fit"]
        lines += [f"## {r['property']} (factor {r['factor']})", "",
                  "| measure | value |", "| --- | --- |",
                  f"| judge: test accuracy; recall per class (the ceiling of an agreement) | {r['judge_test_accuracy']:.3f}; "
                  f"{fmt(r['judge_recall_per_class'])} |",
                  f"| linear probe, balanced accuracy per block | {fmt(r['probe_balanced_accuracy_per_block'])} |",
                  f"| decoder's read: share of the judge's gradient per block | {fmt(r['decoder_read_share_per_block'])} |",
                  f"| block transplant: judged as the donor's value, per block | {fmt(r['transplant_carries_per_block'])} |",
                  f"| block {r['factor']} moved to another value's component mean: judged as it | {r['component_move_judged']:.3f} |",
                  f"| prior: predictive rms scale per component / class rms std | {fmt(fit['predictive_rms_scale'])} / "
                  f"{fmt(fit['class_rms_std'])} |",
                  f"| prior: Mahalanobis separation of components / of classes (min, mean) | "
                  f"{fit['prior_separation_min']:.2f}, {fit['prior_separation_mean']:.2f} / "
                  f"{fit['class_separation_min']:.2f}, {fit['class_separation_mean']:.2f} |",
                  f"| round trip: argmax q(r|decoded clamped sample) = clamped | {r['round_trip']:.3f} |", ""]
        lines += ["| factor | components with >= 2% of images | NMI with the property | shares |", "| --- | --- | --- | --- |"]
        lines += [f"| {u['factor']} | {u['components_over_2pct']} | {u['nmi_with_property']:.3f} | {fmt(u['shares'])} |"
                  for u in r["factor_usage"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="names of finished `dvc exp run -n NAME` experiments")
    args = parser.parse_args()
    for name in args.experiments:
        report = diagnose(name)
        atomic_write_json(REPORTS / "diagnostics" / f"{name}.json", report)
        atomic_write_text(REPORTS / "diagnostics" / f"{name}.md", markdown(report))
        print(markdown(report))
