"""The three training phases of section 2.4 and the loop they share.

    pretrain     theta, phi under a N(0, I) prior (optionally annealed KL)
    init_prior   local step + SVI on q(xi) only, encoder fixed, after factorial k-means seeding
    joint_train  gamma (5) -> Adam on theta, phi (gamma detached) -> recompute gamma -> SVI

The loop keeps data on the device, draws batches by index, and reads numbers
back to the host only every `log_every` steps. With `compile` the differentiable
part of a step runs through torch.compile; with `cuda_graph` on a CUDA device the
whole iteration (batch gather, forward, backward, Adam, SVI) is captured once in a
CUDA graph and replayed, so a step costs one launch and no host synchronisation. It checkpoints at those moments
(never in between, so a checkpoint always follows a finiteness check) at most
every `checkpoint_every_s` seconds, and resumes from the newest good checkpoint
whose fingerprint matches.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointDir
from .clustering import factorial_kmeans
from .model import FMVAE
from .prior import robbins_monro
from .schema import ORDERS, default


@dataclass
class TrainConfig:
    """One phase's settings. Every default is the schema's (fmvae.schema: the same as params.yaml);
    config.train_config fills them from params, and the key each comes from is named beside it."""
    iters: int
    batch_size: int = default("train.batch_size")
    lr: float = default("train.lr")
    seed: int = default("seed")
    log_every: int = default("train.log_every")
    checkpoint_every_s: float = default("train.checkpoint_every_s")
    kl_anneal_iters: int = default("pretrain.kl_anneal_iters")   # pretrain: KL weight ramps 0 -> 1
    tau0: float = default("svi.tau0")                             # SVI step size (tau0 + t)^-kappa
    kappa: float = default("svi.kappa")
    init_points: int = default("prior_init.init_points")          # encodings the factorial k-means seeds from
    init_restarts: int = default("prior_init.restarts")           # its restarts (the lowest objective wins)
    init_rotate: bool = default("prior_init.rotate")              # I > 1: rotate z to its most factorial orientation
    delta: float = default("semi.delta")                          # weight of the cross-entropy term in (8)
    kl_z_weight: float = default("joint.kl_z_weight")             # initial up-weighting of KL[z] (the paper's 20) ...
    kl_z_anneal_iters: int = default("joint.kl_z_anneal_iters")   # ... annealed linearly to 1 over these iterations
    nan_policy: str = default("train.nan_policy")                 # "stop": raise on a non-finite term; "skip": drop it
    ema_decay: float = default("train.ema_decay")                 # WeightAverage's decay; 0: the last iterate
    snapshots: int = default("joint.snapshots")                   # joint: models kept at the last steps ...
    snapshot_every: int = default("joint.snapshot_every")         # ... this many iterations apart
    amp: bool = default("train.bf16")                             # bf16 autocast for the networks (prior in float32)
    order: str = default("joint.order")                           # joint step: reuse, paper or fused; see joint_step
    compile: bool = default("train.compile")                      # torch.compile the differentiable part of each step
    cuda_graph: bool = default("train.cuda_graph")                # CUDA: capture the whole iteration in a CUDA graph
    progress: bool = True


# TrainConfig field -> the params key it comes from (config.train_config and the drift test use it)
TRAIN_KEYS = {"batch_size": "train.batch_size", "lr": "train.lr", "seed": "seed", "log_every": "train.log_every",
              "checkpoint_every_s": "train.checkpoint_every_s", "kl_anneal_iters": "pretrain.kl_anneal_iters",
              "tau0": "svi.tau0", "kappa": "svi.kappa", "init_points": "prior_init.init_points",
              "init_restarts": "prior_init.restarts", "init_rotate": "prior_init.rotate", "delta": "semi.delta",
              "kl_z_weight": "joint.kl_z_weight", "kl_z_anneal_iters": "joint.kl_z_anneal_iters",
              "nan_policy": "train.nan_policy", "ema_decay": "train.ema_decay",
              "snapshots": "joint.snapshots", "snapshot_every": "joint.snapshot_every", "amp": "train.bf16", "order": "joint.order",
              "compile": "train.compile", "cuda_graph": "train.cuda_graph"}


class NumericalError(FloatingPointError):
    def __init__(self, phase: str, step: int, term: str):
        super().__init__(f"{phase}: non-finite {term} at step {step}; training stopped, "
                         "the last checkpoint is the last good state")
        self.phase, self.step, self.term = phase, step, term


@dataclass
class TrainData:
    """Training set resident on one device: x in storage dtype, labels (N, I) long, -1 = unobserved."""
    x: torch.Tensor
    to_float: Callable[[torch.Tensor], torch.Tensor]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


class Batcher:
    """Mini-batches drawn with replacement by index on the data's device, from a seeded generator."""

    def __init__(self, data: TrainData, batch_size: int, seed: int):
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator(device=data.x.device).manual_seed(seed)

    def draw(self) -> torch.Tensor:
        return torch.randint(len(self.data), (self.batch_size,), device=self.data.x.device, generator=self.generator)

    def gather(self, idx: torch.Tensor):
        labels = None if self.data.labels is None else self.data.labels[idx]
        return self.data.to_float(self.data.x[idx]), labels

    def __call__(self):
        return self.gather(self.draw())


class EagerStep:
    """One iteration as plain PyTorch calls: draw a batch, run step_fn(step, x, labels)."""

    def __init__(self, step_fn, batcher: Batcher):
        self.step_fn, self.batcher = step_fn, batcher

    def __call__(self, step: int):
        return self.step_fn(step, *self.batcher())


class GraphedStep:
    """The whole iteration captured once in a CUDA graph and replayed (CUDA only).

    The batch indices are drawn outside the graph (the batcher's generator) into a static
    buffer, and the step number is a device scalar, so the graph replays the same kernels
    on new data with no host round trip. The first `warmup` iterations run eagerly on a
    side stream (they are real training steps), as CUDA graph capture requires; the
    optimizer must be `capturable`. The prior's cached statistics are invalidated around
    the capture so that every replay recomputes them from the current q(xi).
    """

    def __init__(self, step_fn, batcher: Batcher, optimizer=None, prior=None, warmup: int = 3):
        self.step_fn, self.batcher, self.optimizer, self.prior, self.warmup = step_fn, batcher, optimizer, prior, warmup
        device = batcher.data.x.device
        self.idx = torch.zeros(batcher.batch_size, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.graph, self.out, self.calls = None, None, 0

    def _body(self):
        return self.step_fn(self.step, *self.batcher.gather(self.idx))

    def __call__(self, step: int):
        self.idx.copy_(self.batcher.draw())
        self.step.fill_(step)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)  # backward allocates grads inside the graph's pool
            if self.prior is not None:
                self.prior.invalidate_stats()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._body()
        self.graph.replay()
        return self.out

    def close(self) -> None:
        if self.prior is not None:  # the cache points at the graph's buffers; recompute outside it
            self.prior.invalidate_stats()


class WeightAverage:
    """An exponential moving average of parameters, the weights every stage after training uses.

        avg <- d_t avg + (1 - d_t) w      after each optimiser step t = 0, 1, ...
        d_t  = min(decay, (1 + t) / (10 + t))

    The last Adam iterate carries the noise of the last steps (on the default profile two iterates
    700 steps apart differed by 1.7 nats of test bound); the average does not. The warm-up d_t forgets
    the phase's starting weights quickly, so a short run is averaged over about its last t/9 steps and
    a long one over about 1 / (1 - decay). The same update as torch.optim.swa_utils.get_ema_multi_avg_fn.
    """

    def __init__(self, params, decay: float):
        self.params, self.decay, self.updates = list(params), decay, 0
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, params=None) -> None:
        """Write the average into the parameters (the model leaves its phase holding it)."""
        for p, a in zip(self.params if params is None else params, self.average):
            p.copy_(a)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)


def _average(params, cfg: TrainConfig) -> WeightAverage | None:
    return WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None


def snapshot_steps(cfg: TrainConfig) -> list[int]:
    """The joint phase's snapshot steps: the last cfg.snapshots multiples of snapshot_every counted back
    from the end (e.g. 5200, 5400, ..., 6000 of 6000), all > 0."""
    return [s for s in (cfg.iters - j * cfg.snapshot_every for j in reversed(range(cfg.snapshots))) if s > 0]


def make_runner(step_fn, batcher: Batcher, cfg: TrainConfig, optimizer=None, prior=None):
    """EagerStep, or GraphedStep where cfg.cuda_graph applies (CUDA, nan_policy "stop")."""
    if cfg.cuda_graph and batcher.data.x.is_cuda and cfg.nan_policy == "stop":
        return GraphedStep(step_fn, batcher, optimizer, prior)
    return EagerStep(step_fn, batcher)


def _loop(phase: str, model: FMVAE, step_fn, cfg: TrainConfig, batcher: Batcher, optimizer,
          ckpt: CheckpointDir | None, fingerprint: str, on_log=None, log_extras=None,
          meta: dict | None = None, average: WeightAverage | None = None,
          snapshot_at: tuple[int, ...] = ()) -> list[dict]:
    """Run step_fn(step, x, labels) -> {term: 0-d tensor} for cfg.iters steps with logging,
    checks, checkpoints and resume. log_extras(row) adds terms computed once per log interval.
    Returns the logged rows (the training curve). step is an int, or a device scalar when the
    iteration is graphed: step_fn must treat it with the helpers below (ramp). on_log(row, history)
    is called at every log step with the whole curve so far (a resumed run's includes the rows
    saved in its checkpoint, so a curve rewritten from it has neither gaps nor repeated steps).
    `average` is updated after every optimiser step and saved with the checkpoints. At each step of
    `snapshot_at` the model is saved to ckpt's snapshots twice: its last iterate, and with the
    average in place of its network weights."""
    start, history, skipped = 0, [], 0
    state = ckpt.latest() if ckpt is not None else None
    if state is not None and state.get("fingerprint") == fingerprint:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if average is not None:
            average.load_state_dict(state["average"])
        batcher.generator.set_state(state["batcher"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, history, skipped = state["step"], state["history"], state.get("skipped", 0)
        tqdm.write(f"{phase}: resuming from step {start}") if cfg.progress else None
    elif state is not None:
        tqdm.write(f"{phase}: ignoring checkpoints of different settings in {ckpt.folder}") if cfg.progress else None

    def save(step):
        if ckpt is None:
            return
        ckpt.save({"phase": phase, "fingerprint": fingerprint, "step": step, "history": history,
                   "skipped": skipped, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict() if optimizer is not None else None,
                   "average": average.state_dict() if average is not None else None,
                   "batcher": batcher.generator.get_state(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                   "config": asdict(cfg), "provenance": meta or {}}, step)

    def snapshot(step):
        if ckpt is None:
            return
        averaged = model.state_dict()
        if average is not None:  # the model's state with the averaged network weights in place
            index = {id(p): name for name, p in model.named_parameters()}
            averaged |= {index[id(p)]: a.clone() for p, a in zip(average.params, average.average)}
        ckpt.save_snapshot({"step": step, "average": averaged, "last_iterate": model.state_dict()}, step)

    kill_at = int(os.environ.get("FMVAE_KILL_AT_STEP", "-1"))  # fault injection for the crash tests
    sums, first_bad, n, names = None, None, 0, None
    last_save = time.monotonic()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc=phase, disable=not cfg.progress,
               mininterval=1.0, dynamic_ncols=True)
    t0 = time.monotonic()
    runner = make_runner(step_fn, batcher, cfg, optimizer, model.prior)
    for step in bar:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        terms = runner(step)
        if terms is None:  # a skipped batch (nan_policy == "skip")
            skipped += 1
        else:
            if names is None:
                names = list(terms)
            values = torch.stack([terms[k].float() for k in names])
            if sums is None:
                sums = torch.zeros_like(values)
                first_bad = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(values), torch.full_like(first_bad, step),
                                    first_bad)
            sums, n = sums + values, n + 1
            if average is not None:
                average.update()
        last = step + 1 == cfg.iters
        if ((step + 1) % cfg.log_every == 0 or last) and n > 0:
            bad = {name: s for name, s in zip(names, first_bad.tolist()) if s >= 0}
            if bad:  # name the earliest step's terms, the prior's validity (a cause, listed first) first
                first = min(bad.values())
                raise NumericalError(phase, first, ", ".join(t for t in names if bad.get(t) == first))
            row = {"step": step + 1, **{k: v / n for k, v in zip(names, sums.tolist())}}
            if log_extras is not None:
                log_extras(row)
            if skipped:
                row["skipped_batches"] = skipped
            history.append(row)
            bar.set_postfix({k: f"{v:.2f}" for k, v in row.items() if k in ("elbo", "loss", "kl_z", "kl_r")})
            if on_log is not None:
                on_log(row, history)
            sums, n = torch.zeros_like(sums), 0
            if step + 1 in snapshot_at:
                snapshot(step + 1)
            if not last and time.monotonic() - last_save >= cfg.checkpoint_every_s:
                save(step + 1)
                last_save = time.monotonic()
    if isinstance(runner, GraphedStep):
        runner.close()
    save(cfg.iters)
    bar.close()
    if cfg.progress and history:
        rate = (cfg.iters - start) / max(time.monotonic() - t0, 1e-9)
        summary = ", ".join(f"{k}={v:.3f}" for k, v in history[-1].items() if k != "step")
        print(f"{phase}: {cfg.iters} iterations ({rate:.1f} it/s): {summary}", flush=True)
    return history


def make_optimizer(params, lr: float, capturable: bool = False):
    """Adam, fused on CUDA; `capturable` keeps its step counter on the device (CUDA graphs)."""
    if all(p.is_cuda for p in params):
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    return torch.optim.Adam(params, lr=lr)


def _optimizer(params, cfg: TrainConfig):
    return make_optimizer(params, cfg.lr, capturable=cfg.cuda_graph and all(p.is_cuda for p in params))


def ramp(step, n: int):
    """min(1, (step + 1) / n) for an int or a device scalar step (graphed iterations)."""
    if isinstance(step, torch.Tensor):
        return ((step + 1).float() / n).clamp(max=1.0)
    return min(1.0, (step + 1) / n)


def _compiled(fn, cfg: TrainConfig):
    """fn through torch.compile (Inductor, static shapes: batches never change size) when asked."""
    return torch.compile(fn, dynamic=False) if cfg.compile else fn


def _skip_batch(cfg: TrainConfig, *tensors: torch.Tensor) -> bool:
    """nan_policy == "skip": is any of these non-finite? (A host sync, only in this opt-in mode.)"""
    return cfg.nan_policy == "skip" and not all(bool(torch.isfinite(t).all()) for t in tensors)


def _autocast(x: torch.Tensor, cfg: TrainConfig):
    # no weight-cast cache: it is incompatible with CUDA graph capture, and each weight is cast once a pass
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp, cache_enabled=False)


# ----------------------------------------------------------------- phase 1
def pretrain_step(model: FMVAE, opt, cfg: TrainConfig):
    """One step of E_q[log p(x|z)] - w_t KL[q(z|x) || N(0, I)] ascent (also the benchmark's plain VAE step)."""
    params = model.network_parameters()

    def forward(x, w):
        with _autocast(x, cfg):
            recon, kl = model.vae_bound(x)
        return -(recon - w * kl).mean(), recon, kl

    forward = _compiled(forward, cfg)

    def step_fn(step, x, _):
        w = ramp(step, cfg.kl_anneal_iters) if cfg.kl_anneal_iters else 1.0
        loss, recon, kl = forward(x, _as_weight(w, x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if _skip_batch(cfg, loss):
            opt.zero_grad(set_to_none=True)
            return None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        return {"elbo": (recon - kl).mean().detach(), "recon": recon.mean().detach(), "kl": kl.mean().detach(),
                "grad_norm": grad_norm}

    return step_fn


def pretrain(model: FMVAE, data: TrainData, cfg: TrainConfig, ckpt: CheckpointDir | None = None,
             fingerprint: str = "", on_log=None, meta: dict | None = None) -> list[dict]:
    """Fit theta, phi under a N(0, I) prior, the KL weight ramped 0 -> 1 over cfg.kl_anneal_iters.
    The model leaves with the average of its weights (WeightAverage; the last iterate if ema_decay = 0)."""
    torch.manual_seed(cfg.seed)
    opt = _optimizer(model.network_parameters(), cfg)
    average = _average(model.network_parameters(), cfg)
    history = _loop("pretrain", model, pretrain_step(model, opt, cfg), cfg, Batcher(data, cfg.batch_size, cfg.seed),
                    opt, ckpt, fingerprint, on_log, meta=meta, average=average)
    if average is not None:
        average.copy_to()
    return history


# ----------------------------------------------------------------- phase 2
@torch.no_grad()
def encode_all(model: FMVAE, data: TrainData, batch: int = 1000):
    """Encoder means and variances of the whole training set (B, I, D) each."""
    mus, vars_ = [], []
    for start in range(0, len(data), batch):
        mu, logvar = model.encode(data.to_float(data.x[start:start + batch]))
        mus.append(mu)
        vars_.append(logvar.exp())
    return torch.cat(mus), torch.cat(vars_)


def init_prior(model: FMVAE, data: TrainData, cfg: TrainConfig, ckpt: CheckpointDir | None = None,
               fingerprint: str = "", on_log=None, meta: dict | None = None) -> list[dict]:
    """Seed q(xi) by factorial k-means on encodings, then run local step + SVI with the encoder fixed.

    With I > 1 the seeding also picks the rotation of the latent space under which the
    encodings are most factorial (fmvae.clustering) and folds it into the networks
    (FMVAE.rotate_latent): pre-training's N(0, I) prior left that orientation arbitrary.
    The encoder does not change in this phase, so the training set is encoded once
    and batches are drawn from those encodings: the same updates at a fraction of the cost.
    """
    torch.manual_seed(cfg.seed)
    prior, n_total = model.prior, len(data)
    mu_all, var_all = encode_all(model, data)
    gen = torch.Generator().manual_seed(cfg.seed)  # (a resumed run then overwrites the model from its checkpoint)
    pick = torch.randperm(n_total, generator=gen)[:cfg.init_points].to(mu_all.device)
    clamp = data.labels[pick] if data.labels is not None else None
    rotate = cfg.init_rotate and model.I > 1  # with one block a rotation cannot change the k-means fit
    rotation, assignments, _ = factorial_kmeans(mu_all[pick], prior.K, gen, cfg.init_restarts, rotate, clamp=clamp)
    if rotate:
        model.rotate_latent(rotation)
        mu_all, var_all = encode_all(model, data)
    prior.init_from_assignments(mu_all[pick], var_all[pick], assignments, n_total)
    encoded = TrainData(torch.cat((mu_all, var_all), dim=-1), lambda t: t, data.labels)

    def step_fn(step, enc, labels):
        mu, var = enc.chunk(2, dim=-1)
        st = prior.local_step(mu, var, labels)
        prior.svi_step(mu, var, st.gamma, n_total, robbins_monro(prior.svi_steps, cfg.tau0, cfg.kappa))
        kl_z = prior.kl_z(var.log(), st).sum(-1).mean()
        kl_r = prior.kl_r(st).sum(-1).mean()
        return {"kl_z": kl_z, "kl_r": kl_r, "natural_params": _validity(prior)}

    return _loop("prior_init", model, step_fn, cfg, Batcher(encoded, cfg.batch_size, cfg.seed), None, ckpt,
                 fingerprint, on_log, meta=meta)


def _validity(prior) -> torch.Tensor:
    """0 when every s, a, b, c is positive and finite, NaN otherwise (so the loop's check names it).
    Checked after every SVI step; its statistics are cached for the next local step."""
    return torch.where(prior.is_valid(), 0.0, float("nan"))


# ----------------------------------------------------------------- phase 3
def kl_z_weight(step, cfg: TrainConfig):
    """The paper's KL[z] up-weighting, annealed linearly to 1; step an int or a device scalar."""
    if not cfg.kl_z_anneal_iters:
        return cfg.kl_z_weight
    if isinstance(step, torch.Tensor):
        return 1.0 + (cfg.kl_z_weight - 1.0) * (1.0 - step.float() / cfg.kl_z_anneal_iters).clamp(min=0.0)
    return 1.0 + (cfg.kl_z_weight - 1.0) * max(0.0, 1.0 - step / cfg.kl_z_anneal_iters)


def _as_weight(w, x: torch.Tensor):
    """A loss weight for `forward`. A graphed step passes a device scalar already. Otherwise on CPU
    it becomes a tensor, so a compiled step sees a changing value as data, not as a constant to
    recompile for; on CUDA it stays a float (a host tensor there would cost a copy per step)."""
    if isinstance(w, torch.Tensor) or x.is_cuda:
        return w
    return torch.tensor(float(w))


def joint_step(model: FMVAE, opt, cfg: TrainConfig, n_total: int, params):
    """One joint iteration (2.4), in one of three orders of the same block-coordinate ascent.

    "paper":  gamma (5) under q_t -> Adam on theta, phi (gamma detached) -> re-encode the batch
              under the new phi, recompute gamma -> SVI step on q(xi).
    "reuse":  as "paper", but the SVI step reuses the Adam pass's encodings and gamma (the batch
              encoded under phi before its Adam step): the same Adam step as "paper", exactly,
              one encoder pass fewer. The default.
    "fused":  encode -> gamma -> SVI step on q(xi) -> gamma under the new q(xi) -> Adam. Biased:
              each point is scored against a q(xi) that already holds it with weight rho N / |B|,
              which pulls the prior towards the batch and shrinks KL[z]'s gradient. Kept only to
              reproduce the comparison in the README.
    The Adam step includes the cross-entropy (8) and, for gradient factors, their prior
    parameters. The differentiable part (encode, bound, loss) is `forward`, which
    cfg.compile sends through torch.compile; q(xi)'s statistics enter it as inputs.
    """
    prior = model.prior
    rho = lambda: robbins_monro(prior.svi_steps, cfg.tau0, cfg.kappa)

    def loss_terms(x, mu, logvar, labels, stats, w):
        with _autocast(x, cfg):
            terms = model.bound_from_encodings(x, mu, logvar, labels, stats=stats)
        kl_z, kl_r = terms.kl_z.sum(-1), terms.kl_r.sum(-1)
        loss = -(terms.recon - w * kl_z - kl_r).mean() + cfg.delta * terms.ce.mean()
        return loss, terms.recon, kl_z, kl_r, terms.ce, terms.step.gamma

    def encode_and_loss(x, labels, stats, w):
        with _autocast(x, cfg):
            mu, logvar = model.encode(x)
        return (mu, logvar) + loss_terms(x, mu, logvar, labels, stats, w)

    forward = _compiled(encode_and_loss if cfg.order != "fused" else loss_terms, cfg)

    def adam(loss):
        """The theta, phi (and gradient factors') step; returns the gradient's max norm, None if skipped."""
        if prior.has_gradient_factors:  # (4d)-(4e) only have gradients for the gradient factors
            loss = loss + prior.global_kl() / n_total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if _skip_batch(cfg, loss):
            opt.zero_grad(set_to_none=True)
            return None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        return grad_norm

    def report(recon, kl_z, kl_r, ce, grad_norm):
        return {"bound": (recon - kl_z - kl_r).mean().detach(), "recon": recon.mean().detach(),
                "kl_z": kl_z.mean().detach(), "kl_r": kl_r.mean().detach(), "ce": ce.mean().detach(),
                "grad_norm": grad_norm}

    def svi(mu, var, gamma):
        with torch.no_grad():
            prior.svi_step(mu.detach(), var.detach(), gamma, n_total, rho())

    def paper(step, x, labels):
        stats = prior.stats()  # lambda changes only in the SVI step, after its last use
        _, _, loss, recon, kl_z, kl_r, ce, _ = forward(x, labels, stats, _as_weight(kl_z_weight(step, cfg), x))
        grad_norm = adam(loss)
        if grad_norm is None:
            return None
        with torch.no_grad(), _autocast(x, cfg):
            mu, logvar = model.encode(x)
            var = logvar.exp()
            st = prior.local_step(mu, var, labels, None if prior.has_gradient_factors else stats)
        svi(mu, var, st.gamma)
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm)

    def reuse(step, x, labels):
        stats = prior.stats()
        mu, logvar, loss, recon, kl_z, kl_r, ce, gamma = forward(x, labels, stats,
                                                                 _as_weight(kl_z_weight(step, cfg), x))
        grad_norm = adam(loss)
        if grad_norm is None:
            return None
        # gamma of an SVI factor depends only on that factor's q, which the Adam step left alone
        svi(mu, logvar.exp(), gamma)
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm)

    def fused(step, x, labels):
        with _autocast(x, cfg):
            mu, logvar = model.encode(x)
        var = logvar.exp()
        if _skip_batch(cfg, mu, var):
            return None  # the SVI step comes first here: never let a bad batch reach q(xi)
        with torch.no_grad():
            svi(mu, var, prior.local_step(mu.detach(), var.detach(), labels).gamma)
        stats = prior.stats()
        loss, recon, kl_z, kl_r, ce, _ = forward(x, mu, logvar, labels, stats, _as_weight(kl_z_weight(step, cfg), x))
        grad_norm = adam(loss)
        if grad_norm is None:
            return None
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm)

    if cfg.order not in ORDERS:
        raise ValueError(f"joint.order: {cfg.order!r}, choose one of {', '.join(ORDERS)}")
    return {"paper": paper, "reuse": reuse, "fused": fused}[cfg.order]


def joint_train(model: FMVAE, data: TrainData, cfg: TrainConfig, ckpt: CheckpointDir | None = None,
                fingerprint: str = "", on_log=None, gradient_factors=(), meta: dict | None = None) -> list[dict]:
    """Joint optimisation of theta, phi and q(xi) (2.4), with the semi-supervised term (8).

    With delta > 0 the `gradient_factors` (those with labels) leave SVI and move by
    Adam on log-mean parameters, as section 2.5 prescribes. The logged `elbo` is the
    training bound per point: `bound` (4a)-(4c) minus the global terms (4d)-(4e) / N. The networks
    leave with the average of their weights (WeightAverage), q(xi) as SVI left it (its Robbins-Monro
    steps average already); the snapshots of the last steps go to ckpt (CheckpointDir.snapshots).
    """
    torch.manual_seed(cfg.seed)
    prior, n_total = model.prior, len(data)
    if cfg.delta > 0 and gradient_factors:
        prior.use_gradient_factors(gradient_factors)
    params = model.network_parameters() + (prior.gradient_parameters() if prior.has_gradient_factors else [])
    opt = _optimizer(params, cfg)

    def log_extras(row):
        with torch.no_grad():
            row["global_kl"] = prior.global_kl().item() / n_total
        row["elbo"] = row["bound"] - row["global_kl"]

    average = _average(model.network_parameters(), cfg)
    history = _loop("joint", model, joint_step(model, opt, cfg, n_total, params), cfg,
                    Batcher(data, cfg.batch_size, cfg.seed), opt, ckpt, fingerprint, on_log, log_extras=log_extras,
                    meta=meta, average=average, snapshot_at=tuple(snapshot_steps(cfg)))
    if average is not None:
        average.copy_to()
    prior.sync_gradient_factors()
    return history
