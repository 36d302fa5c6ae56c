"""Committed runs keep the commit that made them (fmvae/reporting/runs.py, stages/status.py): a training change
leaves them valid results of their commit, visible as such in every table, never averaged with runs
of other code, and a run whose lock matches no commit it could have run at is refused."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fmvae.reporting import runs

ROOT = Path(__file__).resolve().parent.parent
STATUS = [sys.executable, "stages/status.py"]


def shallow() -> bool:
    return runs.git("rev-parse", "--is-shallow-repository") == "true"


pytestmark = pytest.mark.skipif(shallow(), reason="a shallow clone lacks the commits the runs name")


def read(table: runs.RunTable) -> pd.DataFrame:
    return pd.read_csv(table.csv, dtype={"code": str})


@pytest.mark.parametrize("table", runs.run_tables(), ids=lambda t: t.stem)
def test_each_table_s_code_column_says_whose_code_its_runs_ran(table):
    """The committed `code` column equals what the copied files say now (after a training commit:
    `python stages/status.py --write`), and every run in it names an ancestor whose sources its lock
    records (run_code refuses any other)."""
    committed = read(table)
    fresh = runs.with_code_column(table, committed)
    assert "code" in committed.columns, f"reports/{table.stem}.csv has no code column: python stages/status.py --write"
    assert committed["code"].fillna("").tolist() == fresh["code"].fillna("").tolist(), \
        f"reports/{table.stem}: stale code column; python stages/status.py --write"


def copy_run(tmp_path: Path, name: str = "celeba_cpu") -> Path:
    folder = tmp_path / name
    shutil.copytree(ROOT / "reports/celeba" / name, folder)
    return folder


def test_a_run_whose_lock_matches_neither_its_commit_nor_head_is_refused(tmp_path):
    folder = copy_run(tmp_path)
    code = runs.run_code(folder)  # as committed: accepted
    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for dep in stage.get("deps", []):
            if dep["path"] == "fmvae/prior.py":
                dep["md5"] = "0" * 32  # the run (at 2b1fe3c) says it ran on another prior.py
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))
    with pytest.raises(runs.RunCodeError, match=f"matches neither the sources at its commit {code.commit[:7]}, "
                                                r"nor HEAD's: fmvae/prior.py"):
        runs.run_code(folder)


def test_a_run_naming_no_commit_or_one_head_does_not_descend_from_is_refused(tmp_path):
    folder = copy_run(tmp_path)
    prov = json.loads((folder / "provenance.json").read_text())
    (folder / "provenance.json").write_text(json.dumps(prov | {"git_commit": "e" * 40}))
    with pytest.raises(runs.RunCodeError, match="not an ancestor of HEAD"):
        runs.run_code(folder)
    (folder / "provenance.json").unlink()
    with pytest.raises(runs.RunCodeError, match="names no commit"):
        runs.run_code(folder)
    # --assign's search finds the newest ancestor whose sources match the lock: one run_code accepts
    found = runs.newest_matching_ancestor(folder / "dvc.lock")
    (folder / "provenance.json").write_text(json.dumps({"code_commit": found}))
    assert runs.run_code(folder).commit == found


def test_a_table_never_averages_seeds_of_different_code(monkeypatch):
    """The CelebA table's mean over its two seeds is refused when one seed's code is another's; its
    variants (no mean) may mix code versions, each row saying its own."""
    real = runs.run_code
    seeds = read(runs.CELEBA_TABLE).dropna(subset=["seed"])
    first, second = seeds.loc[seeds["seed"] == 0, "run"].iloc[0], seeds.loc[seeds["seed"] == 1, "run"].iloc[0]

    def one_seed_older(folder, lock=None):
        code = real(folder, lock)
        older = "abc1234" + "0" * 33
        return runs.RunCode(folder, older, older, False) if folder.name == second else code

    own = real(ROOT / "reports/celeba" / first).label
    monkeypatch.setattr(runs, "run_code", one_seed_older)
    with pytest.raises(runs.RunCodeError, match="refusing to average runs of different code: "
                                                + ", ".join(sorted([own, "abc1234"]))):
        runs.with_code_column(runs.CELEBA_TABLE, read(runs.CELEBA_TABLE))
    variants = read(runs.CELEBA_VARIANTS).iloc[:3].assign(run=second)
    mixed = runs.with_code_column(runs.CELEBA_VARIANTS, pd.concat([read(runs.CELEBA_VARIANTS), variants]))
    assert set(mixed[mixed["run"] == second]["code"]) == {"abc1234"}
    assert set(mixed[mixed["run"] != second]["code"]) == \
        {real(ROOT / "reports/celeba" / name).label for name in read(runs.CELEBA_VARIANTS)["run"]}


def run_in(clone: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(clone))  # the clone's fmvae, not the installed checkout's
    return subprocess.run(list(cmd), cwd=clone, env=env, capture_output=True, text=True)


def test_a_training_commit_leaves_the_runs_valid_stale_and_named(tmp_path):
    """A scratch commit in a clone edits a comment in fmvae/core/prior.py (a training source). There the
    default pipeline's lock test fails (dvc.lock must be HEAD's), every other committed run still
    passes its own test, the code columns are stale until `stages/status.py --write` rewrites them
    with each run's commit, and `stages/status.py` names every run with the commands that rerun it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    prior = clone / "fmvae/core/prior.py"
    prior.write_text(prior.read_text().replace("(sections 2.1-2.6).", "(sections 2.1 to 2.6).", 1))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "scratch: a comment"],
                   cwd=clone, check=True)
    pytest_in_clone = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "--no-header"]
    lock = run_in(clone, *pytest_in_clone, "tests/test_trust.py::test_the_committed_lock_records_the_code_at_hand")
    assert lock.returncode == 1 and "fmvae/core changed since it ran" in lock.stdout, lock.stdout[-2000:]
    own = run_in(clone, *pytest_in_clone, "tests/test_trust.py", "-k",
                 "mnist_table or celeba_table or default_runs_table")
    assert own.returncode == 0 and "3 passed" in own.stdout, own.stdout[-3000:]
    stale = run_in(clone, *pytest_in_clone, "tests/test_runs.py", "-k", "code_column")
    assert stale.returncode == 1 and "stale code column" in stale.stdout, stale.stdout[-2000:]
    listed = run_in(clone, *STATUS)
    assert listed.returncode == 0, listed.stderr
    before = runs.head()[:7]  # for a run on HEAD's code here: the newest commit with its sources is the clone's HEAD^

    def label_there(folder: Path, lock: Path | None = None) -> str:
        here = runs.run_code(folder, lock).label
        return before if here == "HEAD" else here

    for table in runs.run_tables():
        for value in read(table)[table.key]:
            name = table.run_name(value)
            if name is not None:
                line = f"  {name} (code {label_there(*table.files(name))}): " if table.kind != "sweep" else \
                    f"reports/{table.stem}: "
                assert line in listed.stdout, (name, listed.stdout)
    sections = listed.stdout.split("\nreports/")
    seeds = read(runs.CELEBA_TABLE).dropna(subset=["seed"])
    first, second = seeds.loc[seeds["seed"] == 0, "run"].iloc[0], seeds.loc[seeds["seed"] == 1, "run"].iloc[0]
    (celeba,) = [s for s in sections if s.startswith(("celeba_table:", "reports/celeba_table:"))]
    assert f"python stages/preset.py celeba_cpu -n {second} -S seed=1\n" in celeba  # differs in its seed alone
    assert f"  then: python stages/celeba_table.py {first} {second}" in celeba
    written = run_in(clone, *STATUS, "--write")
    assert written.returncode == 0, written.stderr
    fresh = run_in(clone, *pytest_in_clone, "tests/test_runs.py", "-k", "code_column")
    assert fresh.returncode == 0, fresh.stdout[-2000:]
    celeba = pd.read_csv(clone / "reports/celeba_table.csv", dtype={"code": str})
    assert set(celeba["code"]) == {label_there(ROOT / "reports/celeba" / first)}


RELOCKED_RUN = """
import json, sys
from pathlib import Path
import yaml
from fmvae.reporting import runs
stage, folder = sys.argv[1], Path("reports/celeba/scratch_relocked")
if stage == "relock":  # golden.py --relock's result: the lock recorded anew for the sources at HEAD
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    for step in lock["stages"].values():
        for dep in step.get("deps", []):
            if dep["path"].startswith(runs.CODE_FOLDERS):
                dep["md5"] = runs.md5_at(runs.head(), dep["path"])
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))
elif stage == "check":
    deps = runs.code_deps(yaml.safe_load((folder / "dvc.lock").read_text()))
    own = json.loads((folder / "provenance.json").read_text())["git_commit"]
    code = runs.run_code(folder)
    print(json.dumps({"own_mismatches": runs.mismatches(deps, own), "head_mismatches": runs.mismatches(deps, runs.head()),
                      "commit": code.commit, "label": code.label}))
"""


def test_a_relocked_run_stays_valid_after_a_later_training_commit(tmp_path):
    """A run whose lock golden.py --relock recorded anew (its sources then HEAD's, its named commit older)
    matches neither its own commit's sources nor, after a later training commit, HEAD's: run_code accepts it
    as a run of the sources at the commit that last wrote its lock, labelled with that code version, and
    refuses it again once its lock is edited to match none of them."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    prior = clone / "fmvae/core/prior.py"

    def edit_and_commit(old: str, new: str, message: str) -> None:
        prior.write_text(prior.read_text().replace(old, new, 1))
        subprocess.run([*git, "commit", "-qam", message], cwd=clone, check=True)

    def script(stage: str) -> subprocess.CompletedProcess:
        return run_in(clone, sys.executable, "-c", RELOCKED_RUN, stage)

    folder = clone / "reports/celeba/scratch_relocked"
    folder.mkdir()
    old = runs.run_code(ROOT / "reports/celeba/celeba_levers").commit  # an ancestor with other sources
    (folder / "provenance.json").write_text(json.dumps({"git_commit": old}))
    edit_and_commit("(sections 2.1-2.6).", "(sections 2.1 to 2.6).", "scratch: a training change")
    assert script("relock").returncode == 0
    subprocess.run([*git, "add", str(folder)], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch: relock"], cwd=clone, check=True)
    relocked = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    at_relock = script("check")
    assert at_relock.returncode == 0, at_relock.stderr[-2000:]
    found = json.loads(at_relock.stdout)
    assert found["own_mismatches"] and not found["head_mismatches"]
    assert (found["commit"], found["label"]) == (relocked, "HEAD")

    edit_and_commit("(sections 2.1 to 2.6).", "(sections 2.1 - 2.6).", "scratch: a later training change")
    after = script("check")
    assert after.returncode == 0, after.stderr[-2000:]  # neither its own commit's sources nor HEAD's: the relock's
    found = json.loads(after.stdout)
    assert found["own_mismatches"] and found["head_mismatches"] == ["fmvae/core"]
    assert (found["commit"], found["label"]) == (relocked, relocked[:7])

    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    for step in lock["stages"].values():
        for dep in step.get("deps", []):
            if dep["path"] == "fmvae/io.py":
                dep["md5"] = "0" * 32  # the lock now says it ran on an io.py no commit had
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))
    refused = script("check")
    assert refused.returncode == 1 and (f"matches neither the sources at its commit {old[:7]}, nor at the commit "
                                        "that last wrote it, nor HEAD's: ") in refused.stderr, refused.stderr[-2000:]
    assert "fmvae/io.py" in refused.stderr.splitlines()[-1].split("nor HEAD's: ")[1].split(", ")


@pytest.mark.parametrize("report", sorted((ROOT / "reports/diagnostics").glob("*.json")), ids=lambda p: p.stem)
def test_a_diagnostics_report_names_the_code_that_trained_and_measured_it(report):
    """stages/diagnose.py's reports: the run trained at an ancestor of HEAD with its preset's values as they
    were there, measured by an ancestor's code; the markdown beside it quotes the same numbers."""
    from fmvae.params import flatten
    found = json.loads(report.read_text())
    assert runs.is_ancestor(found["baseline"]) and runs.is_ancestor(found["measured_by"])
    preset = ROOT / "presets" / f"{found['run']}.yaml"
    if preset.exists():
        stated = flatten(yaml.safe_load(runs.git("show", f"{found['baseline']}:presets/{preset.name}")))
        used = flatten(found["params"])
        assert {k: used[k] for k in stated} == stated
    text = report.with_suffix(".md").read_text()
    for prop in found["properties"]:
        assert f"{prop['round_trip']:.3f}" in text and f"{prop['component_move_judged']:.3f}" in text


def test_the_default_runs_table_is_rebuilt_from_its_committed_copies_byte_for_byte(tmp_path):
    """In a clone, which holds no experiments, stages/seeds_table.py reads each run from its copy in
    reports/default_runs/<name>/ and writes the committed table again byte for byte: a run of an older commit,
    whose params.yaml lacks keys added since (made so here: every committed run may be HEAD's), is a seed, not a
    variant (a missing key counts at its default).
    A seed passed as a variant is refused, naming it, with every file of the table as it was."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    table = read(runs.DEFAULT_RUNS)
    named = table[table["seed"].notna() & ~table["run"].str.startswith("dvc repro")]
    seeds = [r.run for r in named.itertuples() if not isinstance(r.changed, str)]
    variants = [r.run for r in named.itertuples() if isinstance(r.changed, str)]
    older = clone / "reports/default_runs" / seeds[0] / "params.yaml"  # as a run from before train.hflip existed
    stored = yaml.safe_load(older.read_text())
    assert stored["train"].pop("hflip") is False  # at its default
    older.write_text(yaml.safe_dump(stored, sort_keys=False))
    files = [clone / "reports/default_runs.csv", clone / "reports/default_runs.md",
             *sorted((clone / "reports/default_runs").rglob("*"))]
    committed = {f: f.read_bytes() for f in files if f.is_file()}
    rebuilt = run_in(clone, sys.executable, "stages/seeds_table.py", "--run", *seeds, "--variant", *variants)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert {f: f.read_bytes() for f in committed} == committed
    refused = run_in(clone, sys.executable, "stages/seeds_table.py", "--run", *seeds[1:], "--variant", *variants, seeds[0])
    assert refused.returncode != 0 and f"experiment {seeds[0]!r} changed only the seed" in refused.stderr
    assert {f: f.read_bytes() for f in committed} == committed
