"""Run a paper preset as a named DVC experiment, leaving params.yaml and the workspace as they are:

    python stages/preset.py mnist_paper            # dvc exp run --temp -n mnist_paper -S key=value ...
    python stages/preset.py mnist_paper --print    # only print that command
    dvc exp show                                   # the preset's row beside the default run
    dvc exp apply mnist_paper                      # bring its params and results into the workspace

The preset (presets/NAME.yaml) is validated against fmvae.params' declarations first; each of its keys becomes
one `-S` override, so DVC records exactly what the experiment changed. `--temp` runs it in a
temporary copy of the repository, so the default profile's outputs are never overwritten.
Arguments after the name are passed on to `dvc exp run` (e.g. `--queue`).
"""
import json
import os
import shlex
import subprocess
import sys

import yaml
from _common import ROOT

from fmvae.params import ParamError, flatten, validate


def overrides(preset: dict) -> list[str]:
    """-S arguments, one per key; values in YAML/JSON syntax, which DVC parses back to their types."""
    return [f"{key}={json.dumps(value)}" for key, value in flatten(preset).items()]


def command(name: str, extra: list[str]) -> list[str]:
    preset = ROOT / "presets" / f"{name}.yaml"
    params = yaml.safe_load(preset.read_text()) or {}
    try:
        validate(params)
    except ParamError as err:
        sys.exit(f"error in {preset.relative_to(ROOT)}: {err}")
    cmd = ["dvc", "exp", "run", "-n", name] + (["--temp"] if "--queue" not in extra else [])
    for override in overrides(params):
        cmd += ["-S", override]
    return cmd + extra


if __name__ == "__main__":
    names = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python stages/preset.py NAME [--print] [dvc exp run options], NAME one of: {', '.join(names)}")
    extra = [a for a in sys.argv[2:] if a != "--print"]
    cmd = command(sys.argv[1], extra)
    print(shlex.join(cmd), flush=True)
    if "--print" not in sys.argv:
        env = dict(os.environ)
        if env.get("FMVAE_DATA_MIRROR"):  # --temp runs in a copy elsewhere: a relative mirror would not resolve there
            env["FMVAE_DATA_MIRROR"] = os.path.abspath(env["FMVAE_DATA_MIRROR"])
        sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)
