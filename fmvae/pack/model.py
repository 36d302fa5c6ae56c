"""The pack as one model: M FMVAEs' weights stacked and their priors padded to the largest K, each member's
methods run under torch.func.vmap; and its batches, each member drawing from its own random stream."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from fmvae.core.distributions import normal_gamma as ng
from fmvae.core.loop import Batcher, TrainData
from fmvae.core.model import BoundTerms, FMVAE
from fmvae.core.prior import LocalStep, PriorStats


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
    def I(self) -> int:
        return self.pack.I  # the members share it (PackedModel refuses others)

    @property
    def K(self) -> list[int]:
        """Per factor, the padded width every member's arrays have here (the largest K of any member)."""
        return [self.pack.k_max] * self.pack.I

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

    The steps see the FMVAE interface (fmvae.core.phases): encode, vae_bound, bound_from_encodings,
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
