"""The Ray Tune sweep through real Ray (CPU, synthetic data, tens of iterations) and its reports."""
import pandas as pd
import pytest

from helpers import copy_project, run, tiny_params

SWEEP = {"data": "synthetic", "K": [2, 3, 4], "seeds": [0], "I": [1], "cpus_per_trial": 1, "gpus_per_trial": 0,
         "max_failures": 1, "iters": {"pretrain": 30, "prior_init": 10, "joint": 30}}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("sweep"),
                        tiny_params(model={"I": 1, "K": 3, "D": 4}, plot={"factors": [0, 0]}, sweep=SWEEP))
    first = run(["python", "stages/sweep.py"], root, env_extra={"FMVAE_SWEEP_FAIL_K": "4"}, timeout=600)
    return root, first.stdout + first.stderr


def test_sweep_writes_one_row_per_trial_and_records_the_failed_one(swept):
    root, log = swept
    df = pd.read_csv(root / "reports/sweep/results.csv")
    for col in ["dataset", "K", "I", "seed", "elbo", "recon", "kl_z", "kl_r", "components_used", "iterations",
                "wall_s", "status"]:
        assert col in df.columns
    assert sorted(df["K"]) == [2, 3, 4] and set(df["dataset"]) == {"synthetic"}
    done, failed = df[df["status"] == "done"], df[df["status"] == "failed"]
    assert sorted(done["K"]) == [2, 3] and list(failed["K"]) == [4]
    assert "injected failure" in failed["error"].iloc[0]
    assert (done["iterations"] == 70).all()
    assert ((done["elbo"] - (done["recon"] - done["kl_z"] - done["kl_r"])).abs() < 1e-3).all()
    assert (root / "checkpoints/sweep/injected_failures.log").read_text().count("K=4") == 2  # 1 + max_failures
    assert len(list((root / "checkpoints/sweep/pretrain").glob("*.pt"))) == 1  # shared by both K trials
    assert "2 trials done, 1 failed" in log


def test_second_invocation_reuses_finished_trials(swept):
    root, _ = swept
    trials = sorted((root / "checkpoints/sweep/trials").glob("*/joint.pt"))
    stamps = [p.stat().st_mtime_ns for p in trials]
    before = pd.read_csv(root / "reports/sweep/results.csv")
    again = run(["python", "stages/sweep.py"], root, env_extra={"FMVAE_SWEEP_FAIL_K": "4"}, timeout=600)
    assert "finished trials are not rerun" in again.stdout
    assert [p.stat().st_mtime_ns for p in trials] == stamps
    pd.testing.assert_frame_equal(pd.read_csv(root / "reports/sweep/results.csv"), before)


def test_report_stage_draws_figure3(swept):
    root, _ = swept
    run(["python", "stages/report.py"], root)
    assert (root / "reports/figure3_synthetic.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(root / "reports/figure3_synthetic.csv")
    assert sorted(table["K"]) == [2, 3] and (table["seeds"] == 1).all()


def test_asking_for_gpus_on_a_cluster_without_any_is_a_clear_error(tmp_path):
    root = copy_project(tmp_path, tiny_params(model={"I": 1, "K": 3, "D": 4}, plot={"factors": [0, 0]},
                                              sweep=SWEEP | {"gpus_per_trial": 0.5}))
    before = (root / "reports/sweep/results.csv").read_bytes()  # the committed results stay as they are
    res = run(["python", "stages/sweep.py"], root, check=False, timeout=300)
    assert res.returncode == 1 and "sweep.gpus_per_trial: 0.5 but the Ray cluster has no GPU" in res.stderr
    assert (root / "reports/sweep/results.csv").read_bytes() == before
    assert not (root / "checkpoints/sweep/trials").exists()
