import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Under pytest-xdist (`-n auto`, pyproject's addopts) the workers share the host's cores: one torch
# thread each (inherited by the stages and Ray trials the tests start), since two multi-threaded
# torch processes on two cores thrash. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# the sweep's per-node cache of files fetched from its storage (default ~/.cache/fmvae): a test's own
os.environ.setdefault("FMVAE_CACHE", tempfile.mkdtemp(prefix="fmvae-test-cache-"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local data mirror (CI sets FMVAE_DATA_MIRROR=../shared/datasets)."""
    path = Path(os.environ.get("FMVAE_DATA_MIRROR", ROOT.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.fail(f"data mirror {path} not found: set FMVAE_DATA_MIRROR")
    return path


# the tests that start Ray: one worker runs them all, so that one Ray instance runs at a time
RAY_TESTS = ("tests/test_sweep.py", "tests/test_cluster.py",
             "tests/test_reliability.py::test_killed_sweep_driver_resumes_without_rerunning_finished_trials")
# Seconds the longest units took (junit times, -n 2, a 2-core Intel Xeon host, 2026-12-07; the Ray unit
# holds test_sweep, test_cluster and one reliability test). They are handed out longest first, so that
# the last unit to start is a short one: xdist orders units by their number of tests, which put
# test_experiments (6 tests, the longest module) near the end, with the other worker idle meanwhile.
# Units not listed follow in xdist's order; a stale figure only costs balance, never a test.
UNIT_SECONDS = {"ray": 430, "tests/test_experiments.py": 360, "tests/test_pipeline.py": 200,
                "tests/test_reliability.py": 145, "tests/test_celeba_report.py": 130,
                "tests/test_end_to_end.py": 90, "tests/test_speed_paths.py": 80, "tests/test_runs.py": 76,
                "tests/test_remote.py": 68, "tests/test_averaging.py": 56, "tests/test_pack.py": 49}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`-n auto`, pyproject's addopts) hands out whole modules, so each module's
    module-scoped fixtures (a trained reference run, a finished sweep) are built once, and every Ray
    test as one unit, the longest units first (UNIT_SECONDS). (xdist's own `--dist loadgroup` marks
    stopped grouping with pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_TESTS) else nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node) -> None:
            longest = max(self.workqueue, key=lambda unit: UNIT_SECONDS.get(unit, 0))  # first of ties
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return ModulesAndRay(config, log)
