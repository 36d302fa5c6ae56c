"""A pack's checkpoints: one folder per member, each holding what that member alone would save, so a
member resumes alone or in any pack."""
from __future__ import annotations

from typing import Sequence

import torch

from fmvae.io import CheckpointDir, load_checked
from fmvae.pack.model import PackedModel


def member_row(row: dict, m: int) -> dict:
    """A member's log row out of the pack's (terms named "<term>/<member>")."""
    out = {"step": row["step"]} if "step" in row else {}
    suffix = f"/{m}"
    out |= {k[:-len(suffix)]: v for k, v in row.items() if k.endswith(suffix)}
    return out


class PackCheckpoints:
    """The loop's checkpoint folder for a pack: each save is split into one checkpoint per member in
    that member's own folder, in the format a trial alone writes (its K, its optimizer moments, its
    batch stream, its noise stream as the RNG state); `latest` rebuilds the pack at the newest step
    every member has, if every member's fingerprint matches."""

    def __init__(self, pack: PackedModel, folders: Sequence[CheckpointDir], fingerprints: Sequence[str], phase: str,
                 configs: Sequence[dict], metas: Sequence[dict]):
        self.pack, self.dirs, self.fingerprints = pack, list(folders), list(fingerprints)
        self.phase, self.configs, self.metas = phase, list(configs), list(metas)
        self.folder = self.dirs[0].folder
        self.fingerprint = "+".join(self.fingerprints)

    def _split(self, state: dict, m: int) -> dict:
        pack = self.pack
        batch_state, noise_state = state["batcher"][m]
        noise_cuda = pack.generators[m].device.type == "cuda"
        opt = state["optimizer"]
        member_opt = None if opt is None else {
            "state": {i: {k: (v[m].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                      for i, s in opt["state"].items()},
            "param_groups": opt["param_groups"]}
        avg = state["average"]
        member_avg = None if avg is None else avg | {"average": [a[m].clone() for a in avg["average"]]}
        return {"phase": self.phase, "fingerprint": self.fingerprints[m], "step": state["step"],
                "history": [member_row(r, m) for r in state["history"]], "skipped": state["skipped"],
                "model": pack.member_state(state["model"], m), "optimizer": member_opt, "average": member_avg,
                "batcher": batch_state,
                "torch_rng": state["torch_rng"] if noise_cuda else noise_state,
                "cuda_rng": [noise_state] if noise_cuda else state["cuda_rng"],
                "config": self.configs[m], "provenance": self.metas[m]}

    def save(self, state: dict, step: int) -> None:
        for m, folder in enumerate(self.dirs):
            folder.save(self._split(state, m), step)

    def save_snapshot(self, state: dict, step: int) -> None:
        for m, folder in enumerate(self.dirs):
            folder.save_snapshot({"step": step, "average": self.pack.member_state(state["average"], m),
                                  "last_iterate": self.pack.member_state(state["last_iterate"], m)}, step)

    def latest(self) -> dict | None:
        found = []
        for folder, fp in zip(self.dirs, self.fingerprints):
            states = {}
            for path in folder.paths():
                try:
                    s = load_checked(path)
                except Exception:  # a truncated or corrupt file: the member's earlier one may serve
                    continue
                if s.get("fingerprint") == fp:
                    states[s["step"]] = s
            found.append(states)
        common = set.intersection(*(set(s) for s in found)) if found else set()
        if not common:
            return None
        step = max(common)
        members = [s[step] for s in found]
        pack = self.pack
        opts = [s["optimizer"] for s in members]
        optimizer = None if opts[0] is None else {
            "state": {i: {k: (torch.stack([o["state"][i][k] for o in opts]) if torch.is_tensor(v) and v.dim() > 0
                              else v) for k, v in s.items()} for i, s in opts[0]["state"].items()},
            "param_groups": opts[0]["param_groups"]}
        avgs = [s["average"] for s in members]
        average = None if avgs[0] is None else avgs[0] | {
            "average": [torch.stack(parts) for parts in zip(*(a["average"] for a in avgs))]}
        noise_cuda = pack.generators[0].device.type == "cuda"
        history = [{"step": rows[0]["step"]} | {f"{k}/{m}": v for m, r in enumerate(rows) for k, v in r.items()
                                                  if k != "step"} for rows in zip(*(s["history"] for s in members))]
        return {"fingerprint": self.fingerprint, "step": step, "history": history, "skipped": members[0]["skipped"],
                "model": pack.stacked_state([s["model"] for s in members]), "optimizer": optimizer,
                "average": average,
                "batcher": [(s["batcher"], s["cuda_rng"][0] if noise_cuda else s["torch_rng"]) for s in members],
                "torch_rng": members[0]["torch_rng"], "cuda_rng": members[0]["cuda_rng"]}
