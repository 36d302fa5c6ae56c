"""The DVC pipeline on tiny settings: outputs, incremental reruns, resume, bad params."""
import json
import math
import signal

import pytest
import yaml

from helpers import assert_every_torch_file_holds_plain_values, copy_project, run, tiny_params

STAGES = ["download", "pretrain", "prior_init", "joint_train", "evaluate", "properties", "plot"]
OUTPUTS = ["data/prepared/dataset.pt", "models/pretrain.pt", "models/prior_init.pt", "models/joint.pt",
           "reports/metrics.json", "reports/evaluation.json", "reports/provenance.json", "reports/curves/pretrain.csv", "reports/curves/prior_init.csv",
           "reports/curves/joint.csv", "reports/figures/samples_grid.png", "reports/figures/clusters.png",
           "reports/figures/training_curves.png", "reports/synthetic_table.md", "reports/synthetic_table.csv",
           "reports/properties.json"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One tiny `dvc repro` shared by the tests below (synthetic data, CPU)."""
    root = copy_project(tmp_path_factory.mktemp("proj"), tiny_params(semi={"fraction": 0.5, "delta": 10.0}))
    res = run(["dvc", "repro"], root)
    return root, res.stdout


def test_dvc_repro_writes_every_declared_output(project):
    root, log = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    for out in OUTPUTS:
        assert (root / out).stat().st_size > 0, out
    m = json.loads((root / "reports/metrics.json").read_text())
    for key in ("elbo", "recon", "kl_z", "kl_r", "iwae"):
        assert math.isfinite(m[key]), key
    assert m["elbo"] < 0 and m["kl_z"] >= 0 and m["kl_r"] >= 0
    assert abs(m["elbo"] - (m["recon"] - m["kl_z"] - m["kl_r"])) < 1e-3
    assert m["iwae"] >= m["elbo"] - 5  # log p(x) estimate is not far below the bound
    details = json.loads((root / "reports/evaluation.json").read_text())
    assert len(details["components_used_per_factor"]) == 2 and all(1 <= c <= 3 for c in details["components_used_per_factor"])
    assert m["components"] == sum(details["components_used_per_factor"])
    for name in ("shape", "position"):
        assert 0 <= m[f"acc_{name}"] <= 1 and len(details[f"cluster_accuracy_{name}_per_factor"]) == 2
    prov = json.loads((root / "reports/provenance.json").read_text())
    assert prov["params"]["model"]["I"] == 2 and prov["git_commit"] and "provenance" not in m
    assert prov["inputs"]["models/joint.pt"] == (root / "models/joint.pt.sha256").read_text().strip()
    assert (root / "reports/figures/samples_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd
    table = pd.read_csv(root / "reports/synthetic_table.csv")
    assert list(table["property"]) == ["shape", "position"]
    for col in ("accuracy_argmax_q_r", "judge_agreement_clamped_samples", "judge_test_accuracy"):
        assert table[col].between(0, 1).all()
    assert table["accuracy_argmax_q_r"].tolist() == [m["acc_shape"], m["acc_position"]]


def test_every_file_the_pipeline_saves_holds_plain_values(project):
    """Data, models and checkpoints of a tiny `dvc repro` load with weights_only (no typed params pickled)."""
    root, _ = project
    assert assert_every_torch_file_holds_plain_values(root / "data", root / "models", root / "checkpoints") >= 4


def test_second_repro_reruns_nothing_and_a_plot_param_reruns_only_plot(project):
    root, _ = project
    assert "Running stage" not in run(["dvc", "repro"], root).stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["plot"]["max_components"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run(["dvc", "repro"], root).stdout
    assert "Running stage 'plot'" in log
    assert all(f"Running stage '{s}'" not in log for s in STAGES[:-1])


def test_after_a_param_change_a_killed_stage_resumes_from_its_own_checkpoint(tmp_path):
    """A finished run leaves checkpoints up to step 30. Change joint.iters, kill the joint stage
    at step 25: its checkpoints (one folder per setting) survive beside the old run's, the rerun
    resumes from step 20 and ends bitwise equal to an uninterrupted run with the new params,
    curve included (no gap, no repeated step). The old setting's folder goes once the run is done.
    Every repro stops at evaluate: the judge and the figures after it are tested elsewhere."""
    reference = copy_project(tmp_path / "reference", tiny_params(joint={"iters": 40}))
    run(["dvc", "repro", "evaluate"], reference)
    root = copy_project(tmp_path / "changed", tiny_params())
    run(["dvc", "repro", "evaluate"], root)
    (old,) = (root / "checkpoints/joint").iterdir()
    assert list(old.glob("ckpt-000000030.pt"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(joint={"iters": 40}), sort_keys=False))
    killed = run(["dvc", "repro", "evaluate"], root, check=False, env_extra={"FMVAE_KILL_AT_STEP": "25"})
    assert killed.returncode != 0 and "Running stage 'pretrain'" not in killed.stdout
    new = [f for f in (root / "checkpoints/joint").iterdir() if f != old]
    assert len(new) == 1 and old.exists() and list(new[0].glob("ckpt-000000020.pt"))
    resumed = run(["dvc", "repro", "evaluate"], root)
    assert "resuming from step 20" in resumed.stdout + resumed.stderr
    assert json.loads((root / "reports/metrics.json").read_text()) == \
        json.loads((reference / "reports/metrics.json").read_text())
    curve = (root / "reports/curves/joint.csv").read_text()
    assert curve == (reference / "reports/curves/joint.csv").read_text()
    assert [int(line.split(",")[0]) for line in curve.splitlines()[1:]] == [10, 20, 30, 40]
    assert not old.exists() and new[0].exists()


def test_the_curve_is_on_disk_while_the_stage_runs(tmp_path):
    """Killed at step 25 (log_every 10): the curve already holds steps 10 and 20."""
    root = copy_project(tmp_path, tiny_params())
    for stage in ("download", "pretrain", "prior_init"):
        run(["python", f"stages/{stage}.py"], root)
    killed = run(["python", "stages/joint_train.py"], root, check=False, env_extra={"FMVAE_KILL_AT_STEP": "25"})
    assert killed.returncode == -signal.SIGKILL and not (root / "models/joint.pt").exists()
    rows = (root / "reports/curves/joint.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [int(r.split(",")[0]) for r in rows[1:]] == [10, 20]


@pytest.mark.parametrize("change,key", [
    ({"data": {"name": "cifar"}}, "data.name"),
    ({"model": {"K": 0}}, "model.K"),
    ({"semi": {"fraction": 1.5}}, "semi.fraction"),
    ({"model": {"I": 1, "K": 3}, "semi": {"fraction": 0.5}, "plot": {"factors": [0, 0]}}, "model.I"),
    ({"modle": {"I": 1}}, "modle.I"),
    ({"train": {"lr": "fast"}}, "train.lr"),
])
def test_bad_params_fail_before_work_naming_the_key(tmp_path, change, key):
    root = copy_project(tmp_path, tiny_params(**change))
    res = run(["python", "stages/download.py"], root, check=False)
    assert res.returncode != 0 and key in res.stderr, res.stderr
    assert not (root / "data").exists()


def test_checkpoint_with_other_shapes_is_refused_naming_the_key(tmp_path):
    root = copy_project(tmp_path, tiny_params())
    run(["python", "stages/download.py"], root)
    run(["python", "stages/pretrain.py"], root)
    before = (root / "models/pretrain.pt").read_bytes()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(model={"D": 5}), sort_keys=False))
    res = run(["python", "stages/prior_init.py"], root, check=False)
    assert res.returncode != 0 and "model.D" in res.stderr
    assert not (root / "models/prior_init.pt").exists()
    assert (root / "models/pretrain.pt").read_bytes() == before
