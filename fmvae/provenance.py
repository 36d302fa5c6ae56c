"""Where a number came from: the git commit, the host and package versions a file records, the digest
of the training sources that keys every checkpoint and sweep trial, and the fingerprints of settings."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def host() -> dict:
    """The machine a number came from: CPU model, torch's CPU kernel set, cores, torch's CPU threads, GPU
    if any (hosts of one kind differ several-fold in speed; the thread count and the kernel set, AVX2
    against AVX512 on two hosts that both call themselves "AMD EPYC", change the floating-point sums)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu}


# the direct dependencies whose versions provenance records (pyproject.toml's, and numpy under torch): the
# thread count alone moved the default run's bound by 1.3 nats, and library versions can as well
RECORDED_PACKAGES = ("fmvae", "torch", "torchvision", "numpy", "scipy", "pandas", "matplotlib", "pyarrow", "dvc", "ray")


def package_versions() -> dict[str, str]:
    """Python's and each RECORDED_PACKAGES' version as plain str (weights_only loading), "not installed"
    where absent (the GPU machine has no dvc or ray); torch's as torch reports it (e.g. 2.14.1+cu130)."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = str(torch.__version__) if name == "torch" else version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def record(params=None) -> dict:
    """What produced a file: params (typed params stored as their plain dict), seed, package versions,
    git commit, host and threads."""
    versions = package_versions()
    params = params.to_dict() if hasattr(params, "to_dict") else (params or {})
    return {"params": params, "seed": params.get("seed"), "versions": versions,
            "git_commit": git_commit(), "host": host()}


# The training sources: the package's code that a trained or evaluated number depends on, so that a
# change to any of them re-keys every checkpoint and sweep trial, and a change to a figure or table module
# (fmvae/reporting) or a script re-keys none. Declared here, not derived from which imports happen to
# sit at module level; tests/test_trust.py checks it is exactly what the training stages import.
TRAINING_SOURCES = ("__init__.py", "core", "data", "io.py", "params.py", "provenance.py")


def source_files(names=TRAINING_SOURCES) -> list[Path]:
    """The package's files of `names` (a folder: its .py files), sorted."""
    root = Path(__file__).resolve().parent
    files = []
    for name in names:
        path = root / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(files)


def training_sources() -> list[Path]:
    """The files of TRAINING_SOURCES, sorted."""
    return source_files(TRAINING_SOURCES)


def source_digest(names) -> str:
    """sha256 over the package's files of `names`, each with its path: a moved file changes it too."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in source_files(names):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source the pipeline trains and evaluates with (training_sources): a result
    (a checkpoint to resume, a sweep trial to reuse) belongs to the code that produced it too, and
    a change to a figure or a table alone retrains nothing."""
    return source_digest(TRAINING_SOURCES)


def fingerprint(*parts) -> str:
    """A digest of the settings and inputs a stage's result depends on (resume only if equal). Typed
    params and phase configs enter as the plain dicts of their values, so a digest does not depend on
    which of the two forms a caller holds."""
    plain = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) and not isinstance(o, type) else str(o)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=plain).encode()).hexdigest()[:16]
