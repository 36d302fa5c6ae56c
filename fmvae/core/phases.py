"""What each of the three training phases of section 2.4 trains (fmvae.core.loop runs the iterations).

    pretrain     theta, phi under a N(0, I) prior (optionally annealed KL)
    init_prior   local step + SVI on q(xi) only, encoder fixed, after factorial k-means seeding
    joint_train  gamma (5) -> Adam on theta, phi (gamma detached) -> recompute gamma -> SVI
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from fmvae.core.clustering import factorial_kmeans
from fmvae.core.levers import Adversary, swap_consistency, usage_entropy
from fmvae.core.model import FMVAE
from fmvae.core.prior import robbins_monro
from fmvae.io import CheckpointDir
from fmvae.params import ORDERS, PHASE_SECTIONS, TrainConfig
from fmvae.core.loop import (Batcher, TrainData, WeightAverage, as_weight, autocast, balanced_weights, compiled,
                   gradient_norm, make_optimizer, ramp, run_loop, set_lr, skip_batch)

log = logging.getLogger(__name__)
# joint.revive looks for dead components every this many steps: often enough to catch one within a few
# hundred steps of its emptying, rarely enough that the extra encoder pass costs under 1% of the phase
REVIVE_EVERY = 100


def _average(params, cfg: TrainConfig) -> WeightAverage | None:
    return WeightAverage(params, cfg.ema_decay) if cfg.ema_decay > 0 else None


def snapshot_steps(cfg: TrainConfig) -> list[int]:
    """The joint phase's snapshot steps: the last cfg.snapshots multiples of snapshot_every counted back
    from the end (e.g. 5200, 5400, ..., 6000 of 6000), all > 0."""
    return [s for s in (cfg.iters - j * cfg.snapshot_every for j in reversed(range(cfg.snapshots))) if s > 0]


def optimizer(params, cfg: TrainConfig):
    return make_optimizer(params, cfg.lr, capturable=cfg.cuda_graph and all(p.is_cuda for p in params))


def backward(opt, loss, cfg: TrainConfig, params, members: int):
    """The gradients of `loss` and their norm, or None and no gradients where `loss` is non-finite and
    train.nan_policy skips the batch."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if skip_batch(cfg, loss):
        opt.zero_grad(set_to_none=True)
        return None
    return gradient_norm(params, members)


# ----------------------------------------------------------------- phase 1
def pretrain_step(model: FMVAE, opt, cfg: TrainConfig):
    """One step of E_q[log p(x|z)] - w_t KL[q(z|x) || N(0, I)] ascent (also the benchmark's plain VAE step)."""
    params = model.network_parameters()
    members = getattr(model, "members", 0)  # a pack of trials (fmvae.pack): terms per member

    def forward(x, w):
        with autocast(x, cfg):
            recon, kl = model.vae_bound(x)
        return -(recon - w * kl).mean(-1).sum(), recon, kl  # sum over a pack's members (fmvae.pack)

    forward = compiled(forward, cfg)

    def step_fn(step, x, _):
        w = ramp(step, cfg.kl_anneal_iters) if cfg.kl_anneal_iters else 1.0
        loss, recon, kl = forward(x, as_weight(w, x))
        grad_norm = backward(opt, loss, cfg, params, members)
        if grad_norm is None:
            return None
        opt.step()
        return {"elbo": (recon - kl).mean(-1).detach(), "recon": recon.mean(-1).detach(), "kl": kl.mean(-1).detach(),
                "grad_norm": grad_norm}

    return step_fn


def pretrain(model: FMVAE, data: TrainData, cfg: TrainConfig, ckpt: CheckpointDir | None = None,
             fingerprint: str = "", on_log=None, meta: dict | None = None) -> list[dict]:
    """Fit theta, phi under a N(0, I) prior, the KL weight ramped 0 -> 1 over cfg.kl_anneal_iters.
    The model leaves with the average of its weights (WeightAverage; the last iterate if ema_decay = 0)."""
    torch.manual_seed(cfg.seed)
    opt = optimizer(model.network_parameters(), cfg)
    average = _average(model.network_parameters(), cfg)
    history = run_loop("pretrain", model, pretrain_step(model, opt, cfg), cfg,
                       Batcher(data, cfg.batch_size, cfg.seed, hflip=cfg.hflip), opt, ckpt, fingerprint, on_log,
                       meta=meta, average=average)
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
    encodings are most factorial (fmvae.core.clustering) and folds it into the networks
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
    rotate = cfg.rotate and model.I > 1  # with one block a rotation cannot change the k-means fit
    rotation, assignments, _ = factorial_kmeans(mu_all[pick], prior.K, gen, cfg.restarts, rotate, clamp=clamp)
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

    return run_loop("prior_init", model, step_fn, cfg, Batcher(encoded, cfg.batch_size, cfg.seed), None, ckpt,
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


def lr_factor(step, cfg: TrainConfig):
    """Adam's step size over cfg.lr in the joint phase: 1, then linearly down to 1 / n at the last step
    over the last n = lr_decay * iters steps (so the iterates settle where the average is read);
    step an int or a device scalar."""
    n = round(cfg.lr_decay * cfg.iters)
    if n == 0:
        return 1.0
    if isinstance(step, torch.Tensor):
        return ((cfg.iters - step).float() / n).clamp(max=1.0)
    return min(1.0, (cfg.iters - step) / n)


def joint_step(model: FMVAE, opt, cfg: TrainConfig, n_total: int, params, named=(), adversary=None):
    """One joint iteration (2.4), in one of three orders of the same block-coordinate ascent.

    "paper":  gamma (5) under q_t -> Adam on theta, phi (gamma detached) -> re-encode the batch
              under the new phi, recompute gamma -> SVI step on q(xi).
    "reuse":  as "paper", but the SVI step reuses the Adam pass's encodings and gamma (the batch
              encoded under phi before its Adam step): the same Adam step as "paper", exactly,
              one encoder pass fewer. The default.
    "fused":  encode -> gamma -> SVI step on q(xi) -> gamma under the new q(xi) -> Adam. Biased:
              each point is scored against a q(xi) that already holds it with weight rho N / |B|,
              which pulls the prior towards the batch and shrinks KL[z]'s gradient. Kept only to
              reproduce the comparison in docs/implementation.md.
    The Adam step includes the cross-entropy (8) and, for gradient factors, their prior
    parameters; with cfg.swap_weight / cfg.adversary_weight > 0 also the terms of fmvae.core.levers
    on the `named` factors (the adversary's classifiers, `adversary`, are in `params`), with
    cfg.usage_weight > 0 its usage term on the other factors with K > 1. The differentiable part (encode, bound, loss) is `forward`, which
    cfg.compile sends through torch.compile; q(xi)'s statistics enter it as inputs.
    """
    prior = model.prior
    members = getattr(model, "members", 0)  # a pack of trials (fmvae.pack): terms per member
    rho = lambda: robbins_monro(prior.svi_steps, cfg.tau0, cfg.kappa)
    # semi.delta_until: Delta weights the cross-entropy over the first steps only (section 2.5 allows it
    # switched off once the factors have separated); a constant otherwise, so that a graphed step needs no
    # comparison of its device step
    switch = round(cfg.delta_until * cfg.iters)
    delta_at = (lambda step: cfg.delta) if cfg.delta_until >= 1 else (lambda step: cfg.delta if step < switch else 0.0)

    levers = cfg.swap_weight > 0 or cfg.adversary_weight > 0
    if levers and (members or not named):
        raise ValueError("semi.swap_weight and semi.adversary_weight act on named factors of one model: they "
                         "need labels (semi.delta > 0, semi.fraction > 0) and no pack (sweep.pack = 1)")
    if cfg.revive > 0 and members:
        raise ValueError("joint.revive: trials packed into one vectorised model (sweep.pack > 1) do not run it")
    if cfg.adversary_weight > 0 and adversary is None:
        raise ValueError("semi.adversary_weight > 0: joint_step needs the adversary's classifiers")
    free = [i for i in range(prior.I) if i not in named and prior.K[i] > 1]  # joint.usage_weight's factors
    if cfg.usage_weight > 0 and (members or not free):
        raise ValueError("joint.usage_weight rewards the spread of the free factors' components: it needs a factor "
                         "trained by SVI with K > 1 (unlabelled) and no pack (sweep.pack = 1)")

    def lever_terms(mu, logvar, stats, gamma):
        """fmvae.core.levers' terms (loss, logged values); nothing, and no random draw, when both are off."""
        loss, logged = 0.0, {}
        if cfg.swap_weight > 0:
            logged["swap_ce"] = swap_consistency(model, mu, logvar, named, stats)
            loss = loss + cfg.swap_weight * logged["swap_ce"]
        if cfg.adversary_weight > 0:
            extra, logged["adversary_ce"] = adversary(mu, gamma, cfg.adversary_weight)
            loss = loss + extra
        return loss, logged

    def loss_terms(x, mu, logvar, labels, stats, w, delta):
        with autocast(x, cfg):
            terms = model.bound_from_encodings(x, mu, logvar, labels, stats=stats)
        kl_z, kl_r = terms.kl_z.sum(-1), terms.kl_r.sum(-1)
        # per point means over the batch, summed over a pack's members (one member: the mean)
        loss = -(terms.recon - w * kl_z - kl_r).mean(-1).sum() + delta * terms.ce.mean(-1).sum()
        logged = {}
        if levers:
            with autocast(x, cfg):
                extra, logged = lever_terms(mu, logvar, stats, terms.step.gamma)
            loss = loss + extra
        if cfg.usage_weight > 0:  # fmvae.core.levers.usage_entropy; no random draw
            logged["usage_entropy"] = usage_entropy(terms.step.logits, free, prior.K)
            loss = loss - cfg.usage_weight * logged["usage_entropy"]
        return loss, terms.recon, kl_z, kl_r, terms.ce, terms.step.gamma, logged

    def encode_and_loss(x, labels, stats, w, delta):
        with autocast(x, cfg):
            mu, logvar = model.encode(x)
        return (mu, logvar) + loss_terms(x, mu, logvar, labels, stats, w, delta)

    forward = compiled(encode_and_loss if cfg.order != "fused" else loss_terms, cfg)

    def adam(loss, step):
        """The theta, phi (and gradient factors') step; returns the gradient's max norm, None if skipped."""
        if prior.has_gradient_factors:  # (4d)-(4e) only have gradients for the gradient factors
            loss = loss + prior.global_kl() / n_total
        grad_norm = backward(opt, loss, cfg, params, members)
        if grad_norm is None:
            return None
        if cfg.lr_decay > 0:
            set_lr(opt, cfg.lr * lr_factor(step, cfg))
        opt.step()
        return grad_norm

    def report(recon, kl_z, kl_r, ce, grad_norm, logged):
        return {"bound": (recon - kl_z - kl_r).mean(-1).detach(), "recon": recon.mean(-1).detach(),
                "kl_z": kl_z.mean(-1).detach(), "kl_r": kl_r.mean(-1).detach(), "ce": ce.mean(-1).detach(),
                "grad_norm": grad_norm} | {k: v.detach() for k, v in logged.items()}

    def svi(mu, var, gamma):
        with torch.no_grad():
            prior.svi_step(mu.detach(), var.detach(), gamma, n_total, rho())

    def paper(step, x, labels):
        stats = prior.stats()  # lambda changes only in the SVI step, after its last use
        _, _, loss, recon, kl_z, kl_r, ce, _, logged = forward(x, labels, stats,
                                                               as_weight(kl_z_weight(step, cfg), x), delta_at(step))
        grad_norm = adam(loss, step)
        if grad_norm is None:
            return None
        with torch.no_grad(), autocast(x, cfg):
            mu, logvar = model.encode(x)
            var = logvar.exp()
            st = prior.local_step(mu, var, labels, None if prior.has_gradient_factors else stats)
        svi(mu, var, st.gamma)
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm, logged)

    def reuse(step, x, labels):
        stats = prior.stats()
        mu, logvar, loss, recon, kl_z, kl_r, ce, gamma, logged = forward(
            x, labels, stats, as_weight(kl_z_weight(step, cfg), x), delta_at(step))
        grad_norm = adam(loss, step)
        if grad_norm is None:
            return None
        # gamma of an SVI factor depends only on that factor's q, which the Adam step left alone
        svi(mu, logvar.exp(), gamma)
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm, logged)

    def fused(step, x, labels):
        with autocast(x, cfg):
            mu, logvar = model.encode(x)
        var = logvar.exp()
        if skip_batch(cfg, mu, var):
            return None  # the SVI step comes first here: never let a bad batch reach q(xi)
        with torch.no_grad():
            svi(mu, var, prior.local_step(mu.detach(), var.detach(), labels).gamma)
        stats = prior.stats()
        loss, recon, kl_z, kl_r, ce, _, logged = forward(x, mu, logvar, labels, stats,
                                                         as_weight(kl_z_weight(step, cfg), x), delta_at(step))
        grad_norm = adam(loss, step)
        if grad_norm is None:
            return None
        return {"natural_params": _validity(prior)} | report(recon, kl_z, kl_r, ce, grad_norm, logged)

    if cfg.order not in ORDERS:
        raise ValueError(f"joint.order: {cfg.order!r}, choose one of {', '.join(ORDERS)}")
    plain = {"paper": paper, "reuse": reuse, "fused": fused}[cfg.order]

    def releasing(step, x, labels):
        """At the switch (a host-side change of what the step trains: joint_train runs it eagerly) the
        labelled factors' current values are written into q(xi) and SVI takes them over."""
        if step == switch and prior.has_gradient_factors:
            prior.sync_gradient_factors()
            prior.use_gradient_factors([])
        return plain(step, x, labels)

    inner = releasing if cfg.delta_until < 1 else plain

    def reviving(step, x, labels):
        """joint.revive: after every REVIVE_EVERY-th step of the phase's first half (Adam's step size is
        still constant under the default joint.lr_decay), SVI factors' components that q(pi) credits with
        less than that share of the data are re-seeded on the batch (FactorialMixturePrior.revive); an
        encoder pass without gradient, no random draw, eager (joint_train)."""
        out = inner(step, x, labels)
        revived = torch.zeros((), device=x.device)
        if out is not None and (step + 1) % REVIVE_EVERY == 0 and step + 1 <= cfg.iters // 2:
            with torch.no_grad(), autocast(x, cfg):
                mu, logvar = model.encode(x)
                ell = prior.local_step(mu, logvar.exp()).ell
            counts = prior.revive(mu.float(), ell.float(), cfg.revive, n_total)
            if counts.any():
                log.info("joint step %d: re-seeded components per factor %s", step + 1, counts.tolist())
            revived = counts.sum().to(revived.dtype)
        return None if out is None else out | {"revived": revived}

    return reviving if cfg.revive > 0 else inner


def joint_train(model: FMVAE, data: TrainData, cfg: TrainConfig, ckpt: CheckpointDir | None = None,
                fingerprint: str = "", on_log=None, gradient_factors=(), meta: dict | None = None) -> list[dict]:
    """Joint optimisation of theta, phi and q(xi) (2.4), with the semi-supervised term (8).

    With delta > 0 the `gradient_factors` (those with labels) leave SVI and move by
    Adam on log-mean parameters, as section 2.5 prescribes. The logged `elbo` is the
    training bound per point: `bound` (4a)-(4c) minus the global terms (4d)-(4e) / N. The networks
    leave with the average of their weights (WeightAverage), q(xi) as SVI left it (its Robbins-Monro
    steps average already); the snapshots of the last steps go to ckpt (CheckpointDir.snapshots).
    cfg.delta_until < 1: from that fraction of the phase on, Delta = 0 and the labelled factors return
    to SVI from their values then; cfg.average_factors: their gradient-trained parameters leave with
    their average too (else with their last iterate). cfg.swap_weight, cfg.adversary_weight: fmvae.core.levers.
    cfg.balance: named binary factors whose labelled classes the batches draw equally often (balanced_weights).
    """
    torch.manual_seed(cfg.seed)
    prior, n_total = model.prior, len(data)
    if cfg.delta > 0 and gradient_factors:
        prior.use_gradient_factors(gradient_factors)
    if (cfg.delta_until < 1 or cfg.average_factors) and not prior.has_gradient_factors:
        raise ValueError("semi.delta_until < 1 and semi.average_factors act on labelled factors trained by "
                         "gradient: they need semi.delta > 0 and labels (semi.fraction > 0)")
    if cfg.revive > 0 and prior.gradient_factors.all():
        raise ValueError("joint.revive re-seeds components of factors trained by SVI; every factor here is "
                         "labelled and trained by gradient (semi.delta > 0)")
    if cfg.delta_until < 1 or cfg.revive > 0:  # host-side changes of q(xi) or of what the step trains: eager
        cfg = dataclasses.replace(cfg, cuda_graph=False)  # steps (a CUDA graph is captured once)
    params = model.network_parameters() + (prior.gradient_parameters() if prior.has_gradient_factors else [])
    adversary = None
    if cfg.adversary_weight > 0:  # trained with the networks; checkpointed (resume), not part of the model
        adversary = Adversary(model.I, model.D, model.K, gradient_factors).to(model.prior.lam.device)
        params = params + list(adversary.parameters())
    opt = optimizer(params, cfg)

    def log_extras(row):
        with torch.no_grad():
            row["global_kl"] = prior.global_kl().item() / n_total
        row["elbo"] = row["bound"] - row["global_kl"]

    averaged = model.network_parameters() + (prior.gradient_parameters() if cfg.average_factors else [])
    average = _average(averaged, cfg)
    step_fn = joint_step(model, opt, cfg, n_total, params, named=list(gradient_factors), adversary=adversary)
    weights = None
    if cfg.balance:  # labelled points drawn so that each named binary property's classes come equally often
        if data.labels is None:
            raise ValueError("semi.balance: balances labelled points; the training data have no labels")
        weights = balanced_weights(data.labels, cfg.balance)
    batcher = Batcher(data, cfg.batch_size, cfg.seed, weights, hflip=cfg.hflip)
    history = run_loop("joint", model, step_fn, cfg, batcher, opt, ckpt, fingerprint,
                       on_log, log_extras=log_extras, meta=meta, average=average,
                       snapshot_at=tuple(snapshot_steps(cfg)), aux=adversary)
    if average is not None:
        average.copy_to()
    prior.sync_gradient_factors()
    return history


# the three phases in order, by the names params.yaml's sections and the stages use
PHASES = {"pretrain": pretrain, "prior_init": init_prior, "joint": joint_train}
assert tuple(PHASES) == tuple(PHASE_SECTIONS)
