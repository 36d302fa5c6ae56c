"""DVC experiments on the real pipeline (tiny synthetic settings): presets as named experiments,
`-S` overrides that reuse what they do not touch, refused keys, and tables that fit a terminal."""
import hashlib
import json

import pytest
import yaml

from helpers import copy_project, run, tiny_params

# What README tells a user to compare experiments with (dep columns dropped, unchanged ones hidden)
EXP_SHOW = ["dvc", "exp", "show", "--no-pager", "--only-changed", "--precision", "3",
            "--drop", "Created|fmvae/|stages/|data/|models/|reports/"]
METRICS_SHOW = ["dvc", "metrics", "show", "reports/metrics.json", "--precision", "3"]  # the sweep's are sweep/dvc.yaml's
NARROW = {"COLUMNS": "120", "LINES": "50"}


def git(root, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], root)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A committed project whose default pipeline has run once, and a tiny preset."""
    root = copy_project(tmp_path_factory.mktemp("exp"), tiny_params(semi={"fraction": 0.5, "delta": 10.0}))
    (root / "presets/tiny_test.yaml").write_text(yaml.safe_dump({"model": {"K": 4}, "joint": {"iters": 20}}, sort_keys=False))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    run(["dvc", "repro"], root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "default run")
    return root


def snapshot(root):
    """The bytes of the workspace's outputs and code (not git's or DVC's own folders; DVC may
    rewrite a file with the same bytes, so contents are compared, not times)."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
            and not any(part in (".git", ".dvc") for part in p.relative_to(root).parts)}


def test_a_preset_runs_as_a_named_experiment_leaving_params_yaml_untouched(repo):
    before = (repo / "params.yaml").read_bytes()
    outputs = snapshot(repo)
    res = run(["python", "stages/preset.py", "tiny_test"], repo, timeout=900)
    assert "dvc exp run -n tiny_test --temp -S model.K=4 -S joint.iters=20" in res.stdout
    assert (repo / "params.yaml").read_bytes() == before
    assert snapshot(repo) == outputs  # params.yaml and the default profile's outputs, byte for byte
    assert "tiny_test" in run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = [e for r in rows for e in (r.get("experiments") or []) if e.get("name") == "tiny_test"]
    (exp,) = exps
    revs = exp["revs"][0]["data"]
    assert revs["params"]["params.yaml"]["data"]["model"]["K"] == 4
    assert "elbo" in revs["metrics"]["reports/metrics.json"]["data"]


def test_an_override_of_K_reuses_pretraining_and_lists_its_metrics(repo):
    res = run(["dvc", "exp", "run", "-n", "k5", "-S", "model.K=5"], repo, timeout=900)
    assert "Stage 'pretrain' didn't change, skipping" in res.stdout
    assert "Running stage 'prior_init'" in res.stdout and "Running stage 'pretrain'" not in res.stdout
    table = run(EXP_SHOW, repo, env_extra=NARROW).stdout
    k5 = next(line for line in table.splitlines() if "[k5]" in line)
    elbo = json.loads((repo / "reports/metrics.json").read_text())["elbo"]
    assert f"{elbo:.2f}"[:6] in k5


def test_a_misspelled_key_is_refused_naming_it_with_nothing_written(repo):
    before = snapshot(repo)
    params = (repo / "params.yaml").read_bytes()
    res = run(["dvc", "exp", "run", "-S", "model.KK=5"], repo, check=False)
    assert res.returncode != 0 and "model.KK" in res.stdout + res.stderr
    assert snapshot(repo) == before
    # forced in with DVC's `+` (append) syntax, the pipeline's own check names it before any work
    res = run(["dvc", "exp", "run", "-S", "+model.KK=5"], repo, check=False)
    assert res.returncode != 0 and "model.KK: unknown parameter; did you mean model.K" in res.stdout + res.stderr
    changed = {p for p, t in snapshot(repo).items() if before.get(p) != t}
    assert changed <= {repo / "params.yaml"}, changed  # DVC's own edit of params.yaml; no output touched
    (repo / "params.yaml").write_bytes(params)


def test_metrics_and_experiment_tables_fit_a_120_column_terminal(repo):
    leaves = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)

    def count(node):
        return sum(count(v) for v in node.values()) if isinstance(node, dict) else 1

    (workspace,) = [v for v in leaves.values()] if isinstance(leaves, dict) else [leaves]
    metrics = workspace["data"]["reports/metrics.json"]["data"]
    assert 5 <= count(metrics) <= 40 and "provenance" not in metrics
    for cmd in (METRICS_SHOW, EXP_SHOW):
        out = run(cmd, repo, env_extra=NARROW).stdout
        assert max(len(line) for line in out.splitlines()) <= 120, out
        assert "…" not in out, out  # nothing cut off
        assert "elbo" in out


MNIST_SEMI = {"data": {"name": "mnist"}, "model": {"I": 2, "K": [10, 1], "D": 4},
              "semi": {"fraction": 0.1, "delta": 100.0}, "prior_init": {"init_points": 500, "restarts": 1},
              "properties": {"judge_iters": 5, "samples": 50}, "plot": {"factors": [0, 1], "samples_per_cell": 2}}


def test_the_mnist_table_is_built_from_named_experiments(tmp_path):
    """Two named experiments on the real labelled MNIST (tiny budget), 10% and 1% of the labels:
    stages/semi_table.py reads their commits and writes the table beside Kingma et al., with the
    label counts of the seeded split (800 and 80 of 8,000) and each experiment's own numbers, and
    copies what produced them (dvc.lock, params, metrics, figures)."""
    root = copy_project(tmp_path, tiny_params(**MNIST_SEMI))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    for name, fraction in (("semi10", 0.1), ("semi1", 0.01)):
        run(["dvc", "exp", "run", "--temp", "-n", name, "-S", f"semi.fraction={fraction}"], root, timeout=900)
    run(["python", "stages/semi_table.py", "semi10", "semi1"], root)
    import pandas as pd
    table = pd.read_csv(root / "reports/mnist_table.csv")
    assert list(table["labels"]) == [800, 80, 100, 100]
    assert list(table["unlabelled_train_images"]) == [7200, 7920, 50000, 50000]
    for row, name in zip(table.itertuples(), ("semi10", "semi1")):
        props = json.loads((root / f"reports/mnist_semi/{name}/properties.json").read_text())
        assert row.accuracy_argmax_q_r == props["acc_digit"] and row.judge_agreement_clamped_samples == props["agreement_digit"]
        lock = yaml.safe_load((root / f"reports/mnist_semi/{name}/dvc.lock").read_text())
        assert "properties" in lock["stages"]
        assert (root / f"reports/mnist_semi/{name}/samples_grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "Kingma et al. 2014, M1+M2" in (root / "reports/mnist_table.md").read_text()
    missing = run(["python", "stages/semi_table.py", "nope"], root, check=False)
    assert missing.returncode != 0 and "experiment 'nope'" in missing.stderr


def test_a_tiny_mnist_compose_with_both_levers_runs_end_to_end_and_is_tabled(repo):
    """Issue 34's proxy through DVC: the mnist_compose preset (the mirror's labelled MNIST, digit named,
    free factor K = 10) at tiny budgets with both levers, as a named experiment; then its diagnostics report
    and composition figure, and its row in the composition table, which quotes that report and the
    experiment's own metrics."""
    tiny = ["-S", "pretrain.iters=20", "-S", "prior_init.iters=5", "-S", "prior_init.init_points=500", "-S",
            "joint.iters=20", "-S", "properties.judge_iters=20", "-S", "properties.samples=50", "-S",
            "evaluate.iw_samples=0", "-S", "model.D=4", "-S", "plot.samples_per_cell=2",
            "-S", "semi.swap_weight=1.0", "-S", "semi.adversary_weight=1.0"]
    res = run(["python", "stages/preset.py", "mnist_compose", "-n", "tiny_compose", *tiny], repo, timeout=1200)
    assert "Ran experiment(s): tiny_compose" in res.stdout + res.stderr
    run(["python", "stages/diagnose.py", "tiny_compose"], repo, timeout=900)
    report = json.loads((repo / "reports/diagnostics/tiny_compose.json").read_text())
    assert report["params"]["semi"]["swap_weight"] == 1.0 and report["properties"][0]["property"] == "digit"
    assert (repo / "reports/diagnostics/tiny_compose_grid.png").read_bytes()[:4] == b"\x89PNG"
    run(["python", "stages/compose_table.py", "tiny_compose"], repo, timeout=600)
    import pandas as pd
    (row,) = pd.read_csv(repo / "reports/mnist_compose.csv").itertuples()
    props = json.loads((repo / "reports/mnist_compose/tiny_compose/properties.json").read_text())
    assert row.run == "tiny_compose" and row.agreement == props["agreement_digit"]
    assert row.round_trip == report["properties"][0]["round_trip"]
    assert "semi.swap_weight=1.0" in row.changed and "semi.adversary_weight=1.0" in row.changed
    # regrouped as committed: the same table, from the committed row, with the run's diagnostics gone
    tabled = (repo / "reports/mnist_compose.csv").read_bytes()
    (repo / "reports/diagnostics/tiny_compose.json").unlink()
    run(["python", "stages/compose_table.py", "tiny_compose", "--committed", "tiny_compose"], repo)
    assert (repo / "reports/mnist_compose.csv").read_bytes() == tabled
    unknown = run(["python", "stages/compose_table.py", "tiny_compose", "--committed", "nope"], repo, check=False)
    assert unknown.returncode != 0 and "--committed nope: not among the experiments" in unknown.stderr
    assert (repo / "reports/mnist_compose.csv").read_bytes() == tabled
