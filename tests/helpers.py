"""Test helpers: a throwaway copy of the project and tiny params."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "seed": 0, "device": "cpu",
    "data": {"name": "synthetic"},
    "model": {"I": 2, "K": 3, "D": 4},
    "train": {"batch_size": 32, "lr": 0.001, "log_every": 10, "checkpoint_every_s": 0},
    "pretrain": {"iters": 30, "kl_anneal_iters": 10},
    "prior_init": {"iters": 10, "init_points": 500},
    "joint": {"iters": 30},
    "evaluate": {"iw_samples": 5, "iw_points": 50},
    "plot": {"factors": [0, 1], "max_components": 3},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def tiny_params(**sections) -> dict:
    """The repository's params.yaml with TINY and `sections` merged in (every key present, as DVC needs)."""
    return merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), sections)


def copy_project(dest: Path, params: dict | None = None) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied to dest, a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def env_with_venv() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # absolute: a test's project copy, and a `dvc exp run --temp` workspace, run in other folders
    env["FMVAE_DATA_MIRROR"] = str(Path(env.get("FMVAE_DATA_MIRROR") or ROOT.parent / "shared" / "datasets").resolve())
    return env


def run(cmd, cwd, check=True, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = env_with_venv()
    env.update(env_extra or {})
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


class ReorderedLinear(torch.autograd.Function):
    """x W^T + b whose weight and bias gradients sum the batch in reverse order: the same numbers,
    accumulated in the order another CPU's matrix kernel may choose."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g, xs = grad.flip(0), x.flip(0)
        return grad @ weight, g.T @ xs, g.sum(0)


def assert_every_torch_file_holds_plain_values(*folders: Path) -> int:
    """Every .pt file under `folders` loads with torch.load(weights_only=True) and no allow-listed class: typed
    params, configs and versions are stored as plain dicts, lists, strings and numbers. Returns the count."""
    import torch
    files = [p for folder in folders if folder.exists() for p in sorted(folder.rglob("*.pt"))]
    for path in files:
        torch.load(path, map_location="cpu", weights_only=True)
    assert files, folders
    return len(files)
