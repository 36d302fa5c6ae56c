"""Shared by the stage scripts: paths, params loading, and clean errors for bad input."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fmvae.io import CorruptCheckpoint  # noqa: E402
from fmvae.data import DataError  # noqa: E402
from fmvae.params import ParamError, load_params  # noqa: E402

DATA = ROOT / "data" / "prepared" / "dataset.pt"
MODELS = ROOT / "models"
CHECKPOINTS = ROOT / "checkpoints"
REPORTS = ROOT / "reports"
CURVES = REPORTS / "curves"


def main(stage, sweep_file=None) -> None:
    """Run stage(params) with params.yaml validated first (its `sweep:` section replaced by
    sweep_file's when given); bad input exits 1 with one clear line, and so does a training stage stopped
    by a non-finite term (fmvae.core.loop.NumericalError, caught as the FloatingPointError it is, so that this
    module, which every stage imports, imports no training code)."""
    try:
        stage(load_params(ROOT / "params.yaml", sweep_file=sweep_file))
    except (ParamError, DataError, CorruptCheckpoint, FloatingPointError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
