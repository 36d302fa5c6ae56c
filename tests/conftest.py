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


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`-n auto`, pyproject's addopts) hands out whole modules, so each module's
    module-scoped fixtures (a trained reference run, a finished sweep) are built once, and every Ray
    test as one unit. (xdist's own `--dist loadgroup` marks stopped grouping with pytest 9.2:
    pytest-dev/pytest-xdist#1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_TESTS) else nodeid.split("::", 1)[0]

    return ModulesAndRay(config, log)
