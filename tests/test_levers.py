"""The levers on named factors (issue 34), each a setting off by default: with it off training is unchanged
(tests/test_golden.py: bit for bit), with it on it changes what it names and nothing else, where it cannot
apply it is refused before any work, and it keys checkpoints (the TrainConfig) and sweep trials (`semi`)."""
import dataclasses

import pytest
import torch

from fmvae import config
from fmvae.data import factorial_vectors, semi_supervised_labels
from fmvae.model import FMVAE
from fmvae.params import ParamError, validate
from fmvae.step import TrainData
from fmvae.train import TrainConfig, init_prior, joint_train, pretrain

X, Y = factorial_vectors(3000, seed=0)
DATA = TrainData(X, lambda t: t, semi_supervised_labels(Y, 0.3, 2, 0))
BASE = TrainConfig(iters=100, seed=0, log_every=10, progress=False, checkpoint_every_s=0.0, delta=10.0,
                   kl_z_weight=5.0, kl_z_anneal_iters=50, snapshots=0)


@pytest.fixture(scope="module")
def initialised():
    torch.manual_seed(0)
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    pretrain(model, DATA, dataclasses.replace(BASE, iters=100, kl_anneal_iters=30))
    init_prior(model, DATA, dataclasses.replace(BASE, iters=20, init_points=1000, init_restarts=2))
    return model.state_dict()


def joint(state, **settings):
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(state)
    history = joint_train(model, DATA, dataclasses.replace(BASE, **settings), gradient_factors=[0, 1])
    return model, history


def test_delta_until_hands_the_labelled_factors_back_to_svi_at_its_step(initialised):
    """Up to the switch (step 50 of 100) the run is the plain one to the bit; then the labelled factors
    leave gradient training with their values of that moment, and SVI moves them; their gradient-trained
    parameters stay where they were."""
    at_switch = {}
    plain, plain_history = joint(initialised)
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)

    def keep(row, history):
        if row["step"] == 50:
            at_switch["grad_m"] = model.prior.grad_m.detach().clone()

    history = joint_train(model, DATA, dataclasses.replace(BASE, delta_until=0.5), gradient_factors=[0, 1],
                          on_log=keep)
    assert history[:5] == plain_history[:5] and history[5:] != plain_history[5:]
    assert not model.prior.has_gradient_factors and plain.prior.has_gradient_factors
    assert torch.equal(model.prior.grad_m, at_switch["grad_m"])  # no gradient step after the switch
    m_switch = at_switch["grad_m"][:2]
    m_end = model.prior.mean_params()[0][:2]
    assert not torch.allclose(m_end, m_switch)  # SVI moved the labelled factors' means since


def test_average_factors_changes_the_labelled_factors_final_values_only(initialised):
    """Averaging the labelled factors' parameters does not change training (the same curve and the same
    averaged networks, to the bit) but their final values: the average, not the last iterate."""
    last, last_history = joint(initialised)
    averaged, averaged_history = joint(initialised, average_factors=True)
    assert averaged_history == last_history
    for (name, a), b in zip(averaged.state_dict().items(), last.state_dict().values()):
        if name.startswith(("encoder", "decoder")):
            assert torch.equal(a, b), name
    assert not torch.allclose(averaged.prior.mean_params()[0][:2], last.prior.mean_params()[0][:2])


def test_the_levers_are_refused_where_they_cannot_apply(initialised):
    for settings in ({"delta_until": 0.5}, {"average_factors": True}):
        key = f"semi.{next(iter(settings))}"
        with pytest.raises(ParamError, match=key):
            validate({"semi": settings})  # no labels: refused before any work
        validate({"semi": settings | {"delta": 10.0, "fraction": 0.1}})
        model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
        model.load_state_dict(initialised)
        with pytest.raises(ValueError, match="need semi.delta > 0"):
            joint_train(model, DATA, dataclasses.replace(BASE, delta=0.0, **settings))
    with pytest.raises(ParamError, match="semi.average_factors: averages with train.ema_decay"):
        validate({"semi": {"average_factors": True, "delta": 10.0, "fraction": 0.1}, "train": {"ema_decay": 0.0}})
    with pytest.raises(ParamError, match="semi.delta_until"):
        validate({"semi": {"delta_until": 0.0, "delta": 10.0, "fraction": 0.1}})


def test_the_levers_key_the_joint_phase_s_checkpoints():
    """A checkpoint's fingerprint holds the phase's TrainConfig (fmvae.pipeline.prepare_phase): each lever
    set gives another one, so a run never resumes a checkpoint of the other setting. (Sweep trials key on
    the whole `semi` section, fmvae.sweep.TRIAL_SECTIONS.)"""
    base = {"semi": {"delta": 10.0, "fraction": 0.1}}
    fingerprints = {config.fingerprint(config.train_config(validate(base | {"semi": base["semi"] | extra}), "joint").__dict__)
                    for extra in ({}, {"delta_until": 0.5}, {"average_factors": True})}
    assert len(fingerprints) == 3
