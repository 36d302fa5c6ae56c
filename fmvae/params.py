"""Every setting, declared once: params.yaml's sections as frozen dataclasses, loaded and checked at the edge.

Each key is one field below: its type (the annotation), its default (the default profile: binarised
MNIST on a 2-core CPU, which params.yaml states verbatim), its check and what the check means. `load_params`
reads params.yaml (and DVC's -S overrides, which DVC writes into it), reports every unknown key (with the
closest valid ones), wrong type or out-of-range value by name before any work starts, and returns a
`Params`; functions receive the section they use (`params.joint.iters`). Where params are stored or hashed
(fingerprints, provenance, checkpoints, Ray Tune's param space) they become plain dicts (`to_dict`), equal
to what params.yaml's validated contents were before this module typed them, so fingerprints stay put.

A training phase's settings (TrainConfig) are the fields of the sections it reads, generated from these
declarations: a key is declared here and nowhere else. This module needs nothing that trains, so that
a stage reading params (the download, a table script) depends on no training source.
"""
import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmvae.data import DATASETS, OMNIGLOT_SPLITS, Dataset

ORDERS = ("reuse", "paper", "fused")  # the joint step's orders (fmvae.core.phases.joint_step)


class ParamError(ValueError):
    pass


def setting(default, check=None, meaning: str = ""):
    """One key: its default, its check (None: any value of the type) and what the check means."""
    meta = {"check": check, "meaning": meaning}
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls):
    return field(default_factory=cls, metadata={"section": True})


_pos = lambda v: v > 0
_nonneg = lambda v: v >= 0
_unit = lambda v: 0 <= v <= 1
_ints = lambda low: (lambda v: v != [] and all(isinstance(k, int) and not isinstance(k, bool) and k >= low for k in v))


@dataclass(frozen=True)
class Data:
    name: str = setting("binarized_mnist", lambda v: v in DATASETS, "one of " + ", ".join(DATASETS))
    mirror: str = setting("")
    raw_dir: str = setting("data/raw")
    omniglot_split: str = setting("characters", lambda v: v in OMNIGLOT_SPLITS,
                                  "characters (15 + 5 drawings of each character, the paper's) or alphabets")
    partial: bool = setting(False, None, "true or false (true: load the images present when some listed ones are absent)")


@dataclass(frozen=True)
class Model:
    I: int = setting(1, _pos, ">= 1")
    K: int | list = setting(16, lambda v: v != [] and (_ints(1)([v]) if isinstance(v, int) else _ints(1)(v)),
                            "an int >= 1 or a list of them, one per factor")
    D: int = setting(32, _pos, ">= 1")
    arch: str = setting("auto", lambda v: v in ("auto", "conv28", "conv64", "mlp"), "auto, conv28, conv64 or mlp")
    channels: list = setting([], lambda v: len(v) <= 6 and (v == [] or _ints(1)(v)),
                             "[] (the architecture's own) or up to 6 ints >= 1: conv64's widths, one stride-2 layer each")

    @property
    def Ks(self) -> list[int]:
        """Components per factor, one entry per factor."""
        return [self.K] * self.I if isinstance(self.K, int) else list(self.K)


@dataclass(frozen=True)
class Train:
    batch_size: int = setting(64, _pos, ">= 1")
    lr: float = setting(1e-3, _pos, "> 0")
    log_every: int = setting(100, _pos, ">= 1")
    checkpoint_every_s: float = setting(120.0, _nonneg, ">= 0")
    ema_decay: float = setting(0.999, lambda v: 0 <= v < 1, "in [0, 1) (0: no averaging; stages use the last iterate)")
    nan_policy: str = setting("stop", lambda v: v in ("stop", "skip"), "stop or skip")
    bf16: bool = setting(False, None, "true or false")
    compile: bool = setting(False, None, "true or false (torch.compile the differentiable part of each step)")
    cuda_graph: bool = setting(True, None, "true or false (on CUDA: replay each iteration from a CUDA graph)")
    hflip: bool = setting(False, None, "true or false (true: pre-training and the joint phase draw each face or its "
                          "left-right mirror, a departure from the paper; CelebA only)")


@dataclass(frozen=True)
class Pretrain:
    iters: int = setting(5000, _nonneg, ">= 0")
    kl_anneal_iters: int = setting(1000, _nonneg, ">= 0")


@dataclass(frozen=True)
class PriorInit:
    iters: int = setting(1000, _nonneg, ">= 0")
    init_points: int = setting(10000, _pos, ">= 1")
    restarts: int = setting(8, _pos, ">= 1")
    rotate: bool = setting(True, None, "true or false")


@dataclass(frozen=True)
class Svi:
    tau0: float = setting(10.0, _nonneg, ">= 0")
    kappa: float = setting(0.7, lambda v: 0.5 < v <= 1, "in (0.5, 1]")


@dataclass(frozen=True)
class Joint:
    iters: int = setting(6000, _nonneg, ">= 0")
    kl_z_weight: float = setting(1.0, _pos, "> 0")
    kl_z_anneal_iters: int = setting(0, _nonneg, ">= 0")
    lr_decay: float = setting(0.5, lambda v: 0 <= v <= 1, "in [0, 1] (the last fraction of the joint phase over "
                              "which Adam's step size falls linearly to 0; 0: constant)")
    order: str = setting("reuse", lambda v: v in ORDERS, "one of " + ", ".join(ORDERS))
    snapshots: int = setting(5, _nonneg, ">= 0 (models kept at the last steps, for the spread of the test bound)")
    snapshot_every: int = setting(200, _pos, ">= 1 (iterations between those snapshots)")
    revive: float = setting(0.0, lambda v: 0 <= v < 0.5, "in [0, 0.5): a departure from the paper (fmvae.core.prior."
                            "FactorialMixturePrior.revive): over the first half of the phase, components of SVI "
                            "factors holding less than this share of the data are re-seeded; 0: off")
    usage_weight: float = setting(0.0, _nonneg, ">= 0: a departure from the paper (fmvae.core.levers.usage_entropy): "
                                  "the weight of the reward for the spread of each unlabelled factor's components "
                                  "over the batch; 1 cancels the bound's charge for it; 0: off")


@dataclass(frozen=True)
class Semi:
    delta: float = setting(0.0, _nonneg, ">= 0")
    fraction: float = setting(0.0, _unit, "in [0, 1]")
    delta_until: float = setting(1.0, lambda v: 0 < v <= 1, "in (0, 1]: the fraction of the joint phase Delta applies; "
                                 "after it Delta = 0 and the labelled factors return to SVI (section 2.5); 1: throughout")
    average_factors: bool = setting(False, None, "true or false (the labelled factors' gradient-trained prior "
                                    "parameters averaged like the networks' weights, train.ema_decay)")
    swap_weight: float = setting(0.0, _nonneg, ">= 0: weight of the swap-consistency term (fmvae.core.levers, a departure "
                                 "from the paper); 0: off")
    adversary_weight: float = setting(0.0, _nonneg, ">= 0: weight of the encoder's term that makes the adversary's "
                                      "predictions of a named property from the other blocks uniform (fmvae.core.levers, a "
                                      "departure from the paper); 0: off")
    balance: list = setting([], lambda v: v == [] or (_ints(0)(v) and len(set(v)) == len(v)),
                            "a list of distinct named factors (K = 2) whose labelled classes each batch draws equally "
                            "often (fmvae.core.loop.balanced_weights, a departure from the paper); []: uniform draws")


@dataclass(frozen=True)
class Evaluate:
    recon_samples: int = setting(1, _pos, ">= 1")
    iw_samples: int = setting(100, _nonneg, ">= 0 (0 skips the IWAE estimate)")
    iw_points: int = setting(500, _pos, ">= 1")


@dataclass(frozen=True)
class Properties:
    judge_iters: int = setting(500, _pos, ">= 1")
    samples: int = setting(1000, _pos, ">= 1")


@dataclass(frozen=True)
class Plot:
    factors: list = setting([0, 0], lambda v: len(v) == 2 and _ints(0)(v), "two factor indices")
    max_components: int = setting(10, _pos, ">= 1")
    samples_per_cell: int = setting(100, _pos, ">= 1 (each grid cell averages this many conditional samples)")


_iters = lambda: setting(None, lambda v: v is None or v >= 0, "null or >= 0")


@dataclass(frozen=True)
class SweepIters:
    """A sweep's iteration counts; null: the pipeline's own (pretrain/prior_init/joint.iters)."""
    pretrain: int | None = _iters()
    prior_init: int | None = _iters()
    joint: int | None = _iters()


@dataclass(frozen=True)
class Sweep:
    data: list = setting(["binarized_mnist", "omniglot"],
                         lambda v: v != [] and len(set(v)) == len(v) and all(d in DATASETS for d in v),
                         "a non-empty list of distinct data sets from " + ", ".join(DATASETS))
    K: list = setting([2, 4, 8, 16, 32, 64, 128, 256, 512], _ints(1), "a non-empty list of ints >= 1")
    seeds: list = setting([0, 1, 2], _ints(0), "a non-empty list of ints >= 0")
    I: list = setting([1], _ints(1), "a non-empty list of ints >= 1")
    cpus_per_trial: float = setting(2.0, _pos, "> 0")
    gpus_per_trial: float = setting(0.25, _unit, "in [0, 1] (a fraction lets trials share a GPU)")
    pack: int = setting(1, _pos, ">= 1 (the most trials of one data set and I trained as one vectorised model, "
                        "fmvae.pack; 1: each trial alone, the CPU's best)")
    max_failures: int = setting(1, _nonneg, ">= 0 (retries of a trial that raises)")
    iters: SweepIters = section(SweepIters)


@dataclass(frozen=True)
class Params:
    seed: int = setting(0, _nonneg, ">= 0")
    device: str = setting("auto", lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda"), "auto, cpu or cuda[:n]")
    data: Data = section(Data)
    model: Model = section(Model)
    train: Train = section(Train)
    pretrain: Pretrain = section(Pretrain)
    prior_init: PriorInit = section(PriorInit)
    svi: Svi = section(Svi)
    joint: Joint = section(Joint)
    semi: Semi = section(Semi)
    evaluate: Evaluate = section(Evaluate)
    properties: Properties = section(Properties)
    plot: Plot = section(Plot)
    sweep: Sweep = section(Sweep)

    def to_dict(self) -> dict:
        """Plain nested dict of plain values: what is stored and hashed."""
        return dataclasses.asdict(self)

    def override(self, flat: dict) -> "Params":
        """These params with some keys ("joint.iters": 10, ...) changed, validated again."""
        return validate(unflatten(flatten(self.to_dict()) | flat))


@dataclass(frozen=True)
class Setting:
    """A declared key, as the validation and the tests read it."""
    default: object
    types: tuple
    check: typing.Callable | None
    meaning: str


def _types(annotation) -> tuple:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return tuple(typing.get_origin(a) or a for a in args)


def _declared(cls, prefix: str = "") -> dict[str, Setting]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            out |= _declared(f.default_factory, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[prefix + f.name] = Setting(default, _types(f.type), f.metadata["check"], f.metadata["meaning"])
    return out


SCHEMA: dict[str, Setting] = _declared(Params)  # "joint.iters" -> its declaration, in params.yaml's order


def default(key: str):
    return copy.deepcopy(SCHEMA[key].default)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def as_written(raw: dict) -> dict:
    """A stored params.yaml flat, its values as written (an int stays an int), with the keys it lacks (added
    since it was written) at their defaults: what two runs' params are compared on."""
    return {k: s.default for k, s in SCHEMA.items()} | flatten(raw or {})


def _build(cls, values: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            kwargs[f.name] = _build(f.default_factory, values.get(f.name, {}))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def validate(params: dict | None) -> Params:
    """Defaults filled in, every key and value checked; returns the typed params."""
    flat = flatten(params or {})
    errors = []
    for key in flat:
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(sorted(SCHEMA))}"
            errors.append(f"{key}: unknown parameter; {hint}")
    full = {k: default(k) for k in SCHEMA}
    for key, value in flat.items():
        if key not in SCHEMA:
            continue
        s = SCHEMA[key]
        if s.types == (float,) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in s.types) or not isinstance(value, s.types):  # bool is an int: refuse it
            errors.append(f"{key}: expected {' or '.join(t.__name__ for t in s.types)}, got {value!r}")
            continue
        if s.check is not None and not s.check(value):
            errors.append(f"{key}: {value!r} is invalid, must be {s.meaning}")
            continue
        full[key] = value
    if not errors:
        errors = _cross_checks(full, flat)
    if errors:
        raise ParamError("invalid params:\n  " + "\n  ".join(errors))
    return _build(Params, unflatten(full))


def _cross_checks(full: dict, given: dict) -> list[str]:
    """Errors of keys that are each valid but do not go together."""
    errors = []
    k = full["model.K"]
    if isinstance(k, list) and len(k) != full["model.I"]:
        errors.append(f"model.K: a list needs one entry per factor (model.I = {full['model.I']}), got {len(k)}")
    if full["model.channels"] and full["model.arch"] not in ("conv64", "auto"):
        errors.append(f"model.channels: set for model.arch {full['model.arch']!r}; only conv64 takes widths")
    if full["model.channels"] and full["model.arch"] == "auto" and full["data.name"] != "celeba":
        errors.append(f"model.channels: set for {full['data.name']!r}; only CelebA's conv64 takes widths")
    if max(full["plot.factors"]) >= full["model.I"]:
        errors.append(f"plot.factors: {full['plot.factors']} names a factor >= model.I = {full['model.I']}")
    labelled = full["semi.delta"] > 0 and full["semi.fraction"] > 0
    for key in ("semi.delta_until", "semi.average_factors", "semi.swap_weight", "semi.adversary_weight"):
        if key in given and given[key] != SCHEMA[key].default and not labelled:
            errors.append(f"{key}: acts on the labelled factors trained by gradient (section 2.5); "
                          "it needs semi.delta > 0 and semi.fraction > 0")
    if full["semi.adversary_weight"] > 0 and full["model.I"] < 2:
        errors.append("semi.adversary_weight: the adversary reads the blocks other than the named ones; "
                      "it needs model.I >= 2")
    levers = full["semi.swap_weight"] > 0 or full["semi.adversary_weight"] > 0
    if levers and full["sweep.pack"] > 1:
        errors.append("semi.swap_weight / semi.adversary_weight: trials packed into one vectorised model "
                      "(sweep.pack > 1) do not run them; set sweep.pack: 1")
    if full["joint.revive"] > 0 and full["sweep.pack"] > 1:
        errors.append("joint.revive: trials packed into one vectorised model (sweep.pack > 1) do not run it; "
                      "set sweep.pack: 1")
    if full["joint.usage_weight"] > 0 and full["sweep.pack"] > 1:
        errors.append("joint.usage_weight: trials packed into one vectorised model (sweep.pack > 1) do not run it; "
                      "set sweep.pack: 1")
    if full["joint.usage_weight"] > 0 and max(k if isinstance(k, list) else [k]) < 2:
        errors.append("joint.usage_weight: rewards the spread of a factor's components; every factor has K = 1")
    if full["semi.balance"]:
        if full["semi.fraction"] == 0:
            errors.append("semi.balance: balances the labelled points' classes; it needs semi.fraction > 0")
        ks = k if isinstance(k, list) else [k] * full["model.I"]
        for p in full["semi.balance"]:
            if p >= len(ks) or ks[p] != 2:
                errors.append(f"semi.balance: factor {p} " + ("is not a factor of the model" if p >= len(ks) else
                              f"has K = {ks[p]}; balanced batches act on named properties of two classes (K = 2)"))
        if full["sweep.pack"] > 1:
            errors.append("semi.balance: trials packed into one vectorised model (sweep.pack > 1) draw uniform "
                          "batches; set sweep.pack: 1")
    if full["train.hflip"] and full["data.name"] != "celeba":
        errors.append(f"train.hflip: mirrors faces, whose labelled properties a mirror keeps; {full['data.name']!r} "
                      "is not CelebA (a mirrored digit or character is another shape)")
    if full["train.hflip"] and full["sweep.pack"] > 1:
        errors.append("train.hflip: trials packed into one vectorised model (sweep.pack > 1) draw unmirrored "
                      "batches; set sweep.pack: 1")
    if full["semi.average_factors"] and full["train.ema_decay"] == 0:
        errors.append("semi.average_factors: averages with train.ema_decay, which is 0 (no averaging)")
    if full["data.name"] == "synthetic" and full["semi.fraction"] > 0 and full["model.I"] < 2:
        errors.append("model.I: the synthetic data set has 2 labelled properties; semi-supervision needs I >= 2")
    return errors


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None,
                sweep_file: str | Path | None = None) -> Params:
    """params.yaml validated; `sweep_file`'s `sweep:` section, when given, replaces params.yaml's
    (a sweep's own params, e.g. sweep/params.yaml, leave the default grid in params.yaml as it is)."""
    path = Path(path)
    if not path.exists():
        raise ParamError(f"{path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if sweep_file is not None:
        sweep_file = Path(sweep_file)
        if not sweep_file.exists():
            raise ParamError(f"{sweep_file} not found")
        own = yaml.safe_load(sweep_file.read_text()) or {}
        if set(own) != {"sweep"}:
            raise ParamError(f"{sweep_file}: holds only a `sweep:` section, got {', '.join(map(str, own)) or 'nothing'}")
        raw["sweep"] = own["sweep"]
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(raw)


def check_against_data(params: Params, ds: Dataset) -> None:
    """Errors that need the data: labels outside a factor's K, more properties than factors, balanced
    batches of factors without labels, a usage term without an unlabelled factor of K > 1."""
    if params.semi.fraction > 0 and ds.y_train is not None:
        ks = params.model.Ks
        if len(ds.property_K) > len(ks):
            raise ParamError(f"model.I: {len(ds.property_K)} labelled properties ({', '.join(ds.property_names)}) "
                             f"need at least as many factors, got I = {len(ks)}")
        for p, (name, kp) in enumerate(zip(ds.property_names, ds.property_K)):
            if kp > ks[p]:
                raise ParamError(f"model.K: property {name!r} has {kp} values but factor {p} has K = {ks[p]}")
    if params.joint.usage_weight > 0:
        named = len(ds.property_K) if params.semi.delta > 0 and params.semi.fraction > 0 and ds.y_train is not None else 0
        if all(k < 2 for k in params.model.Ks[named:]):
            raise ParamError(f"joint.usage_weight: rewards the spread of the unlabelled factors' components; factors "
                             f"{named}.. of K = {list(params.model.Ks)} ({named} named by {ds.name}'s labels) have "
                             "none with K > 1")
    if params.semi.balance:
        if ds.y_train is None:
            raise ParamError(f"semi.balance: balances labelled classes; {ds.name} has no labels")
        unnamed = [p for p in params.semi.balance if p >= len(ds.property_names)]
        if unnamed:
            raise ParamError(f"semi.balance: factor(s) {unnamed} carry no labelled property; {ds.name} names "
                             f"{len(ds.property_names)} ({', '.join(ds.property_names)})")


# ----------------------------------------------------------------- a training phase's settings

# the sections a training phase reads: every phase the shared ones, and its own; another phase's keys
# keep their defaults (so a change to the joint phase's settings re-keys no pre-training checkpoint)
SHARED_SECTIONS = ("train", "svi")
PHASE_SECTIONS = {"pretrain": ("pretrain",), "prior_init": ("prior_init",), "joint": ("joint", "semi")}
_PHASE_KEYS = [k for k in SCHEMA if k == "seed" or (k.split(".")[0] in SHARED_SECTIONS + sum(PHASE_SECTIONS.values(), ())
                                                    and not k.endswith(".iters"))]

_default_field = lambda d: field(default_factory=lambda: list(d)) if isinstance(d, list) else field(default=d)
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [("iters", int)] + [(k.split(".")[-1], SCHEMA[k].types[0], _default_field(SCHEMA[k].default))
                       for k in _PHASE_KEYS]
    + [("progress", bool, field(default=True))],
    namespace={"__doc__": "One phase's settings: `iters`, then the leaf of every key of seed, "
                          + ", ".join(SHARED_SECTIONS + sum(PHASE_SECTIONS.values(), ())) + " (pretrain.kl_anneal_iters "
                          "-> kl_anneal_iters, train.lr -> lr, ...; see fmvae.params), and `progress` (a tqdm bar)."})
TrainConfig.__module__ = __name__  # where pickle and reprs find it


def train_config(params: Params, phase: str) -> TrainConfig:
    """The TrainConfig of one phase: its sections' keys from params, iterations from <phase>.iters."""
    flat = flatten(params.to_dict())
    fields = {k.split(".")[-1]: flat[k] for k in _PHASE_KEYS
              if k == "seed" or k.split(".")[0] in SHARED_SECTIONS + PHASE_SECTIONS[phase]}
    return TrainConfig(iters=getattr(params, phase).iters, **fields)
