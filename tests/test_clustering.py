"""Symmetry breaking: factorial k-means finds a hidden rotation; rotating the networks keeps the model."""
import pytest
import torch

from fmvae.core.clustering import factorial_kmeans, random_rotation
from fmvae.core.evaluate import matched_accuracy
from fmvae.core.model import FMVAE

NOISE = 0.1


def rotated_factorial_clusters(n=600, K=(3, 4), D=2, seed=0):
    """Block i of z holds one of K[i] well separated centres plus noise; then the whole
    vector is rotated by a random orthogonal Q, so no block of the rotated z is a factor."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(k, (n,), generator=g) for k in K], 1)
    centres = [3.0 * torch.randn(k, D, generator=g, dtype=torch.float64) for k in K]
    z = torch.cat([c[labels[:, i]] for i, c in enumerate(centres)], -1)
    z = z + NOISE * torch.randn(z.shape, generator=g, dtype=torch.float64)
    q = random_rotation(len(K) * D, g)
    return (z @ q).reshape(n, len(K), D), labels, q


def test_factorial_kmeans_undoes_a_hidden_rotation():
    z, labels, q = rotated_factorial_clusters()
    rotation, found, objective = factorial_kmeans(z, (3, 4), torch.Generator().manual_seed(0), restarts=8)
    # K = (3, 4) differ, so block i must hold the factor with K[i] clusters: no block matching needed
    for i in range(2):
        assert matched_accuracy(found[:, i], labels[:, i]) == 1.0
    assert objective < 1.5 * 4 * NOISE ** 2  # within-cluster scatter only: 4 dimensions of noise
    assert torch.allclose(rotation.T @ rotation, torch.eye(4, dtype=rotation.dtype), atol=1e-10)
    # the rotation found maps each factor's plane back onto one block: q R is block diagonal
    back = q @ rotation
    assert back[:2, 2:].abs().max() < 0.05 and back[2:, :2].abs().max() < 0.05


def test_without_rotation_the_blocks_are_clustered_independently_and_fail_here():
    z, labels, _ = rotated_factorial_clusters()
    rotation, found, objective = factorial_kmeans(z, (3, 4), torch.Generator().manual_seed(0), restarts=8,
                                                  rotate=False)
    assert torch.equal(rotation, torch.eye(4, dtype=rotation.dtype))
    assert objective > 10 * 4 * NOISE ** 2
    assert min(matched_accuracy(found[:, i], labels[:, i]) for i in range(2)) < 0.9


def test_factorial_kmeans_keeps_clamped_labels():
    z, labels, _ = rotated_factorial_clusters(seed=1)
    clamp = torch.full_like(labels, -1)
    clamp[::3, 0] = labels[::3, 0]          # a third of factor 0 observed
    clamp[1::5, 1] = (labels[1::5, 1] + 1) % 4  # wrong labels too: clamping must still win
    _, found, _ = factorial_kmeans(z, (3, 4), torch.Generator().manual_seed(0), restarts=4, clamp=clamp)
    observed = clamp >= 0
    assert torch.equal(found[observed], clamp[observed])


def test_factorial_kmeans_rejects_a_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="2 cluster counts for 3 blocks"):
        factorial_kmeans(torch.randn(10, 3, 2), (2, 2))


def test_rotate_latent_rotates_means_and_keeps_the_decoder_function():
    torch.manual_seed(0)
    model = FMVAE("mlp", (20,), K=[3, 3], D=2)
    x = torch.randn(64, 20)
    with torch.no_grad():
        mu, logvar = (t.flatten(1) for t in model.encode(x))
        decoded = model.decoder(mu)
    r = random_rotation(4, torch.Generator().manual_seed(3)).float()
    model.rotate_latent(r)
    with torch.no_grad():
        mu2, logvar2 = (t.flatten(1) for t in model.encode(x))
        decoded2 = model.decoder(mu2)
    assert torch.allclose(mu2, mu @ r, atol=1e-5)
    assert torch.allclose(decoded2, decoded, atol=1e-5)
    # log variances: the Jensen lower bound sum_k R_kj^2 log var_k of log (R^T diag(var) R)_jj
    assert torch.allclose(logvar2, logvar @ (r * r), atol=1e-5)
    exact = torch.log(logvar.exp() @ (r * r))
    assert (logvar2 <= exact + 1e-5).all() and (logvar2 < exact - 1e-3).any()


def test_rotate_latent_is_exact_for_isotropic_variances():
    torch.manual_seed(0)
    model = FMVAE("mlp", (20,), K=[2, 2], D=2)
    head = model.encoder[-1]
    with torch.no_grad():  # every log variance row the same: var isotropic for each x
        head.weight[4:] = head.weight[4]
        head.bias[4:] = head.bias[4]
    x = torch.randn(32, 20)
    var = model.encode(x)[1].flatten(1).exp()
    r = random_rotation(4, torch.Generator().manual_seed(5)).float()
    model.rotate_latent(r)
    var2 = model.encode(x)[1].flatten(1).exp()
    exact = torch.diagonal(r.T @ torch.diag_embed(var) @ r, dim1=-2, dim2=-1)
    assert torch.allclose(var2, exact, rtol=1e-5)


def test_rotate_latent_refuses_a_matrix_that_is_not_orthogonal():
    model = FMVAE("mlp", (20,), K=[2, 2], D=2)
    with pytest.raises(ValueError, match="orthogonal"):
        model.rotate_latent(2 * torch.eye(4))


@pytest.mark.parametrize("rotate", [True, False])
def test_init_prior_folds_an_orthogonal_rotation_into_the_networks(rotate):
    from fmvae.data import factorial_vectors
    from fmvae.params import TrainConfig
    from fmvae.core.phases import TrainData, init_prior
    x, _ = factorial_vectors(500, seed=0)
    torch.manual_seed(0)
    model = FMVAE("mlp", (20,), K=[3, 3], D=2)
    with torch.no_grad():
        mu = model.encode(x)[0].flatten(1)
    init_prior(model, TrainData(x, lambda t: t), TrainConfig(iters=0, progress=False, rotate=rotate))
    with torch.no_grad():
        mu2 = model.encode(x)[0].flatten(1)
    r = torch.linalg.lstsq(mu, mu2).solution  # mu2 = mu R exactly
    assert torch.allclose(mu @ r, mu2, atol=1e-4)
    assert torch.allclose(r.T @ r, torch.eye(4), atol=1e-3)
    assert torch.allclose(r, torch.eye(4), atol=1e-3) != rotate
