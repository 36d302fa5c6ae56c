"""The levers on named factors (issue 34), each a setting off by default: with it off training is unchanged
(tests/test_golden.py: bit for bit), with it on it changes what it names and nothing else, where it cannot
apply it is refused before any work, and it keys checkpoints (the TrainConfig) and sweep trials (`semi`)."""
import copy
import dataclasses
import math

import pytest
import torch

from fmvae import provenance
from fmvae.core.distributions.normal_gamma import mean_from_natural, natural_from_mean
from fmvae.core.levers import Adversary, read_back, swap_consistency, usage_entropy
from fmvae.core.loop import Batcher, TrainData, balanced_weights
from fmvae.core.model import FMVAE
from fmvae.core.phases import init_prior, joint_train, pretrain
from fmvae.data import factorial_vectors, semi_supervised_labels
from fmvae.io import CheckpointDir
from fmvae.params import ParamError, check_against_data, train_config, validate, TrainConfig

X, Y = factorial_vectors(3000, seed=0)
DATA = TrainData(X, lambda t: t, semi_supervised_labels(Y, 0.3, 2, 0))
BASE = TrainConfig(iters=100, seed=0, log_every=10, progress=False, checkpoint_every_s=0.0, delta=10.0,
                   kl_z_weight=5.0, kl_z_anneal_iters=50, snapshots=0)


@pytest.fixture(scope="module")
def initialised():
    torch.manual_seed(0)
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    pretrain(model, DATA, dataclasses.replace(BASE, iters=100, kl_anneal_iters=30))
    init_prior(model, DATA, dataclasses.replace(BASE, iters=20, init_points=1000, restarts=2))
    return model.state_dict()


@pytest.fixture(scope="module")
def entangled(initialised):
    """The known answer for the levers: the initialised model with its latent space turned 45 degrees
    between block 0 and block 1 (exact, FMVAE.rotate_latent) and q(xi) fitted again without rotation,
    so that each property sits half in each block, as the free block held the digit on MNIST."""
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)
    c = 0.5 ** 0.5
    turn = torch.tensor([[c, 0, c, 0], [0, c, 0, c], [-c, 0, c, 0], [0, -c, 0, c]])
    model.rotate_latent(turn)
    init_prior(model, DATA, dataclasses.replace(BASE, iters=20, init_points=1000, restarts=2, rotate=False))
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
    for settings in ({"delta_until": 0.5}, {"average_factors": True}, {"swap_weight": 1.0},
                     {"adversary_weight": 1.0}):
        key = f"semi.{next(iter(settings))}"
        with pytest.raises(ParamError, match=key):
            validate({"semi": settings})  # no labels: refused before any work
        validate({"semi": settings | {"delta": 10.0, "fraction": 0.1}, "model": {"I": 2}})
        model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
        model.load_state_dict(initialised)
        with pytest.raises(ValueError, match="need semi.delta > 0|need labels"):
            joint_train(model, DATA, dataclasses.replace(BASE, delta=0.0, **settings))
    with pytest.raises(ParamError, match="semi.average_factors: averages with train.ema_decay"):
        validate({"semi": {"average_factors": True, "delta": 10.0, "fraction": 0.1}, "train": {"ema_decay": 0.0}})
    with pytest.raises(ParamError, match="semi.delta_until"):
        validate({"semi": {"delta_until": 0.0, "delta": 10.0, "fraction": 0.1}})
    labelled = {"delta": 10.0, "fraction": 0.1}
    with pytest.raises(ParamError, match="semi.adversary_weight: the adversary reads the blocks other"):
        validate({"semi": labelled | {"adversary_weight": 1.0}, "model": {"I": 1}})
    with pytest.raises(ParamError, match="sweep.pack > 1"):
        validate({"semi": labelled | {"swap_weight": 1.0}, "sweep": {"pack": 4}})
    with pytest.raises(ParamError, match="semi.swap_weight"):
        validate({"semi": labelled | {"swap_weight": -1.0}})


def test_the_levers_key_the_joint_phase_s_checkpoints():
    """A checkpoint's fingerprint holds the phase's TrainConfig (fmvae.core.pipeline.prepare_phase): each lever
    set gives another one, so a run never resumes a checkpoint of the other setting. (Sweep trials key on
    the whole `semi` section, fmvae.sweep.TRIAL_SECTIONS.)"""
    base = {"semi": {"delta": 10.0, "fraction": 0.1}, "model": {"I": 2, "K": [2, 2]}}
    fingerprints = {provenance.fingerprint(train_config(validate(base | {"semi": base["semi"] | extra}), "joint").__dict__)
                    for extra in ({}, {"delta_until": 0.5}, {"average_factors": True}, {"swap_weight": 1.0},
                                  {"adversary_weight": 1.0}, {"balance": [0]}, {"balance": [0, 1]})}
    assert len(fingerprints) == 7


def test_the_swap_s_reader_is_a_fixed_judge(initialised):
    """read_back passes gradient to its input image, never to the encoder's weights; the swap term
    reaches the decoder, and the encoder only through the kept blocks' samples."""
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)
    x = X[:16].clone().requires_grad_(True)
    read_back(model, x, model.prior.stats()).logsumexp(-1).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.parameters())
    mu, logvar = model.encode(X[:16])
    swap_consistency(model, mu.detach(), logvar.detach(), [0, 1], model.prior.stats()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.body.parameters())


def test_swap_consistency_trains_decoded_swaps_to_read_back_as_their_component(entangled):
    """Measured on the final models with one seed: the swap term of the run that trains it is below
    the plain run's, and the run is otherwise a valid joint run (its bound within a few nats)."""
    def measured(model):
        torch.manual_seed(7)
        mu, logvar = model.encode(X[:2000])
        with torch.no_grad():
            return swap_consistency(model, mu, logvar, [0, 1], model.prior.stats()).item()

    plain, plain_history = joint(entangled, iters=300)
    swapped, history = joint(entangled, iters=300, swap_weight=10.0)
    assert "swap_ce" in history[-1] and "swap_ce" not in plain_history[-1]
    assert measured(swapped) < 0.85 * measured(plain), (measured(swapped), measured(plain))  # measured: 0.66 / 0.87
    assert abs(history[-1]["elbo"] - plain_history[-1]["elbo"]) < 5.0


def test_the_adversary_empties_the_other_block_of_the_named_property():
    """Known answer: block 1 starts as a noisy one-hot code of factor 0's label. Trained on the adversary's
    loss alone (the block standing for the encoder's output), with weight 0 its classifier learns to read the
    label (cross-entropy near 0); with weight 10 the block is emptied of most of it: the classifier's
    cross-entropy stays near log K and a fresh least-squares probe of the final block reads the label at
    0.74 (measured; chance 1/3), against 1.0 without. (Adversaries remove information only partly: the
    block keeps moving away from the current classifier; the issue's note quotes this.)"""
    def train(weight):
        torch.manual_seed(0)
        label = torch.randint(3, (600,))
        block = torch.nn.functional.one_hot(label, 3).float() * 3 + 0.3 * torch.randn(600, 3)
        mu = torch.stack((torch.randn(600, 3), block), 1).requires_grad_(True)  # (B, I = 2, D = 3)
        adversary = Adversary(2, 3, [3, 3], [0])
        opt = torch.optim.Adam([mu] + list(adversary.parameters()), lr=0.05)
        gamma = torch.nn.functional.one_hot(label, 3).float()[:, None].expand(600, 2, 3)
        for _ in range(300):
            loss, ce = adversary(mu, gamma, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        features = torch.cat((mu[:, 1].detach(), torch.ones(600, 1)), 1)
        fit = torch.linalg.lstsq(features, gamma[:, 0]).solution
        return ce.item(), ((features @ fit).argmax(-1) == label).float().mean().item()

    ce_free, probe_free = train(0.0)
    ce, probe = train(10.0)
    assert ce_free < 0.05 and probe_free > 0.95
    assert ce > 0.9 * math.log(3) and probe < 0.85, (ce, probe)


def test_the_adversary_s_two_parts_train_two_parties():
    """Its classifier's cross-entropy reaches only the classifier; the confusion term only the blocks."""
    mu = torch.randn(8, 2, 3, requires_grad=True)
    adversary = Adversary(2, 3, [3, 3], [0])
    gamma = torch.softmax(torch.randn(8, 2, 3), -1)
    _, ce = adversary(mu, gamma, 0.0)
    loss, _ = adversary(mu, gamma, 0.0)
    loss.backward()
    assert mu.grad is None or mu.grad.abs().sum() == 0
    adversary.zero_grad()
    loss, _ = adversary(mu, gamma, 1.0)
    torch.autograd.backward(loss - adversary(mu, gamma, 0.0)[0])  # the confusion term alone
    assert mu.grad[:, 1].abs().sum() > 0 and mu.grad[:, 0].abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in adversary.parameters())


def test_a_resumed_run_continues_the_adversary_s_state(initialised, tmp_path):
    """The adversary's classifiers are checkpointed with the model: a run stopped at step 50 and resumed
    logs the uninterrupted run's curve to the bit (a resume with fresh classifiers would not)."""
    cfg = dataclasses.replace(BASE, adversary_weight=1.0)
    _, straight = joint(initialised, adversary_weight=1.0)

    def stop(row, history):
        if row["step"] == 50:
            raise KeyboardInterrupt

    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)
    with pytest.raises(KeyboardInterrupt):
        joint_train(model, DATA, cfg, CheckpointDir(tmp_path), "fp", on_log=stop, gradient_factors=[0, 1])
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)
    resumed = joint_train(model, DATA, cfg, CheckpointDir(tmp_path), "fp", gradient_factors=[0, 1])
    assert resumed == straight
    assert not any(name.startswith("heads") for name in model.state_dict())


# ----------------------------------------------------------------- balanced labelled batches (semi.balance)

def rare_binary_data():
    """Two binary factors (factorial_vectors with k = 2), class 1 of factor 0 thinned to about 1 point in
    12 (CelebA's glasses: 6.9%), 40% of the points labelled."""
    x, y = factorial_vectors(6000, seed=0, k=2)
    keep = (y[:, 0] == 0) | (torch.rand(6000, generator=torch.Generator().manual_seed(1)) < 0.09)
    return TrainData(x[keep], lambda t: t, semi_supervised_labels(y[keep], 0.4, 2, 0))


def test_balanced_weights_draw_each_class_of_a_listed_factor_equally_often():
    """Closed form: under the weights each class of factor 0 holds half of the labelled points' mass and the
    labelled points their uniform share; drawn by the Batcher (200,000 draws), the shares agree within 4
    standard errors. Factor 1 (not listed) and the unlabelled points keep their weights of 1."""
    data = rare_binary_data()
    labels = data.labels
    seen = labels[:, 0] >= 0
    assert 0.05 < (labels[seen, 0] == 1).float().mean() < 0.12
    weights = balanced_weights(labels, [0])
    mass = lambda mask: weights[mask].sum().item() / weights.sum().item()
    assert mass(seen & (labels[:, 0] == 1)) == pytest.approx(mass(seen & (labels[:, 0] == 0)), rel=1e-5)
    assert mass(seen) == pytest.approx(seen.float().mean().item(), rel=1e-5)
    assert torch.all(weights[~seen] == 1)
    batcher = Batcher(data, 500, seed=3, weights=weights)
    drawn = torch.cat([batcher.draw() for _ in range(400)])
    drawn_labels = labels[drawn, 0]
    share = (drawn_labels[drawn_labels >= 0] == 1).float().mean().item()
    n = int((drawn_labels >= 0).sum())
    assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5, share
    assert abs((drawn_labels >= 0).float().mean().item() - seen.float().mean().item()) < 4 * (0.25 / len(drawn)) ** 0.5
    both = balanced_weights(labels, [0, 1])  # two listed factors: each balanced as far as they are independent
    for p in (0, 1):
        ones = both[seen & (labels[:, p] == 1)].sum() / both[seen].sum()
        assert abs(ones.item() - 0.5) < 0.05, (p, ones)
    with pytest.raises(ValueError, match="semi.balance: factor 0 has labelled points of 1 class"):
        balanced_weights(torch.where(labels >= 0, 0, -1), [0])


@pytest.fixture(scope="module")
def binary_initialised():
    data = rare_binary_data()
    torch.manual_seed(0)
    model = FMVAE("mlp", (data.x.shape[1],), [2, 2], 2)
    pretrain(model, data, dataclasses.replace(BASE, iters=60, kl_anneal_iters=20))
    init_prior(model, data, dataclasses.replace(BASE, iters=10, init_points=1000, restarts=1))
    return data, model.state_dict()


def test_balance_changes_training_only_when_set_and_resumes_its_stream(binary_initialised, tmp_path):
    """balance = [] is the uniform run to the bit; balance = [0] trains on other batches (another curve), and
    a run stopped at step 50 and resumed logs its uninterrupted curve to the bit (the batcher's generator is
    checkpointed; the weights follow from the labels)."""
    data, state = binary_initialised

    def run(ckpt=None, on_log=None, **settings):
        model = FMVAE("mlp", (data.x.shape[1],), [2, 2], 2)
        model.load_state_dict(state)
        return joint_train(model, data, dataclasses.replace(BASE, **settings), ckpt, "fp", on_log=on_log,
                           gradient_factors=[0, 1])

    uniform = run()
    assert run(balance=[]) == uniform
    balanced = run(balance=[0])
    assert balanced != uniform

    def stop(row, history):
        if row["step"] == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(CheckpointDir(tmp_path), stop, balance=[0])
    assert run(CheckpointDir(tmp_path), balance=[0]) == balanced


def test_balance_is_refused_where_it_cannot_apply(binary_initialised):
    labelled = {"delta": 10.0, "fraction": 0.4, "balance": [0]}
    validate({"semi": labelled, "model": {"I": 2, "K": [2, 2]}})
    for given, message in (({"semi": {"balance": [0]}, "model": {"I": 2, "K": [2, 2]}}, "it needs semi.fraction > 0"),
                           ({"semi": labelled, "model": {"I": 2, "K": [3, 2]}}, "factor 0 has K = 3"),
                           ({"semi": labelled | {"balance": [2]}, "model": {"I": 2, "K": [2, 2]}},
                            "factor 2 is not a factor of the model"),
                           ({"semi": labelled | {"balance": [0, 0]}, "model": {"I": 2, "K": [2, 2]}}, "distinct"),
                           ({"semi": labelled, "model": {"I": 2, "K": [2, 2]}, "sweep": {"pack": 4}}, "sweep.pack > 1")):
        with pytest.raises(ParamError, match=message):
            validate(given)

    class Unlabelled:  # what check_against_data reads of a data set
        name, y_train, property_names, property_K = "binarized_mnist", None, [], []

    class OneProperty(Unlabelled):
        name, y_train, property_names, property_K = "celeba-like", torch.zeros(4, 1), ["Eyeglasses"], [2]

    params = validate({"semi": labelled | {"balance": [0, 1]}, "model": {"I": 2, "K": [2, 2]}})
    with pytest.raises(ParamError, match="binarized_mnist has no labels"):
        check_against_data(params, Unlabelled())
    with pytest.raises(ParamError, match=r"factor\(s\) \[1\] carry no labelled property"):
        check_against_data(params, OneProperty())
    data, state = binary_initialised
    model = FMVAE("mlp", (data.x.shape[1],), [2, 2], 2)
    model.load_state_dict(state)
    with pytest.raises(ValueError, match="semi.balance: balances labelled points; the training data have no labels"):
        joint_train(model, TrainData(data.x, data.to_float), dataclasses.replace(BASE, delta=0.0, balance=[0]))


# ----------------------------------------------------------------- mirrored faces (train.hflip)

def faces(n: int = 120):
    """Tiny (N, 3, 64, 64) uint8 images, bright on their left half only, so that a mirror is another image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 60, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    x[..., :32] += 180
    labels = torch.randint(2, (n, 2), generator=g)
    return TrainData(x, lambda t: t.float() / 127.5 - 1, labels)


def test_hflip_draws_each_image_or_its_mirror_equally_often():
    """Index j + N is image j mirrored left-right, its labels unchanged; 40,000 draws pick a mirror half of
    the time within 4 standard errors, and weights (balanced_weights) weigh a mirror as its image."""
    data = faces()
    n = len(data)
    batcher = Batcher(data, 500, seed=3, hflip=True)
    x, labels = batcher.gather(torch.tensor([5, 5 + n]))
    assert torch.equal(x[1], x[0].flip(-1)) and not torch.equal(x[1], x[0])
    assert torch.equal(labels[0], labels[1]) and torch.equal(labels[0], data.labels[5])
    drawn = torch.cat([batcher.draw() for _ in range(80)])
    assert drawn.max() < 2 * n
    mirrored = (drawn >= n).float().mean().item()
    assert abs(mirrored - 0.5) < 4 * (0.25 / len(drawn)) ** 0.5, mirrored
    weights = torch.ones(n)
    weights[:10] = 50.0  # the first ten images (and their mirrors) hold 500 / 610 of the mass
    drawn = torch.cat([Batcher(data, 500, seed=s, weights=weights, hflip=True).draw() for s in range(4, 44)])
    heavy = ((drawn % n) < 10).float().mean().item()
    assert abs(heavy - 500 / 610) < 4 * ((500 / 610) * (110 / 610) / len(drawn)) ** 0.5, heavy
    assert abs((drawn >= n).float().mean().item() - 0.5) < 4 * (0.25 / len(drawn)) ** 0.5
    with pytest.raises(ValueError, match=r"hflip mirrors images \(N, C, H, W\); the data are \(3000, 20\)"):
        Batcher(DATA, 10, 0, hflip=True)


def test_hflip_changes_training_only_when_set_and_resumes_its_stream(tmp_path):
    """hflip = false is the unmirrored run to the bit (pre-training and the joint phase); hflip = true
    trains on other batches; a run stopped at step 10 and resumed logs its uninterrupted curve to the bit."""
    data = faces()
    cfg = dataclasses.replace(BASE, iters=20, batch_size=16, kl_anneal_iters=5, delta=0.0)

    def run(ckpt=None, on_log=None, **settings):
        torch.manual_seed(0)
        model = FMVAE("conv64", (3, 64, 64), [2, 2], 2, channels=(4, 4, 4, 4))
        return pretrain(model, data, dataclasses.replace(cfg, **settings), ckpt, "fp", on_log=on_log)

    plain = run()
    assert run(hflip=False) == plain
    mirrored = run(hflip=True)
    assert mirrored != plain

    def stop(row, history):
        if row["step"] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(CheckpointDir(tmp_path), stop, hflip=True)
    assert run(CheckpointDir(tmp_path), hflip=True) == mirrored

    torch.manual_seed(0)
    model = FMVAE("conv64", (3, 64, 64), [2, 2], 2, channels=(4, 4, 4, 4))
    pretrain(model, data, cfg)
    init_prior(model, data, dataclasses.replace(cfg, iters=5, init_points=100, restarts=1))
    state = model.state_dict()

    def joint_run(**settings):
        model = FMVAE("conv64", (3, 64, 64), [2, 2], 2, channels=(4, 4, 4, 4))
        model.load_state_dict(state)
        return joint_train(model, data, dataclasses.replace(cfg, iters=10, **settings))

    unmirrored = joint_run()
    assert joint_run(hflip=False) == unmirrored
    assert joint_run(hflip=True) != unmirrored


def test_hflip_is_refused_where_it_cannot_apply_and_keys_the_phases():
    celeba = {"data": {"name": "celeba"}, "train": {"hflip": True}}
    validate(celeba)
    for given, message in (({"train": {"hflip": True}}, "'binarized_mnist' is not CelebA"),
                           ({"train": {"hflip": True}, "data": {"name": "omniglot"}}, "'omniglot' is not CelebA"),
                           (celeba | {"sweep": {"pack": 2}}, "train.hflip: trials packed"),
                           ({"data": {"name": "celeba"}, "train": {"hflip": "yes"}}, "train.hflip")):
        with pytest.raises(ParamError, match=message):
            validate(given)
    for phase in ("pretrain", "prior_init", "joint"):  # each phase's checkpoints key on it (sweep trials: `train`)
        prints = {provenance.fingerprint(train_config(validate({"data": {"name": "celeba"}, "train": {"hflip": v}}),
                                                      phase).__dict__) for v in (False, True)}
        assert len(prints) == 2, phase


def test_revive_reseeds_the_dead_components_only():
    """FactorialMixturePrior.revive on a known case: factor 0 fitted to three clusters with its fourth
    component empty, factor 1 a gradient factor with an empty one too. The empty SVI component becomes the
    posterior of n = share * N points at the batch point the live components explain worst (the outlier),
    with the precision of the most populated component; every other number of q(xi) is unchanged to the bit."""
    from fmvae.core.prior import FactorialMixturePrior
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    assign = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    mu = torch.stack((centres[assign] + 0.3 * torch.randn(1000, 2), torch.randn(1000, 2)), 1)  # (B, I, D)
    var = torch.full_like(mu, 0.01)
    prior = FactorialMixturePrior([4, 4], 2)
    prior.init_from_assignments(mu, var, torch.stack((assign, assign.clamp(max=1)), 1), n_total=1000)
    prior.use_gradient_factors([1])
    before = (prior.lam.clone(), prior.c.clone())
    batch = torch.cat((mu[:63], torch.tensor([[[9.0, 9.0], [0.0, 0.0]]])))  # an outlier at (9, 9)
    ell = prior.local_step(batch, torch.full_like(batch, 0.01)).ell
    revived = prior.revive(batch, ell, min_share=0.02, n_total=1000)
    assert revived.tolist() == [1, 0]
    m, s, a, b = (t[0, 3] for t in prior.mean_params()[:4])
    assert torch.equal(m, batch[-1, 0].double())
    big = prior.mean_params()
    assert torch.allclose(a / b, big[2][0, 0] / big[3][0, 0])  # the precision of component 0 (500 points)
    assert torch.allclose(s, torch.full_like(s, 1.0 + 20.0)) and prior.c[0, 3].item() == 1.0 + 20.0
    keep = torch.ones_like(prior.lam, dtype=torch.bool)
    keep[:, 0, 3] = False
    assert torch.equal(prior.lam[keep], before[0][keep]) and torch.equal(prior.c[1], before[1][1])
    assert torch.equal(prior.c[0, :3], before[1][0, :3])
    assert prior.revive(batch, prior.local_step(batch, torch.full_like(batch, 0.01)).ell, 0.02, 1000).sum() == 0


def test_revive_brings_an_emptied_component_back_and_changes_nothing_else(initialised):
    """joint.revive in the joint phase, unlabelled: on the initialised model (three clusters per factor,
    all used) it finds nothing to re-seed and training is the plain run's to the bit (the check's encoder
    pass draws nothing); with one component emptied and moved far away, the plain run leaves it empty and
    the revived run gives it data back."""
    unlabelled = TrainData(X, lambda t: t, None)
    cfg = dataclasses.replace(BASE, iters=300, delta=0.0)

    def run(state, **settings):
        model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
        model.load_state_dict(state)
        history = joint_train(model, unlabelled, dataclasses.replace(cfg, **settings))
        return model, history

    healthy_plain, plain_history = run(copy.deepcopy(initialised))
    healthy, history = run(copy.deepcopy(initialised), revive=0.02)
    assert [{k: v for k, v in row.items() if k != "revived"} for row in history] == plain_history
    assert all(row["revived"] == 0 for row in history)
    assert torch.equal(healthy.prior.lam, healthy_plain.prior.lam)

    emptied = copy.deepcopy(initialised)
    lam = emptied["prior.lam"]
    m, s, a, b = (t.clone() for t in mean_from_natural(lam))
    m[1, 2] = 50.0
    emptied["prior.lam"] = natural_from_mean(m, s, a, b)
    emptied["prior.c"][1, 2] = 1.0
    plain, _ = run(emptied)
    revived, history = run(emptied, revive=0.02)
    share = lambda model: (model.prior.c[1, 2] - 1.0).item() / len(X)
    assert share(plain) < 0.005 and sum(row["revived"] for row in history) > 0
    assert share(revived) > 0.15, share(revived)  # measured: 0.23 at step 300 (0 without), rising to 1/3


def test_revive_is_refused_where_it_cannot_apply_and_keys_the_joint_checkpoints():
    with pytest.raises(ParamError, match="joint.revive"):
        validate({"joint": {"revive": 0.5}})
    with pytest.raises(ParamError, match="joint.revive: trials packed"):
        validate({"joint": {"revive": 0.02}, "sweep": {"pack": 4}})
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    with pytest.raises(ValueError, match="joint.revive re-seeds components of factors trained by SVI"):
        joint_train(model, DATA, dataclasses.replace(BASE, revive=0.02), gradient_factors=[0, 1])
    keyed = {provenance.fingerprint(train_config(validate({"joint": {"revive": r}}), "joint").__dict__)
             for r in (0.0, 0.02, 0.05)}
    assert len(keyed) == 3
    assert train_config(validate({"joint": {"revive": 0.02}}), "pretrain") == train_config(validate({}), "pretrain")


# ----------------------------------------------------------------- the free factors' usage (joint.usage_weight)
def test_usage_entropy_is_the_entropy_of_the_batch_shares_with_finite_gradients():
    """Against the closed form -sum_k p_k log p_k of p = mean_b softmax(logits_b, i) over each listed factor's
    own K_i components (padding ignored); a component whose share underflows to 0 adds 0 and a finite gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, 4, generator=g, dtype=torch.float64) * 3
    K = [4, 3, 2]

    def closed_form(i):
        p = torch.softmax(logits[:, i, :K[i]], -1).mean(0)
        return -(p * p.log()).sum()

    assert torch.allclose(usage_entropy(logits, [1, 2], K), closed_form(1) + closed_form(2), rtol=1e-12)
    assert torch.allclose(usage_entropy(logits, [0], K), closed_form(0), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: usage_entropy(t, [0, 1], K), logits[:6].clone().requires_grad_())
    dead = logits.clone().float()
    dead[:, 0, 3] = -1e4  # its softmax underflows to exactly 0 in float32
    dead.requires_grad_()
    h = usage_entropy(dead, [0], K)
    h.backward()
    p = torch.softmax(dead[:, 0, :3].detach(), -1).mean(0)
    assert torch.allclose(h, -(p * p.log()).sum()) and torch.isfinite(dead.grad).all()
    assert dead.grad[:, 0, 3].abs().max() == 0


def test_usage_weight_spreads_the_free_factor_s_components_and_only_when_set():
    """Unlabelled, with six components for three clusters of block 1 (its encodings split between
    components, so its assignments are soft): the plain run is unchanged by the setting's existence (no
    usage column, the same model bit for bit as with the key at 0), and the rewarded run spreads block 1's
    test shares, measured: entropy 1.72 plain -> 1.76 at weight 10 (log 6 = 1.79), smallest share 0.107 -> 0.116."""
    unlabelled = TrainData(X, lambda t: t, None)
    K = [3, 6]
    torch.manual_seed(0)
    model = FMVAE("mlp", (X.shape[1],), K, 2)
    pretrain(model, unlabelled, dataclasses.replace(BASE, iters=100, kl_anneal_iters=30))
    init_prior(model, unlabelled, dataclasses.replace(BASE, iters=20, init_points=1000, restarts=2))
    state = model.state_dict()
    cfg = dataclasses.replace(BASE, iters=600, delta=0.0, kl_z_weight=1.0, kl_z_anneal_iters=0)

    def run(**settings):
        trained = FMVAE("mlp", (X.shape[1],), K, 2)
        trained.load_state_dict(copy.deepcopy(state))
        history = joint_train(trained, unlabelled, dataclasses.replace(cfg, **settings))
        with torch.no_grad():
            mu, logvar = trained.encode(X)
            shares = trained.prior.local_step(mu, logvar.exp()).gamma[:, 1].mean(0)
        return trained, history, shares

    plain, plain_history, plain_shares = run()
    _, history, shares = run(usage_weight=10.0)
    assert "usage_entropy" not in plain_history[-1] and "usage_entropy" in history[-1]
    entropy = lambda p: -(p * p.log()).sum().item()
    assert entropy(shares) > entropy(plain_shares) + 0.03, (entropy(plain_shares), entropy(shares))
    assert shares.min() > plain_shares.min()
    # the reward reaches the encoder only: q(xi) moves by SVI from the encodings, so the prior differs too,
    # but a weight of 0 is the plain run to the bit
    zero, zero_history, _ = run(usage_weight=0.0)
    assert zero_history == plain_history and torch.equal(zero.prior.lam, plain.prior.lam)


def test_usage_weight_is_refused_where_it_cannot_apply_and_keys_the_joint_checkpoints(initialised):
    for given, message in (({"joint": {"usage_weight": -1.0}}, "joint.usage_weight"),
                           ({"joint": {"usage_weight": 1.0}, "sweep": {"pack": 4}}, "joint.usage_weight: trials packed"),
                           ({"joint": {"usage_weight": 1.0}, "model": {"I": 2, "K": 1}}, "every factor has K = 1")):
        with pytest.raises(ParamError, match=message):
            validate(given)

    class OneProperty:  # what check_against_data reads of a data set: MNIST's digit names factor 0
        name, y_train, property_names, property_K = "mnist", torch.zeros(4, 1), ["digit"], [10]

    labelled = {"semi": {"delta": 300.0, "fraction": 0.1}, "joint": {"usage_weight": 1.0}}
    check_against_data(validate(labelled | {"model": {"I": 2, "K": [10, 10]}}), OneProperty())
    with pytest.raises(ParamError, match=r"factors 1.. of K = \[10, 1\] \(1 named by mnist's labels\) have none"):
        check_against_data(validate(labelled | {"model": {"I": 2, "K": [10, 1]}}), OneProperty())
    # without labels nothing is named: factor 0's ten components are free
    check_against_data(validate({"joint": {"usage_weight": 1.0}, "model": {"I": 2, "K": [10, 1]}}), OneProperty())
    model = FMVAE("mlp", (X.shape[1],), [3, 3], 2)
    model.load_state_dict(initialised)
    with pytest.raises(ValueError, match="joint.usage_weight rewards the spread of the free factors' components"):
        joint_train(model, DATA, dataclasses.replace(BASE, usage_weight=1.0), gradient_factors=[0, 1])
    keyed = {provenance.fingerprint(train_config(validate({"joint": {"usage_weight": w}}), "joint").__dict__)
             for w in (0.0, 1.0, 3.0)}
    assert len(keyed) == 3
    assert train_config(validate({"joint": {"usage_weight": 1.0}}), "pretrain") == train_config(validate({}), "pretrain")
