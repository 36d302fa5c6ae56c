"""Write params.yaml from a preset: `python stages/preset.py celeba_paper && dvc repro`.

The preset (presets/NAME.yaml) is laid over the schema's defaults, validated, and
written atomically with every key present (DVC needs them all).
"""
import sys

import yaml
from _common import ROOT

from fmvae.checkpoint import atomic_write_text
from fmvae.config import ParamError, validate

if __name__ == "__main__":
    names = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python stages/preset.py NAME, NAME one of: {', '.join(names)}")
    preset = ROOT / "presets" / f"{sys.argv[1]}.yaml"
    try:
        params = validate(yaml.safe_load(preset.read_text()))
    except ParamError as err:
        sys.exit(f"error in {preset}: {err}")
    header = f"# written by stages/preset.py from {preset.relative_to(ROOT)}\n"
    atomic_write_text(ROOT / "params.yaml", header + yaml.safe_dump(params, sort_keys=False))
    print(f"params.yaml <- {preset.relative_to(ROOT)}; now run: dvc repro")
