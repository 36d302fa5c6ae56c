"""How one training iteration runs, and the loop every phase shares (fmvae.core.phases says what each
phase trains).

The loop keeps data on the device, draws batches by index, and reads numbers back to the host only
every `log_every` steps. With `compile` the differentiable part of a step runs through
torch.compile; with `cuda_graph` on a CUDA device the whole iteration (batch gather, forward,
backward, Adam, SVI) is captured once in a CUDA graph and replayed, so a step costs one launch and
no host synchronisation. It checkpoints at those moments (never in between, so a checkpoint always
follows a finiteness check) at most every `checkpoint_every_s` seconds, and resumes from the newest
good checkpoint whose fingerprint matches.

A step function `step_fn(step, x, labels) -> {term: 0-d tensor}` is one phase's iteration; `step`
is an int, or a device scalar when the iteration is graphed, so schedules go through `ramp`-like
helpers that accept both.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from fmvae.io import CheckpointDir

if TYPE_CHECKING:
    from fmvae.core.model import FMVAE
    from fmvae.params import TrainConfig

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
    """Mini-batches drawn with replacement by index on the data's device, from a seeded generator:
    uniformly, or in proportion to `weights` (N,) when given (balanced_weights).

    `hflip` (images (N, C, H, W) only): each draw is an image or its left-right mirror, equally often,
    as if the training set held both (index j + N is image j mirrored). The choice rides on the index,
    so a CUDA graph replays it from the static index buffer and a checkpoint of the generator resumes it."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, weights: torch.Tensor | None = None,
                 hflip: bool = False):
        if hflip and data.x.dim() != 4:
            raise ValueError(f"hflip mirrors images (N, C, H, W); the data are {tuple(data.x.shape)}")
        self.data, self.batch_size, self.hflip = data, batch_size, hflip
        self.generator = torch.Generator(device=data.x.device).manual_seed(seed)
        self.weights = None if weights is None else weights.to(device=data.x.device, dtype=torch.float)
        if hflip and self.weights is not None:  # a mirror weighs what its image does
            self.weights = self.weights.repeat(2)

    def draw(self) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        n = len(self.data) * (2 if self.hflip else 1)
        return torch.randint(n, (self.batch_size,), device=self.data.x.device, generator=self.generator)

    def gather(self, idx: torch.Tensor):
        if self.hflip:
            mirrored = (idx >= len(self.data)).view(-1, 1, 1, 1)
            idx = idx % len(self.data)
            x = self.data.x[idx]
            x = torch.where(mirrored, x.flip(-1), x)
        else:
            x = self.data.x[idx]
        labels = None if self.data.labels is None else self.data.labels[idx]
        return self.data.to_float(x), labels

    def __call__(self):
        return self.gather(self.draw())


def balanced_weights(labels: torch.Tensor, factors) -> torch.Tensor:
    """Sampling weights (N,) under which the labelled points' classes of each factor in `factors` are
    drawn equally often, and labelled points as a whole as often as under uniform draws.

    A labelled point of class c of factor p weighs n_p / (K_p n_pc) (n_p labelled points, n_pc of class c,
    K_p classes), a product over the factors; unlabelled points weigh 1. With one factor its classes come
    out exactly balanced; with several (labelled on the same points) each is balanced to the extent the
    properties are independent. Rare properties (6.5% of the mirror's 20,000 CelebA faces wear glasses:
    1.7 labelled wearers in a batch of 64 at 40% labels) then reach the labelled terms as often as common ones.
    """
    weights = torch.ones(labels.shape[0], dtype=torch.double)
    labelled = torch.zeros(labels.shape[0], dtype=torch.bool)
    for p in factors:
        seen = labels[:, p] >= 0
        counts = torch.bincount(labels[seen, p])
        present = counts > 0
        if int(present.sum()) < 2:
            raise ValueError(f"semi.balance: factor {p} has labelled points of {int(present.sum())} class(es); "
                             "balancing needs both")
        weights[seen] *= seen.sum().double() / (int(present.sum()) * counts[labels[seen, p]].double())
        labelled |= seen
    if labelled.any():  # the labelled points keep their share of the draws
        weights[labelled] *= labelled.sum().double() / weights[labelled].sum()
    return weights.float()


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

    def __init__(self, step_fn, batcher: Batcher, optimizer=None, prior=None, warmup: int = 3, generators=()):
        self.step_fn, self.batcher, self.optimizer, self.prior, self.warmup = step_fn, batcher, optimizer, prior, warmup
        self.generators = tuple(generators)  # CUDA generators the step draws from besides the default one
        self.idx = None  # the batch indices' static buffer, shaped by the first draw (a pack's: (members, B))
        self.step = torch.zeros((), dtype=torch.long, device=batcher.data.x.device)
        self.graph, self.out, self.calls = None, None, 0

    def _body(self):
        return self.step_fn(self.step, *self.batcher.gather(self.idx))

    def __call__(self, step: int):
        idx = self.batcher.draw()
        if self.idx is None:
            self.idx = torch.empty_like(idx)
        self.idx.copy_(idx)
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
            for generator in self.generators:  # so that each replay advances their streams, as eager steps do
                self.graph.register_generator_state(generator)
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



def make_runner(step_fn, batcher: Batcher, cfg: TrainConfig, optimizer=None, prior=None, generators=()):
    """EagerStep, or GraphedStep where cfg.cuda_graph applies (CUDA, nan_policy "stop")."""
    if cfg.cuda_graph and batcher.data.x.is_cuda and cfg.nan_policy == "stop":
        return GraphedStep(step_fn, batcher, optimizer, prior, generators=generators)
    return EagerStep(step_fn, batcher)


def run_loop(phase: str, model: FMVAE, step_fn, cfg: TrainConfig, batcher: Batcher, optimizer,
          ckpt: CheckpointDir | None, fingerprint: str, on_log=None, log_extras=None,
          meta: dict | None = None, average: WeightAverage | None = None,
          snapshot_at: tuple[int, ...] = (), aux: torch.nn.Module | None = None) -> list[dict]:
    """Run step_fn(step, x, labels) -> {term: 0-d tensor} for cfg.iters steps with logging,
    checks, checkpoints and resume. log_extras(row) adds terms computed once per log interval.
    Returns the logged rows (the training curve). step is an int, or a device scalar when the
    iteration is graphed: step_fn must treat it with the helpers below (ramp). on_log(row, history)
    is called at every log step with the whole curve so far (a resumed run's includes the rows
    saved in its checkpoint, so a curve rewritten from it has neither gaps nor repeated steps).
    `average` is updated after every optimiser step and saved with the checkpoints. At each step of
    `snapshot_at` the model is saved to ckpt's snapshots twice: its last iterate, and with the
    average in place of its network weights. `aux`: a module trained beside the model but not part of it
    (fmvae.core.levers.Adversary): its state is checkpointed and resumed, never in the model or its snapshots."""
    start, history, skipped = 0, [], 0
    state = ckpt.latest() if ckpt is not None else None
    if state is not None and state.get("fingerprint") == fingerprint:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if average is not None:
            average.load_state_dict(state["average"])
        if aux is not None:
            aux.load_state_dict(state["aux"])
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
                   "aux": aux.state_dict() if aux is not None else None,
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
    runner = make_runner(step_fn, batcher, cfg, optimizer, model.prior, getattr(model, "generators", ()))
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
    """Adam, fused on CUDA; `capturable` keeps its step counter and its step size on the device
    (CUDA graphs: a schedule then writes the step size from inside the graph, see set_lr)."""
    if all(p.is_cuda for p in params):
        if capturable:
            lr = torch.tensor(lr, device=params[0].device)
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    return torch.optim.Adam(params, lr=lr)


def gradient_norm(params, members: int = 0) -> torch.Tensor:
    """The gradient's Euclidean norm over all parameters (clip_grad_norm_ with max_norm = inf, which
    clips nothing); per member, shape (members,), when every parameter is stacked along a leading
    member axis (fmvae.pack), computed the same way: the norm of the per-tensor norms."""
    if not members:
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))
    norms = [torch.linalg.vector_norm(p.grad.reshape(members, -1), dim=1) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def set_lr(optimizer, lr) -> None:
    """Set the step size, a float or a device scalar (graphed steps), of every parameter group."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a CUDA graph replays the fill with each step's value
        else:
            group["lr"] = float(lr)


def ramp(step, n: int):
    """min(1, (step + 1) / n) for an int or a device scalar step (graphed iterations)."""
    if isinstance(step, torch.Tensor):
        return ((step + 1).float() / n).clamp(max=1.0)
    return min(1.0, (step + 1) / n)


def compiled(fn, cfg: TrainConfig):
    """fn through torch.compile (Inductor, static shapes: batches never change size) when asked."""
    return torch.compile(fn, dynamic=False) if cfg.compile else fn


def skip_batch(cfg: TrainConfig, *tensors: torch.Tensor) -> bool:
    """nan_policy == "skip": is any of these non-finite? (A host sync, only in this opt-in mode.)"""
    return cfg.nan_policy == "skip" and not all(bool(torch.isfinite(t).all()) for t in tensors)


def autocast(x: torch.Tensor, cfg: TrainConfig):
    # no weight-cast cache: it is incompatible with CUDA graph capture, and each weight is cast once a pass
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16, cache_enabled=False)


def as_weight(w, x: torch.Tensor):
    """A loss weight for `forward`. A graphed step passes a device scalar already. Otherwise on CPU
    it becomes a tensor, so a compiled step sees a changing value as data, not as a constant to
    recompile for; on CUDA it stays a float (a host tensor there would cost a copy per step)."""
    if isinstance(w, torch.Tensor) or x.is_cuda:
        return w
    return torch.tensor(float(w))
