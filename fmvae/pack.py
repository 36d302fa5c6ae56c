"""Packed trials: several models of one network shape trained as one, along a leading member axis.

A pack holds M FMVAEs that share arch, x_shape, I, D and channels and differ in K (and seed). Their
network weights are stacked (torch.func.stack_module_state), each member's prior is padded to the
pack's largest K with its own mask (a padded component has E[log pi] = -inf, so it never takes
responsibility, SVI leaves it at the hyperprior, and every bound term ignores it), and the model's
own methods run per member under torch.func.vmap + functional_call. PackedModel offers the FMVAE
interface the training steps use (encode, vae_bound, bound_from_encodings, prior.stats / svi_step /
svi_steps, network_parameters, state_dict), so fmvae.train's step functions train a pack unchanged:
their losses are per-member means summed over members, so each member's gradient, Adam step
(elementwise), weight average and SVI step are its own.

Each member keeps its own random stream for the reparameterisation noise, seeded as a trial
alone seeds the global one, so a member draws exactly the noise it would draw alone.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from .checkpoint import CheckpointDir, load_checked
from .distributions import normal_gamma as ng
from .model import BoundTerms, FMVAE
from .prior import LocalStep, PriorStats
from .step import Batcher, NumericalError, TrainData, WeightAverage, make_optimizer, run_loop
from .params import TrainConfig
from .train import joint_step, pretrain_step, snapshot_steps


class _Call(torch.nn.Module):
    """functional_call's entry point: forward(method, *args) runs model.method(*args)."""

    def __init__(self, model: FMVAE):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        target = self.model
        for name in method.split("."):  # e.g. "prior.svi_step"
            target = getattr(target, name)
        return target(*args, **kwargs)


class PackedPrior:
    """The members' priors as one: each method runs the member's own prior under vmap."""

    def __init__(self, pack: "PackedModel"):
        self.pack, self._key, self._stats = pack, None, None

    has_gradient_factors = False

    @property
    def svi_steps(self) -> Tensor:
        return self.pack.buffers["model.prior.svi_steps"]

    def stats(self, dtype=torch.float32) -> PriorStats:
        """Every member's statistics, cached until q(xi) changes in place (the SVI step's writes
        through vmap bump the stacked buffers' version counters), as FactorialMixturePrior.stats
        caches its own: the joint step's validity check and the next step's local step share them."""
        lam, c = self.pack.buffers["model.prior.lam"], self.pack.buffers["model.prior.c"]
        key = (lam._version, c._version, dtype)
        if self._key != key:
            self._stats = PriorStats(*self.pack.call("prior.stats", dtype=dtype, cache=False))
            self._key = key
        return self._stats

    def is_valid(self) -> Tensor:
        return self.stats().valid

    def svi_step(self, mu, var, gamma, n_total, rho) -> None:
        self.pack.call("prior.svi_step", mu, var, gamma, n_total, rho)

    def invalidate_stats(self) -> None:
        """Forget the cached statistics (a CUDA graph writes q(xi) behind the version counters)."""
        self._key = None

    def global_kl(self) -> Tensor:
        return self.pack.call("prior.global_kl")


# where each prior state tensor keeps its component axis (padding and cutting a member's state)
_K_AXIS = {"mask": 1, "lam": 2, "c": 1, "grad_m": 1, "grad_log_sab": 2, "grad_log_c": 1}


class PackedModel:
    """M FMVAEs of one network shape as one model with a leading member axis on every tensor.

    The steps see the FMVAE interface (fmvae.train): encode, vae_bound, bound_from_encodings,
    prior, network_parameters; the loop sees state_dict / load_state_dict / named_parameters, and
    `generators` (each member's noise stream, registered with a CUDA graph). `members` tells the steps
    to report every term per member."""

    def __init__(self, models: Sequence[FMVAE], seeds: Sequence[int]):
        first = models[0]
        shape = lambda m: (m.arch, m.x_shape, m.I, m.D, m.channels, m.prior.hyper)
        if any(shape(m) != shape(first) for m in models):
            raise ValueError("a pack's members must share arch, x_shape, I, D, channels and hyperprior")
        if any(m.prior.has_gradient_factors for m in models):
            raise ValueError("a pack trains unsupervised models: no gradient factors (semi.delta = 0)")
        self.models, self.members = list(models), len(models)
        self.k_max = max(max(m.K) for m in models)
        self.I, self.D = first.I, first.D
        self.template = _Call(FMVAE(first.arch, first.x_shape, [self.k_max] * first.I, first.D, first.prior.hyper,
                                    first.channels).to("meta"))
        nets = [torch.nn.ModuleDict({"encoder": m.encoder, "decoder": m.decoder}) for m in models]
        params, _ = stack_module_state(nets)  # leaves with requires_grad, stacked in network_parameters' order
        self.params = {"model." + k: v for k, v in params.items()}
        priors = [self._padded(m.prior.state_dict(), m) for m in models]
        self.buffers = {"model.prior." + k: torch.stack([p[k] for p in priors]) for k in priors[0]}
        device = first.prior.lam.device
        self.generators = tuple(torch.Generator(device=device).manual_seed(int(s)) for s in seeds)
        self.prior = PackedPrior(self)

    def _padded(self, state: dict, model: FMVAE) -> dict:
        """A member's prior state with every factor padded to k_max components: the hyperprior's
        natural parameters and c0 on the padding, mask False there."""
        h, pad = model.prior.hyper, self.k_max - state["mask"].shape[1]
        if pad == 0:
            return {k: v.detach().clone() for k, v in state.items()}
        dev, f64, shape = state["lam"].device, torch.float64, (self.I, pad, self.D)
        fill = {"lam": ng.natural_from_mean(*(torch.full(shape, v, dtype=f64, device=dev)
                                              for v in (h.m0, h.s0, h.a0, h.b0))),
                "c": torch.full((self.I, pad), h.c0, dtype=f64, device=dev),
                "mask": torch.zeros(self.I, pad, dtype=torch.bool, device=dev),
                "grad_m": torch.zeros(shape, dtype=f64, device=dev),
                "grad_log_sab": torch.zeros((3,) + shape, dtype=f64, device=dev),
                "grad_log_c": torch.zeros(self.I, pad, dtype=f64, device=dev)}
        return {k: torch.cat((v.detach(), fill[k]), _K_AXIS[k]) if k in _K_AXIS else v.detach().clone()
                for k, v in state.items()}

    # ------------------------------------------------------------ per member, vmapped
    def call(self, method: str, *args, **kwargs):
        """model.<method>(*args) for every member at once: tensor args carry the member axis first."""
        def one(params, buffers, *a):
            out = functional_call(self.template, (params, buffers), (method,) + a, kwargs)
            return () if out is None else tuple(out) if isinstance(out, tuple) else out  # (): in-place methods
        in_dims = (0, 0) + tuple(0 if isinstance(a, Tensor) else None for a in args)  # ints, floats: shared
        return vmap(one, in_dims=in_dims, randomness="error")(self.params, self.buffers, *args)

    def noise(self, batch: int, samples: int = 1) -> Tensor:
        """(M, samples, B, I*D) standard normal draws, each member's from its own stream: the draws
        torch.randn_like makes in a trial alone after torch.manual_seed(its seed)."""
        dev = self.buffers["model.prior.lam"].device
        return torch.stack([torch.randn((samples, batch, self.I * self.D), generator=g, device=dev)
                            for g in self.generators])

    # ------------------------------------------------------------ the FMVAE interface of the steps
    def network_parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def encode(self, x: Tensor):
        return self.call("encode", x)

    def vae_bound(self, x: Tensor):
        return self.call("vae_bound", x, self.noise(x.shape[1]))

    def bound_from_encodings(self, x, mu, logvar, labels=None, samples: int = 1, stats=None) -> BoundTerms:
        if labels is not None:
            raise ValueError("a pack trains unsupervised models (no labels)")
        stats = self.prior.stats() if stats is None else stats

        def one(params, buffers, x, mu, logvar, stats, noise):
            t = functional_call(self.template, (params, buffers),
                                ("bound_from_encodings", x, mu, logvar, None, samples, PriorStats(*stats), noise))
            return t.recon, t.kl_z, t.kl_r, t.ce, tuple(t.step), t.mu, t.var
        out = vmap(one, randomness="error")(self.params, self.buffers, x, mu, logvar, tuple(stats),
                                           self.noise(x.shape[1], samples))
        recon, kl_z, kl_r, ce, step, mu, var = out
        return BoundTerms(recon, kl_z, kl_r, ce, LocalStep(*step), mu, var)

    # ------------------------------------------------------------ state, for the loop's checkpoints
    def named_parameters(self):
        return iter(self.params.items())

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in (self.params | self.buffers).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k, v in (self.params | self.buffers).items():
            v.copy_(state[k])

    def member_state(self, state: dict, m: int) -> dict:
        """Member m's FMVAE state_dict (its own K) from a pack state_dict."""
        k = self.models[m].prior.mask.shape[1]
        out = {}
        for name, v in state.items():
            short = name[len("model."):]
            leaf = short.split(".")[-1]
            v = v[m]
            if short.startswith("prior.") and leaf in _K_AXIS:
                v = v.narrow(_K_AXIS[leaf], 0, k)
            out[short] = v.clone()
        return out

    def stacked_state(self, states: Sequence[dict]) -> dict:
        """The pack state_dict from its members' FMVAE state_dicts (the inverse of member_state)."""
        priors = [self._padded({k[6:]: v for k, v in s.items() if k.startswith("prior.")}, m)
                  for s, m in zip(states, self.models)]
        out = {}
        for name in self.params | self.buffers:
            short = name[len("model."):]
            parts = [p[short[6:]] for p in priors] if short.startswith("prior.") else [s[short] for s in states]
            out[name] = torch.stack(parts)
        return out

    @torch.no_grad()
    def write_members(self) -> list[FMVAE]:
        """Write each member's state (the averaged weights after a phase) back into its FMVAE."""
        state = self.state_dict()
        for m, model in enumerate(self.models):
            model.load_state_dict(self.member_state(state, m))
        return self.models


class PackBatcher:
    """Each member's batches from its own seeded generator and its own data set (the batches it draws
    alone; members of different seeds may hold different splits of one data set), stacked: x (M, B, ...).
    `generator` gathers every stream the pack draws from, for the loop's checkpoints: the members'
    batch and noise generators. `data` is the first member's (the loop reads its device)."""

    def __init__(self, datas: Sequence[TrainData], batch_size: int, seeds: Sequence[int], pack: PackedModel):
        if any(d.labels is not None for d in datas):
            raise ValueError("a pack trains unsupervised models (no labels)")
        self.datas, self.data, self.batch_size = list(datas), datas[0], batch_size
        self.batchers = [Batcher(d, batch_size, s) for d, s in zip(datas, seeds)]
        self.generator = _Streams([b.generator for b in self.batchers], list(pack.generators))

    def draw(self) -> Tensor:
        return torch.stack([b.draw() for b in self.batchers])

    def gather(self, idx: Tensor):
        if all(d is self.data for d in self.datas):  # one data set: one gather
            return self.data.to_float(self.data.x[idx]), None
        return torch.stack([d.to_float(d.x[i]) for d, i in zip(self.datas, idx)]), None

    def __call__(self):
        return self.gather(self.draw())


class _Streams:
    """get_state / set_state over the members' (batch, noise) generators."""

    def __init__(self, batches, noises):
        self.pairs = list(zip(batches, noises))

    def get_state(self):
        return [(b.get_state(), n.get_state()) for b, n in self.pairs]

    def set_state(self, states) -> None:
        for (b, n), (sb, sn) in zip(self.pairs, states):
            b.set_state(sb)
            n.set_state(sn)


def _member_row(row: dict, m: int) -> dict:
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
                "history": [_member_row(r, m) for r in state["history"]], "skipped": state["skipped"],
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


def _per_member(step_fn, members: int):
    """The steps' terms, each (M,), as scalars named "<term>/<member>": the loop checks, averages and
    logs each on its own, and a non-finite one names its member."""
    def flat(step, x, labels):
        terms = step_fn(step, x, labels)
        return None if terms is None else {f"{k}/{m}": v[m] for k, v in terms.items() for m in range(members)}
    return flat


def _check_configs(cfgs: Sequence[TrainConfig]) -> TrainConfig:
    base = dataclasses.replace(cfgs[0], seed=0)
    for cfg in cfgs[1:]:
        if dataclasses.replace(cfg, seed=0) != base:
            raise ValueError("a pack's members share every training setting but the seed")
    if base.nan_policy != "stop":
        raise ValueError('a pack runs with train.nan_policy "stop" (a skipped batch would be every member\'s)')
    if base.order != "reuse":
        raise ValueError('a pack runs the default joint order, "reuse"')
    return cfgs[0]


class PackTooLarge(ValueError):
    """A pack the device's memory cannot hold, refused before it trains."""


MEMORY_MARGIN = 0.8  # of the free memory a pack may plan on: the allocator's fragmentation, a CUDA graph's pool


def _peak_step_bytes(phase: str, model: FMVAE, data: TrainData, cfg: TrainConfig, members: int) -> int:
    """Peak device bytes, beyond what is allocated already, of building a pack of `members` copies of
    `model` (weights, Adam's moments, the weight average) and running one eager step of `phase` on it
    (on a CPU the step runs and 0 is returned: the CPU tests run the probe the GPU relies on)."""
    device = data.x.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    probe = PackedModel([model] * members, list(range(members)))  # stacks copies: the model is left as it is
    params = probe.network_parameters()
    opt = make_optimizer(params, cfg.lr)
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    eager = dataclasses.replace(cfg, cuda_graph=False, compile=False)
    step_fn = (pretrain_step(probe, opt, eager) if phase == "pretrain" else
               joint_step(probe, opt, eager, len(data), params))
    step_fn(0, *PackBatcher([data] * members, cfg.batch_size, list(range(members)), probe)())
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del probe, params, opt, average, step_fn
    torch.cuda.empty_cache()
    return peak


def largest_pack(one: int, two: int, free: int) -> int:
    """The most members that fit in MEMORY_MARGIN of `free` bytes, from the peak bytes of a pack of
    one and of two (a pack's memory is affine in its members: weights, moments and activations
    scale with them, the data set and the CUDA context do not)."""
    per_member = max(two - one, 1)
    return max(int((MEMORY_MARGIN * free - (one - per_member)) // per_member), 0)


def _measured(phase: str, models: Sequence[FMVAE], datas: Sequence[TrainData], cfg: TrainConfig):
    """(peak bytes of a pack of one, of two, free bytes) on a GPU; None on a CPU, where nothing is
    checked: host memory holds far larger packs than pay there (docs/gpu.md)."""
    device = datas[0].x.device
    if device.type != "cuda":
        return None
    one, two = (_peak_step_bytes(phase, models[0], datas[0], cfg, n) for n in (1, 2))
    free, _ = torch.cuda.mem_get_info(device)
    return one, two, free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_memory(phase: str, models: Sequence[FMVAE], datas: Sequence[TrainData], cfg: TrainConfig) -> None:
    """Refuse, before any training, a pack that would not fit the GPU's free memory (and the
    allocator's cache), naming the largest that would: measured by one step of a pack of one and of
    two copies of the first member."""
    measured = _measured(phase, models, datas, cfg) if len(models) > 1 else None
    if measured is None:
        return
    one, two, free = measured
    largest = largest_pack(one, two, free)
    if len(models) > largest:
        need = one + (len(models) - 1) * (two - one)
        raise PackTooLarge(f"a pack of {len(models)} {phase} members needs about {need / 2**30:.1f} GiB on "
                           f"{datas[0].x.device}, {free / 2**30:.1f} GiB free: the largest pack that fits is "
                           f"{largest} (set sweep.pack)")


def train_pack(phase: str, models: Sequence[FMVAE], data: TrainData | Sequence[TrainData],
               cfgs: Sequence[TrainConfig], folders: Sequence, fingerprints: Sequence[str], on_logs=None,
               metas=None) -> list:
    """Pre-train ("pretrain") or jointly train ("joint") `models` as one pack, each with its own
    TrainConfig (the same but for the seed), training set (one for all, or one each, of one size),
    checkpoint folder and fingerprint. Returns, per member,
    its training curve as the trial alone logs it, or the NumericalError that stopped it: a member
    whose terms turn non-finite stops alone (its checkpoints keep its last good state) and the others
    go on from their own newest checkpoints. The models leave with their (averaged) weights.
    A pack the GPU's memory cannot hold is refused first (PackTooLarge, naming the largest that fits)."""
    _check_configs(cfgs)
    M = len(models)
    datas = [data] * M if isinstance(data, TrainData) else list(data)
    if len({len(d) for d in datas}) != 1:
        raise ValueError("a pack's members train on data sets of one size (the SVI steps scale by it)")
    check_memory(phase, models, datas, cfgs[0])
    on_logs = list(on_logs) if on_logs is not None else [None] * M
    metas = list(metas) if metas is not None else [{}] * M
    results: list = [None] * M
    alive = list(range(M))
    while alive:
        try:
            pick = lambda items: [items[m] for m in alive]
            histories = _train_once(phase, pick(models), pick(datas), pick(cfgs), pick(folders), pick(fingerprints),
                                    pick(on_logs), pick(metas))
        except NumericalError as err:
            named = {int(term.rsplit("/", 1)[1]) for term in err.term.split(", ")}
            for j in named:
                m = alive[j]
                results[m] = NumericalError(phase, err.step, ", ".join(t.rsplit("/", 1)[0] for t in
                                                                       err.term.split(", ") if t.endswith(f"/{j}")))
            alive = [m for j, m in enumerate(alive) if j not in named]
            continue
        for m, history in zip(alive, histories):
            results[m] = history
        break
    return results


def _train_once(phase, models, datas, cfgs, folders, fingerprints, on_logs, metas) -> list[list[dict]]:
    cfg, M = cfgs[0], len(models)
    seeds = [c.seed for c in cfgs]
    pack = PackedModel(models, seeds)
    params = pack.network_parameters()
    opt = make_optimizer(params, cfg.lr, capturable=cfg.cuda_graph and all(p.is_cuda for p in params))
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    n_total = len(datas[0])
    if phase == "pretrain":
        step_fn, log_extras, snapshot_at = pretrain_step(pack, opt, cfg), None, ()
    elif phase == "joint":
        step_fn, snapshot_at = joint_step(pack, opt, cfg, n_total, params), tuple(snapshot_steps(cfg))

        def log_extras(row):  # as joint_train's, per member
            with torch.no_grad():
                global_kl = (pack.prior.global_kl() / n_total).tolist()
            for m, g in enumerate(global_kl):
                row[f"global_kl/{m}"] = g
                row[f"elbo/{m}"] = row[f"bound/{m}"] - g
    else:
        raise ValueError(f"a pack trains the pretrain or joint phase, not {phase!r}")

    def on_log(row, history):
        for m, callback in enumerate(on_logs):
            if callback is not None:
                callback(_member_row(row, m), [_member_row(r, m) for r in history])

    ckpt = PackCheckpoints(pack, [CheckpointDir(f) for f in folders], fingerprints, phase,
                           [dataclasses.asdict(c) for c in cfgs], metas)
    history = run_loop(phase, pack, _per_member(step_fn, M), cfg, PackBatcher(datas, cfg.batch_size, seeds, pack), opt,
                       ckpt, ckpt.fingerprint, on_log, log_extras=log_extras, average=average,
                       snapshot_at=snapshot_at)
    if average is not None:
        average.copy_to()
    pack.write_members()
    return [[_member_row(r, m) for r in history] for m in range(M)]
