"""The sweep on a real two-node Ray cluster (both nodes on this machine, every Ray process bound to
127.0.0.1), its state in a storage outside the project, and a worker node lost mid-trial.

Ray replaces a loopback address given to it by the host's outward one unless it is told it runs
without a cluster network (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray's node-address lookup
only), so that is set for the cluster's processes and the driver: test traffic stays on 127.0.0.1."""
import json
import subprocess
import time

import pandas as pd
import pytest

from helpers import copy_project, env_with_venv, run, tiny_params

SWEEP = {"data": ["synthetic"], "K": [2, 3], "seeds": [0], "I": [1], "cpus_per_trial": 1, "gpus_per_trial": 0,
         "max_failures": 1, "iters": {"pretrain": 30, "prior_init": 10, "joint": 100}}
PARAMS = tiny_params(model={"I": 1, "K": 3, "D": 4}, plot={"factors": [0, 0]}, sweep=SWEEP)
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NUMBERS = ["elbo", "recon", "kl_z", "kl_r", "components_used", "pretrain_iters", "prior_init_iters", "joint_iters",
           "batch_size", "train_points", "test_points", "status", "fingerprint"]


@pytest.fixture(scope="module")
def single_machine(tmp_path_factory):
    """The same sweep uninterrupted on one machine (local Ray, default storage)."""
    root = copy_project(tmp_path_factory.mktemp("one-machine"), PARAMS)
    start = time.time()
    run(["python", "stages/sweep.py"], root, timeout=900)
    print(f"\none-machine sweep: {time.time() - start:.0f} s wall")
    return pd.read_csv(root / "reports/sweep/results.csv")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head without CPUs and two 1-CPU workers; the driver joins by address and keeps everything in
    a file:// storage elsewhere; trial K = 3 stops after its first joint checkpoint reached Tune, and
    the test removes its node (raylet, workers and all)."""
    from ray.cluster_utils import Cluster
    tmp = tmp_path_factory.mktemp("two-nodes")
    root = copy_project(tmp / "project", PARAMS)
    storage, pause = tmp / "storage", tmp / "pause"
    pause.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOOPBACK_ONLY.items():
            mp.setenv(k, v)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                                "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    try:
        assert cluster.address.startswith("127.0.0.1:")
        env = env_with_venv() | LOOPBACK_ONLY | {"FMVAE_SWEEP_PAUSE_K": "3", "FMVAE_SWEEP_PAUSE_DIR": str(pause)}
        start = time.time()
        with open(tmp / "driver.log", "w") as log:
            driver = subprocess.Popen(["python", "stages/sweep.py", "--address", cluster.address,
                                       "--storage", f"file://{storage}"], cwd=root, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
            deadline = time.time() + 1800  # a guard against a hang, not a speed assertion
            while not (pause / "K3").exists() and driver.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert (pause / "K3").exists(), (tmp / "driver.log").read_text()[-3000:]
            lost = (pause / "K3").read_text()
            cluster.remove_node(next(w for w in workers if w.node_id == lost), allow_graceful=False)
            rc = driver.wait(timeout=1800)
        wall = time.time() - start
        assert rc == 0, (tmp / "driver.log").read_text()[-3000:]
    finally:
        cluster.shutdown()
    records = {p.stem: json.loads(p.read_text()) for p in (storage / "finished").glob("*.json")}
    print(f"\ntwo-node sweep: {wall:.0f} s wall (driver start to exit); node lost: {lost[:8]}")
    for name, record in sorted(records.items()):
        print(f"  {name}: " + "; ".join(f"attempt on node {a['node'][:8]}, restored {a['restored'] or 'nothing'}"
                                      for a in record["attempts"]))
    return {"root": root, "storage": storage, "lost": lost, "workers": [w.node_id for w in workers],
            "results": pd.read_csv(root / "reports/sweep/results.csv"), "records": records,
            "log": (tmp / "driver.log").read_text()}


def test_a_sweep_on_two_nodes_with_its_storage_elsewhere_equals_the_one_machine_sweep(single_machine, two_nodes):
    df = two_nodes["results"]
    assert sorted(df["K"]) == [2, 3] and (df["status"] == "done").all()
    pd.testing.assert_frame_equal(df[NUMBERS], single_machine[NUMBERS])
    first_nodes = {r["attempts"][0]["node"] for r in two_nodes["records"].values()}
    assert first_nodes == set(two_nodes["workers"]), "the two K trials should start on the two workers"
    assert {a["ip"] for r in two_nodes["records"].values() for a in r["attempts"]} == {"127.0.0.1"}


def test_a_trial_on_a_lost_node_resumes_on_the_other_from_its_last_checkpoint(two_nodes):
    [k3] = [r for name, r in two_nodes["records"].items() if "-K3-" in name]
    first, second = k3["attempts"]
    assert first["node"] == two_nodes["lost"] and second["node"] != two_nodes["lost"]
    assert second["restored"].get("joint", 0) > 0, k3["attempts"]  # resumed mid-joint, not from scratch
    assert second["finished_phases"] == ["prior_init"]
    assert k3["metrics"]["joint_steps"] == SWEEP["iters"]["joint"]


def test_nothing_of_a_trial_is_written_beside_the_driver(two_nodes):
    """In storage mode the driver's checkpoints/ gets nothing; data, pre-training, records and the
    Tune experiments (with the trials' checkpoints) are all in the storage."""
    root, storage = two_nodes["root"], two_nodes["storage"]
    assert not [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
    assert {p.name for p in storage.iterdir()} == {"data", "pretrain", "finished", "ray"}
    checkpoints = list((storage / "ray").rglob("checkpoint_*/final.json"))
    assert len(checkpoints) == 2  # each trial's final record, through Tune's checkpoint API
