"""The golden run: every training path on a tiny fixed-seed, one-thread run, and the numbers it ends with.

    python tests/golden/golden.py            # run it, compare with golden.json, say which comparison
    python tests/golden/golden.py --record   # write golden.json anew (a commit that moves numbers on purpose)
    python tests/golden/golden.py --relock   # a neutral refactor: record dvc.yaml's new code deps in dvc.lock
                                             # (off the recorded host: neutral against the code dvc.lock records)

The paths, through the phases of fmvae.core.phases with each phase's TrainConfig built from params by
fmvae.params.train_config (as the pipeline builds it), on factorial vectors (fmvae.data.factorial_vectors:
two factors of three clusters behind a fixed non-linear map; 3,000 training and 1,000 test points) and
an MLP: pre-training, prior initialisation without and with the latent rotation (factorial k-means,
labels clamped), the joint phase with 30% of the labels clamped and the gradient factors of section 2.5
(Delta > 0) under the KL[z] annealing and the step-size decay, and the test bound and accuracies of the
joint model. For each: the last logged row of its curve, the sha256 of its weights and q(xi), and the
norm of each of those tensors.

On the torch build, CPU model and vector capability golden.json was recorded on, the rerun must equal it
bit for bit. Elsewhere (another CPU vendor picks other matrix kernels, whose float32 sums round in
another order) every number must agree within REL of its size: measured, a reordered sum moves them by
far less, one more Adam step or a changed constant by far more (tests/test_golden.py shows both). It pins
one thread: other thread counts are other draws. It does not cover the convolutional networks, CUDA,
compiled or graphed steps, packs or the stage functions' file handling (their own tests do).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fmvae.core import evaluate  # noqa: E402
from fmvae.provenance import host  # noqa: E402
from fmvae.params import Params, train_config, validate  # noqa: E402
from fmvae.data import factorial_vectors, semi_supervised_labels  # noqa: E402
from fmvae.core.model import FMVAE  # noqa: E402
from fmvae.core.loop import TrainData  # noqa: E402
from fmvae.core.phases import init_prior, joint_train, pretrain  # noqa: E402

GOLDEN = Path(__file__).with_name("golden.json")
# Off the recorded host: each number within REL of its scale (a path's terms: its bound, or KL[z] + KL[r] for
# the prior's initialisation; a tensor's norm: the norm of all the path's tensors; the gradient's norm: itself,
# within GRAD_REL). Measured on this run (AMD EPYC, one thread): every Linear's weight gradient summed in
# reverse batch order moves them by at most 6e-8; the weight average's warm-up constant 10 -> 11 by 2.7e-2,
# one more pre-training or joint step by 4e-2 and 5e-2. (At 300 + 300 iterations the reordered sums moved
# them by 2e-4: the longer run is chaotic enough to amplify rounding, so the golden run stays this short.)
REL, GRAD_REL = 1e-4, 1e-2
PARAMS = {
    "seed": 0, "device": "cpu",
    "model": {"I": 2, "K": [3, 3], "D": 2},
    "train": {"batch_size": 64, "log_every": 50, "checkpoint_every_s": 0},
    "pretrain": {"iters": 150, "kl_anneal_iters": 50},
    "prior_init": {"iters": 50, "init_points": 1000, "restarts": 2, "rotate": False},
    "joint": {"iters": 150, "kl_z_weight": 5.0, "kl_z_anneal_iters": 75, "lr_decay": 0.5, "snapshots": 2,
              "snapshot_every": 50},
    "semi": {"fraction": 0.3, "delta": 10.0},
}


def environment() -> dict:
    return {"torch": torch.__version__, "cpu": host()["cpu"], "cpu_capability": host()["cpu_capability"],
            "threads": 1}


def weights(model: FMVAE) -> dict:
    """sha256 over the model's tensors (networks and q(xi), in name order) and each float tensor's norm."""
    state = model.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return {"sha256": h.hexdigest(),
            "norms": {n: float(t.double().norm()) for n, t in sorted(state.items()) if t.is_floating_point()}}


def run(params: dict = PARAMS) -> dict:
    """Every path once, on one thread (the caller's thread count restored); returns its numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(validate(params))
    finally:
        torch.set_num_threads(threads)


def _run(params: Params) -> dict:
    x, y = factorial_vectors(3000, seed=0)
    x_test, y_test = factorial_vectors(1000, seed=1)
    data = TrainData(x, lambda t: t, semi_supervised_labels(y, params.semi.fraction, 2, params.seed))
    cfg = lambda p, phase: dataclasses.replace(train_config(p, phase), progress=False)
    out = {}

    def phase(name, train, model, p, stage, **kw):
        history = train(model, data, cfg(p, stage), **kw)
        out[name] = {"last_row": history[-1], "weights": weights(model)}
        return model

    torch.manual_seed(params.seed)
    pretrained = phase("pretrain", pretrain, FMVAE("mlp", (x.shape[1],), params.model.K, params.model.D),
                       params, "pretrain")
    rotated = params.override({"prior_init.rotate": True})
    phase("prior_init_rotated", init_prior, copy.deepcopy(pretrained), rotated, "prior_init")
    model = phase("prior_init", init_prior, pretrained, params, "prior_init")
    model = phase("joint_labels", joint_train, model, params, "joint", gradient_factors=[0, 1])
    torch.manual_seed(params.seed)
    res = evaluate.evaluate_bound(model, x_test, lambda t: t)
    out["evaluate"] = {k: res[k] for k in ("elbo", "recon", "kl_z", "kl_r")} | {
        f"acc_factor{i}": evaluate.supervised_accuracy(res["assignments"][:, i], y_test[:, i]) for i in range(2)}
    return out


def scaled(result: dict) -> dict:
    """Every number of a result with the scale it is compared on: {name: (value, scale)} (hashes aside)."""
    flat = {}
    for path, part in result.items():
        if "last_row" in part:
            row = part["last_row"]
            scale = abs(row["elbo"] if "elbo" in row else row.get("bound", abs(row.get("kl_z", 0)) + abs(row.get("kl_r", 0))))
            flat |= {f"{path}.{k}": (float(v), abs(float(v)) / REL * GRAD_REL if k == "grad_norm" else scale)
                     for k, v in row.items()}
            norms = part["weights"]["norms"]
            total = sum(v * v for v in norms.values()) ** 0.5
            flat |= {f"{path}.norm.{k}": (v, total) for k, v in norms.items()}
        else:  # the test bound's terms on its size, accuracies as fractions
            flat |= {f"{path}.{k}": (float(v), 1.0 if k.startswith("acc") else abs(part["elbo"])) for k, v in part.items()}
    return flat


def compare(got: dict, recorded: dict, bitwise: bool, rel: float = REL) -> list[str]:
    """The differences that fail the comparison: any at all when bitwise (hashes included), else a
    number off by more than rel of its scale (see scaled)."""
    want = recorded["result"]
    a, b = scaled(got), scaled(want)
    if a.keys() != b.keys():
        return [f"other numbers: {sorted(a.keys() ^ b.keys())}"]
    bad = [f"{k}: {a[k][0]!r} != {b[k][0]!r}" for k in b
           if (a[k][0] != b[k][0] if bitwise else abs(a[k][0] - b[k][0]) > rel * b[k][1])]
    if bitwise:
        bad += [f"{name}.weights.sha256 differs" for name in want if "weights" in want[name]
                and got[name]["weights"]["sha256"] != want[name]["weights"]["sha256"]]
    return bad


def run_at(commit: str) -> dict:
    """The golden run of another commit's code on this host: the commit checked out in a temporary git
    worktree, its own golden.py's run() in a fresh interpreter (its tests/golden puts that tree's fmvae
    first on the path), the result read back as JSON (floats round-trip exactly)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            code = ("import fmvae, json, runpy, sys; g = runpy.run_path('tests/golden/golden.py'); "
                    "assert fmvae.__file__.startswith(sys.argv[1]), fmvae.__file__; print(json.dumps(g['run']()))")
            out = subprocess.run([sys.executable, "-c", code, str(tree)], cwd=tree, check=True, capture_output=True,
                                 text=True).stdout
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return json.loads(out.splitlines()[-1])


def relock() -> None:
    """After a change the golden run shows to be neutral, record the stages' new code deps in dvc.lock
    and sweep/dvc.lock (the sweep's trials train on the same sources) with DVC's own hashing
    (Stage.save_deps), keeping every output as recorded, so that neither the default run nor the sweep
    needs retraining for a moved function or a slimmer import. Neutral means equal bit for bit: on the
    recorded host, to golden.json; on any other host, to the golden run of each commit whose sources a
    lock records (fmvae.reporting.runs), run here too, so that no host is needed but the one at hand.
    The commit that writes a lock is then the one its run is checked against (runs.run_code).
    The outputs may be absent (a fresh clone's DVC cache is empty); an output present is checked too."""
    from dvc.repo import Repo

    from fmvae.reporting import runs
    dvcfiles = [ROOT / "dvc.yaml", ROOT / "sweep" / "dvc.yaml"]
    got = run()
    how, failures = check(got)
    if not failures and not how.startswith("bit for bit"):
        bases = {}
        for dvcfile in dvcfiles:
            base = runs.newest_matching_ancestor(dvcfile.with_suffix(".lock"))
            if base is None:
                sys.exit(f"refused: off the golden run's recorded host, and no commit has the sources "
                         f"{dvcfile.with_suffix('.lock').relative_to(ROOT)} records")
            bases.setdefault(base, []).append(dvcfile.with_suffix(".lock").relative_to(ROOT))
        for base, locks in bases.items():
            failures += compare(got, {"result": run_at(base)}, bitwise=True)
        how = "bit for bit against " + ", ".join(f"{base[:7]} (the sources {' and '.join(map(str, locks))} "
                                                 f"records)" for base, locks in bases.items()) + ", rerun on this host"
    if failures or not how.startswith("bit for bit"):
        sys.exit(f"refused: the golden run compared {how}: {failures or 'not on its recorded host'}")
    repo = Repo(str(ROOT))
    relocked = 0
    with repo.lock:
        for dvcfile in dvcfiles:
            stages = [s for s in repo.index.stages if Path(s.path) == dvcfile]
            for stage in stages:
                stage.save_deps(allow_missing=True)
                stage.save_outs(allow_missing=True)
            stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
            relocked += len(stages)
    print(f"golden run equal {how}: dvc.lock and sweep/dvc.lock record the code deps of {relocked} stages")


def check(got: dict | None = None) -> tuple[str, list[str]]:
    """(which comparison ran, its failures) for a rerun against golden.json."""
    recorded = json.loads(GOLDEN.read_text())
    bitwise = recorded["environment"] == environment()
    how = ("bit for bit (the recorded torch build, CPU and capability)" if bitwise else
           f"within {REL:g} of each number (recorded on {recorded['environment']}, here {environment()})")
    return how, compare(run() if got is None else got, recorded, bitwise)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write golden.json from this run")
    parser.add_argument("--relock", action="store_true",
                        help="record the code deps in dvc.lock and sweep/dvc.lock if neutral")
    args = parser.parse_args()
    if args.relock:
        relock()
    elif args.record:
        GOLDEN.write_text(json.dumps({"environment": environment(), "result": run()}, indent=1) + "\n")
        print(f"recorded {GOLDEN.relative_to(ROOT)} on {environment()}")
    else:
        how, failures = check()
        print(f"golden run compared {how}: " + ("equal" if not failures else "\n  ".join(["DIFFERS"] + failures)))
        sys.exit(1 if failures else 0)
