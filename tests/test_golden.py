"""The golden run (tests/golden/golden.py): training numbers change only on purpose. It is compared bit
for bit on the host it was recorded on and within golden.REL elsewhere; that tolerance passes a sum
accumulated in another order and fails a real change, and a pure move of a function passes."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import fmvae.core.loop
import fmvae.core.phases
from helpers import ROOT, ReorderedLinear

spec = importlib.util.spec_from_file_location("golden", ROOT / "tests/golden/golden.py")
golden = importlib.util.module_from_spec(spec)
sys.modules["golden"] = golden
spec.loader.exec_module(golden)
RECORDED = json.loads(golden.GOLDEN.read_text())


def test_the_golden_run_gives_its_recorded_numbers():
    """Rerun every training path: on the recorded torch build, CPU and capability equal to the bit;
    elsewhere within golden.REL. If this fails on purpose: python tests/golden/golden.py --record,
    committed with the change and its reason."""
    how, failures = golden.check()
    print(f"golden run compared {how}")
    assert not failures, "\n".join(failures)


def test_the_tolerance_passes_another_summation_order_but_not_a_changed_constant(monkeypatch):
    """Every Linear layer's weight gradient summed over the batch in reverse order (what another CPU's
    kernels may do) stays within golden.REL of the record though not equal to the bit; the weight
    average's warm-up constant changed from 10 to 11 does not stay within it."""
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Linear, "forward", lambda self, x: ReorderedLinear.apply(x, self.weight, self.bias))
        reordered = golden.run()
    assert golden.compare(reordered, RECORDED, bitwise=True)
    assert not golden.compare(reordered, RECORDED, bitwise=False), golden.compare(reordered, RECORDED, bitwise=False)

    def update(self):
        d = min(self.decay, (1 + self.updates) / (11 + self.updates))  # the constant: 10 in fmvae.core.loop
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    monkeypatch.setattr(fmvae.core.loop.WeightAverage, "update", torch.no_grad()(update))
    assert golden.compare(golden.run(), RECORDED, bitwise=False)


def test_the_tolerance_fails_one_more_adam_step():
    """The pre-training one iteration longer: every later path starts elsewhere."""
    longer = golden.PARAMS | {"pretrain": golden.PARAMS["pretrain"] | {"iters": golden.PARAMS["pretrain"]["iters"] + 1}}
    assert golden.compare(golden.run(longer), RECORDED, bitwise=False)


def kl_z_weight(step, cfg):
    """fmvae.core.phases.kl_z_weight, word for word, as if moved to another module."""
    if not cfg.kl_z_anneal_iters:
        return cfg.kl_z_weight
    if isinstance(step, torch.Tensor):
        return 1.0 + (cfg.kl_z_weight - 1.0) * (1.0 - step.float() / cfg.kl_z_anneal_iters).clamp(min=0.0)
    return 1.0 + (cfg.kl_z_weight - 1.0) * max(0.0, 1.0 - step / cfg.kl_z_anneal_iters)


def test_a_pure_move_of_a_function_passes(monkeypatch):
    monkeypatch.setattr(fmvae.core.phases, "kl_z_weight", kl_z_weight)
    how, failures = golden.check()
    assert not failures, (how, failures)


@pytest.mark.parametrize("change", ["weights", "number"])
def test_the_bitwise_comparison_sees_any_change(change):
    """On the recorded host nothing may move: a flipped weight hash or a number off by one ulp fails."""
    got = json.loads(json.dumps(RECORDED["result"]))
    if change == "weights":
        got["joint_labels"]["weights"]["sha256"] = "0" * 64
    else:
        got["evaluate"]["elbo"] = float(torch.nextafter(torch.tensor(got["evaluate"]["elbo"], dtype=torch.float64),
                                                        torch.tensor(0.0, dtype=torch.float64)))
    assert golden.compare(got, RECORDED, bitwise=True)
    assert not golden.compare(got, RECORDED, bitwise=False)


def test_relock_off_the_recorded_host_needs_the_locked_commits_numbers_bit_for_bit(monkeypatch):
    """Off the host golden.json was recorded on, --relock reruns the golden run of the commit whose sources
    dvc.lock records, here, and relocks only if this code gives it bit for bit: unchanged code does (when the
    work tree's training code is HEAD's), a summation order within the tolerance does not, and dvc.lock is
    left as it was."""
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fmvae", "tests/golden"], cwd=ROOT).returncode == 0
    if clean:
        assert golden.compare(golden.run(), {"result": golden.run_at("HEAD")}, bitwise=True) == []
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Linear, "forward", lambda self, x: ReorderedLinear.apply(x, self.weight, self.bias))
        reordered = golden.run()
    monkeypatch.setattr(golden, "run", lambda: reordered)
    monkeypatch.setattr(golden, "environment", lambda: RECORDED["environment"] | {"cpu_capability": "another"})
    lock = (ROOT / "dvc.lock").read_bytes()
    with pytest.raises(SystemExit, match="refused: the golden run compared bit for bit against .* rerun on this host"):
        golden.relock()
    assert (ROOT / "dvc.lock").read_bytes() == lock
