"""Stage evaluate: test bound (11) and its parts, IWAE, accuracies -> reports/metrics.json."""
from _common import DATA, MODELS, REPORTS, main

from fmvae.core.pipeline import evaluate_stage

if __name__ == "__main__":
    main(lambda params: evaluate_stage(params, DATA, MODELS / "joint.pt", REPORTS / "metrics.json",
                                       MODELS / "joint_snapshots.pt"))
