"""Stage properties: per labelled property, accuracy of argmax q(r_i|x) and an automatic judge's
agreement with clamped samples -> reports/<dataset>_table.md (the paper's CelebA tables)."""
from _common import DATA, MODELS, REPORTS, main

from fmvae.pipeline import properties_stage

if __name__ == "__main__":
    main(lambda params: properties_stage(params, DATA, MODELS / "joint.pt", REPORTS))
