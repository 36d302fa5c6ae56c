"""End to end on synthetic factorial data: I = 2 blocks, 3 clusters each, through a fixed random map."""

import pytest
import torch

from fmvae.core.evaluate import matched_accuracy, supervised_accuracy, evaluate_bound
from fmvae.core.loop import TrainData
from fmvae.core.model import FMVAE
from fmvae.core.phases import init_prior, joint_train, pretrain
from fmvae.data import factorial_vectors, semi_supervised_labels
from fmvae.params import TrainConfig

COMMON = dict(batch_size=128, lr=3e-3, log_every=100, progress=False, tau0=1.0, kappa=0.7, kl_anneal_iters=0)
identity = lambda t: t


def train(seed, x, labels=None, delta=0.0, pre=800, joint=1500, kl_z_weight=10.0):
    torch.manual_seed(seed)
    model = FMVAE("mlp", (x.shape[1],), K=[3, 3], D=2)
    data = TrainData(x, identity, labels)
    pretrain(model, TrainData(x, identity), TrainConfig(iters=pre, seed=seed, **COMMON))
    init_prior(model, data, TrainConfig(iters=200, seed=seed, **COMMON))
    history = joint_train(model, data, TrainConfig(iters=joint, seed=seed, delta=delta, kl_z_weight=kl_z_weight,
                                                   kl_z_anneal_iters=joint // 2, **COMMON),
                          gradient_factors=[0, 1] if labels is not None else [])
    return model, history[-1]["elbo"]


@pytest.mark.parametrize("seed", range(8))
def test_unsupervised_training_recovers_each_factor(seed):
    """Every seed of the first eight. Before the latent rotation of prior initialisation
    (fmvae.core.clustering.factorial_kmeans) only seeds 0 and 7 did; over seeds 0..23 now 23 reach
    >= 0.99. In the exception (seed 20) the pre-trained encodings themselves favour a wrong
    factorisation: the true labels have a higher factorial k-means objective than the one found.
    (No wall-clock bound: hosts of this kind differ up to 5x, and more under load.)"""
    x, _ = factorial_vectors(3000, seed=0)
    x_test, y_test = factorial_vectors(1000, seed=1)
    model, _ = train(seed, x)
    assignments = evaluate_bound(model, x_test, identity)["assignments"]
    # each true factor is recovered by one model factor, after best one-to-one matching of clusters
    acc = [[matched_accuracy(assignments[:, i], y_test[:, j]) for j in range(2)] for i in range(2)]
    best = max(min(acc[0][0], acc[1][1]), min(acc[0][1], acc[1][0]))
    assert best >= 0.9, acc


def test_semi_supervised_training_assigns_held_out_points():
    x, y = factorial_vectors(3000, seed=0)
    x_test, y_test = factorial_vectors(1000, seed=1)
    labels = semi_supervised_labels(y, 0.1, 2, seed=0)
    assert (labels >= 0).all(-1).float().mean() == 0.1
    model, _ = train(0, x, labels, delta=100.0, pre=1000, joint=3000, kl_z_weight=1.0)
    assignments = evaluate_bound(model, x_test, identity)["assignments"]
    for i in range(2):  # factor i is clamped to property i: no matching needed
        assert supervised_accuracy(assignments[:, i], y_test[:, i]) >= 0.95
