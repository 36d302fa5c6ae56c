import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the sweep's per-node cache of files fetched from its storage (default ~/.cache/fmvae): a test's own
os.environ.setdefault("FMVAE_CACHE", tempfile.mkdtemp(prefix="fmvae-test-cache-"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local data mirror (CI sets FMVAE_DATA_MIRROR=../shared/datasets)."""
    path = Path(os.environ.get("FMVAE_DATA_MIRROR", ROOT.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.fail(f"data mirror {path} not found: set FMVAE_DATA_MIRROR")
    return path
