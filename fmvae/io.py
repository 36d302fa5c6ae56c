"""Crash-safe files: atomic writes and checksummed checkpoints.

Every file is written to a temporary name in the same folder, fsynced and renamed,
so a reader sees either the old file or the whole new one. Checkpoints carry a
sha256 sidecar; a checkpoint whose bytes do not match it is skipped with a warning
and the previous one is used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion


def cache_root() -> Path:
    """This node's cache folder for derived files (sweep files fetched from storage, trained judges):
    FMVAE_CACHE, default ~/.cache/fmvae."""
    return Path(os.environ.get("FMVAE_CACHE") or Path.home() / ".cache" / "fmvae")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class CorruptCheckpoint(RuntimeError):
    pass


class UnsafeCheckpoint(CorruptCheckpoint):
    """A checkpoint whose pickle holds more than tensors and plain values (refused, never unpickled)."""


def save_checked(obj: Any, path: str | os.PathLike) -> None:
    """torch.save atomically, then its sha256 sidecar (written last: a file without a
    matching sidecar is never trusted)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_text(f"{path}.sha256", hashlib.sha256(data).hexdigest() + "\n")


def load_checked(path: str | os.PathLike, map_location="cpu") -> Any:
    path = Path(path)
    sidecar = Path(f"{path}.sha256")
    if not path.exists():
        raise FileNotFoundError(path)
    data = path.read_bytes()
    if not sidecar.exists() or sidecar.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CorruptCheckpoint(f"{path}: checksum missing or does not match (truncated or corrupted file)")
    try:  # tensors and plain values only: a pickled object would run code on load (a sweep's storage is shared)
        # (files written before provenance kept torch's version as a plain str hold a TorchVersion, a str)
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(f"{path}: refused: it holds objects other than tensors and plain values "
                               f"(loaded with weights_only): {str(err).splitlines()[-1]}") from None


class CheckpointDir:
    """Numbered checkpoints `ckpt-<step>.pt` in one folder, newest `keep` kept.

    Give each setting its own folder (pipeline: <stage folder>/<fingerprint>): pruning by step
    number within a folder shared by two settings would delete one run's checkpoints for the other's."""

    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("ckpt-*.pt")) if self.folder.exists() else []

    def save(self, state: dict, step: int) -> Path:
        path = self.folder / f"ckpt-{step:09d}.pt"
        save_checked(state, path)
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
            Path(f"{old}.sha256").unlink(missing_ok=True)
        return path

    def latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that loads and matches its checksum; warns about bad ones."""
        for path in reversed(self.paths()):
            try:
                return load_checked(path, map_location)
            except Exception as err:  # truncated zip, bad pickle, checksum mismatch
                warnings.warn(f"skipping unusable checkpoint {path}: {err}", stacklevel=2)
        return None

    def save_snapshot(self, state: dict, step: int) -> Path:
        """A model kept for evaluation (never pruned): `snapshot-<step>.pt` beside the checkpoints."""
        path = self.folder / f"snapshot-{step:09d}.pt"
        save_checked(state, path)
        return path

    def snapshots(self, up_to: int | None = None) -> list[dict]:
        """The saved snapshots in step order (those after `up_to` left out: a resumed run's later ones
        are rewritten when it reaches them)."""
        paths = sorted(self.folder.glob("snapshot-*.pt")) if self.folder.exists() else []
        states = [load_checked(p) for p in paths]
        return [s for s in states if up_to is None or s["step"] <= up_to]

    def prune_siblings(self) -> list[Path]:
        """Delete the other folders beside this one (checkpoints of other settings); called when this
        setting's run has finished, so an interrupted run never loses what it could resume from."""
        removed = []
        for other in self.folder.parent.iterdir() if self.folder.parent.exists() else []:
            if other.is_dir() and other != self.folder and (list(other.glob("ckpt-*.pt*"))
                                                             or list(other.glob("snapshot-*.pt*"))):
                shutil.rmtree(other)
                removed.append(other)
        return removed
