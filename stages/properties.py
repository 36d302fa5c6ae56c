"""Stage properties: per labelled property, accuracy of argmax q(r_i|x) and an automatic judge's
agreement with clamped samples -> reports/<dataset>_table.md (the paper's CelebA tables). The table is
computed by fmvae.reporting.judge, which no training stage imports: a change to it retrains nothing."""
from _common import DATA, MODELS, REPORTS, main

from fmvae.core.pipeline import load_trained
from fmvae.reporting.judge import property_reports


def properties(params):
    ds, model = load_trained(params, DATA, MODELS / "joint.pt")
    return property_reports(model, ds, params, REPORTS, next(model.parameters()).device)


if __name__ == "__main__":
    main(properties)
