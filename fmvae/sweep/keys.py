"""What a sweep is made of and how each piece is named in the storage and in Ray: the params a trial and a
pre-training read, their fingerprints (params, the code digest and the sweep's own source), the grids."""
from __future__ import annotations

from fmvae import provenance
from fmvae.params import Params, validate


# the params a trial reads (validate fills every key, so each of these is always present)
TRIAL_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model", "train", "pretrain", "prior_init", "svi", "joint", "semi",
                  "evaluate")


# the subset pre-training reads: trials that agree on these share one pre-trained model
PRETRAIN_SECTIONS = ("seed", "device", "data.name", "data.omniglot_split", "data.partial", "model.I", "model.D", "model.arch", "model.channels", "train",
                     "pretrain")


def _select(params: Params, keys) -> dict:
    out = {}
    for key in keys:
        node = params.to_dict()
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


# how a trial runs is the sweep's code too (trial_params, run_trial), on top of the pipeline's;
# a packed member's is also fmvae/pack's
SWEEP_SOURCE = provenance.source_digest(["sweep"])
PACK_SOURCE = provenance.source_digest(["pack"])


def trial_fingerprint(params: Params) -> str:
    parts = [_select(params, TRIAL_SECTIONS), provenance.code_digest(), SWEEP_SOURCE]
    if params.sweep.pack > 1:  # a packed member's numbers round differently from a trial alone's
        parts.append({"sweep.pack": params.sweep.pack, "pack_source": PACK_SOURCE})
    return provenance.fingerprint(*parts)


def pretrain_fingerprint(params: Params) -> str:
    return provenance.fingerprint(_select(params, PRETRAIN_SECTIONS), provenance.code_digest(), SWEEP_SOURCE)


def data_key(params: Params, dataset: str) -> str:
    """The prepared data set's name in the storage, after what it depends on: the data params a
    loader reads, the seed (it draws Omniglot's split within characters and binarises `mnist`) and
    the loaders' code (a data file of another split, seed or reader is never reused). Each trial
    seed has its own, so a trial's data follow from its own params, which its fingerprint covers."""
    d = params.data
    fp = provenance.fingerprint(dataset, d.omniglot_split, d.partial, params.seed, provenance.code_digest())
    return f"data/{dataset}-s{params.seed}-{fp}.pt"


def pretrain_key(params: Params) -> str:
    return (f"pretrain/{params.data.name}-I{params.model.I}-D{params.model.D}-s{params.seed}"
            f"-{pretrain_fingerprint(params)}.pt")


def trial_name(params: Params) -> str:
    return (f"{params.data.name}-I{params.model.I}-K{params.model.K}-s{params.seed}"
            f"-{trial_fingerprint(params)}")


def trial_params(params: Params | dict, dataset: str, K: int, I: int, seed: int) -> Params:
    """One trial's params (from the sweep's, typed or as Tune carries them, a plain dict)."""
    params = params if isinstance(params, Params) else validate(params)
    iters = {f"{phase}.iters": n for phase, n in vars(params.sweep.iters).items() if n is not None}
    return params.override({"data.name": dataset, "model.K": K, "model.I": I, "seed": seed, "plot.factors": [0, 0],
                            "evaluate.iw_samples": 0,  # a trial reports the bound (11) and its parts, not IWAE (Figure 3)
                            "joint.snapshots": 0}  # nor the spread over the last snapshots (2 models per snapshot)
                           | iters)


def trial_grid(params: Params) -> list[dict]:
    """Every trial, K slowest: the first trials need different pre-trainings (data set x seed x I)
    and run side by side, instead of queueing behind one shared pre-training."""
    s = params.sweep
    return [{"dataset": d, "K": k, "I": i, "seed": seed} for k in s.K for seed in s.seeds for d in s.data for i in s.I]


def pack_grid(params: Params) -> list[list[dict]]:
    """The trials in packs of at most sweep.pack, each of one data set and I (one network shape),
    in trial_grid's order within each."""
    groups: dict = {}
    for t in trial_grid(params):
        groups.setdefault((t["dataset"], t["I"]), []).append(t)
    size = params.sweep.pack
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def pretrain_grid(params: Params) -> list[Params]:
    """One pre-training per distinct pre-training fingerprint, with the params of its first trial."""
    out = {}
    for t in trial_grid(params):
        p = trial_params(params, t["dataset"], t["K"], t["I"], t["seed"])
        out.setdefault(pretrain_key(p), p)
    return list(out.values())


def experiment_name(params: Params) -> str:
    """Named after every trial's fingerprint (and the failure policy Tune stores with the experiment)."""
    fps = sorted(trial_fingerprint(trial_params(params, t["dataset"], t["K"], t["I"], t["seed"]))
                 for t in trial_grid(params))
    pack = params.sweep.pack  # packs are other Tune trials (run_pack, one per pack)
    return (f"fmvae-{'+'.join(params.sweep.data)}{f'-pack{pack}' if pack > 1 else ''}-"
            f"{provenance.fingerprint(fps, params.sweep.max_failures)}")


def pretrain_experiment_name(params: Params) -> str:
    keys = sorted(pretrain_key(p) for p in pretrain_grid(params))
    return f"fmvae-pretrain-{provenance.fingerprint(keys, params.sweep.max_failures)}"
