"""Results you can pull (#36, section 1): a tiny run pushed from one clone (`git push`, `dvc push` to a
local folder standing for S3 / GCS / SSH) is pulled into a fresh clone, where `dvc repro` runs no stage and
`dvc metrics show` prints the pushed metrics; a named experiment of an older commit travels with
`dvc exp push` / `dvc exp pull` and `dvc exp show` lists it with its metrics there."""
import json

import pytest

from helpers import copy_project, run, tiny_params


def git(root, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], root)


def metrics(root) -> dict:
    return json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)[""]["data"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A project with a DVC remote, its default run and an experiment pushed; then one more commit,
    so that the experiment belongs to an older commit than the branch's head."""
    base = tmp_path_factory.mktemp("remote")
    run(["git", "init", "-q", "--bare", "-b", "main", str(base / "origin.git")], base)
    root = copy_project(base / "first", tiny_params())
    git(root, "checkout", "-q", "-b", "main")
    run(["dvc", "remote", "add", "-d", "storage", str(base / "storage")], root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    run(["dvc", "repro"], root, timeout=900)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "default run")
    git(root, "remote", "add", "origin", str(base / "origin.git"))
    git(root, "push", "-q", "origin", "main")
    run(["dvc", "push"], root, timeout=600)
    run(["dvc", "exp", "run", "--temp", "-n", "older", "-S", "joint.iters=30"], root, timeout=900)
    run(["dvc", "exp", "push", "origin", "older"], root, timeout=600)
    (root / "NOTES.md").write_text("a later commit\n")
    git(root, "add", "NOTES.md")
    git(root, "commit", "-qm", "later")
    git(root, "push", "-q", "origin", "main")
    return base, root


def test_a_fresh_clone_pulls_the_results_and_retrains_nothing(pushed):
    base, first = pushed
    clone = base / "clone"
    git(base, "clone", "-q", str(base / "origin.git"), str(clone))
    assert not (clone / "models").exists() or not any((clone / "models").iterdir())
    run(["dvc", "pull"], clone, timeout=600)
    res = run(["dvc", "repro"], clone, timeout=900)
    assert "Running stage" not in res.stdout, res.stdout[-2000:]
    assert metrics(clone) == metrics(first)
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], clone).stdout  # (the sweep is its own pipeline)


def test_a_pushed_experiment_of_an_older_commit_is_pulled_into_another_clone(pushed):
    base, first = pushed
    clone = base / "other"
    git(base, "clone", "-q", str(base / "origin.git"), str(clone))
    assert "older" not in run(["dvc", "exp", "list", "--all-commits", "--name-only"], clone).stdout.split()
    run(["dvc", "exp", "pull", "origin", "older"], clone, timeout=600)
    rows = json.loads(run(["dvc", "exp", "show", "--all-commits", "--json"], clone).stdout)
    ((baseline, exp),) = [(r, e) for r in rows for e in (r.get("experiments") or []) if e.get("name") == "older"]
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["joint"]["iters"] == 30
    assert "elbo" in data["metrics"]["reports/metrics.json"]["data"]
    older = git(clone, "rev-parse", "HEAD~1").stdout.strip()
    assert baseline["rev"] == older  # listed under the commit it ran at, not under HEAD
