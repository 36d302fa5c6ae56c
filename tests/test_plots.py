"""The figures' content: cells are means of the requested samples, grids have the cells asked
for, axes carry property names and nats, Figure 4 shares one variance scale."""
import pandas as pd
import pytest
import torch

from fmvae.core.model import FMVAE
from fmvae.data import load_synthetic
from fmvae.reporting import plots


@pytest.fixture(scope="module")
def model_and_data():
    ds = load_synthetic(n_train=300, n_test=50)
    torch.manual_seed(0)
    model = FMVAE("conv28", (1, 28, 28), K=[3, 4], D=2)
    with torch.no_grad():
        mu, logvar = model.encode(ds.x_train.float())
    model.prior.init_from_encodings(mu, logvar.exp(), 300, torch.Generator().manual_seed(0))
    return model, ds


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the functions save, kept for inspection."""
    saved = []

    def keep(fig, path):
        saved.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    return saved


def test_a_cell_is_the_mean_of_the_requested_number_of_conditional_samples(model_and_data):
    model, _ = model_and_data
    clamps = torch.tensor([[0, 1], [2, -1]])
    torch.manual_seed(5)
    got = plots.conditional_means(model, clamps, per_cell=7)
    torch.manual_seed(5)
    z, k = model.prior.sample(14, clamps.repeat_interleave(7, 0))
    want = model.decode_mean(z).view(2, 7, 1, 28, 28).mean(1)
    assert torch.allclose(got, want, atol=1e-6)
    assert (k[:7] == torch.tensor([0, 1])).all() and (k[7:, 0] == 2).all()
    single = model.decode_mean(z[:1])  # one sample differs from the mean of seven
    assert (got[0] - single[0]).abs().max() > 1e-5


def test_two_factor_grid_has_one_cell_per_component_pair_labelled_with_property_names(model_and_data, figures,
                                                                                      tmp_path):
    model, ds = model_and_data
    _, cells = plots.sample_grid(model, ds, [0, 1], 10, tmp_path / "g.png", per_cell=5,
                                 names={0: "shape", 1: "position"})
    assert cells.shape == (3, 4, 1, 28, 28)  # K = 3 rows (shape), K = 4 columns (position)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["shape = 0", "shape = 1", "shape = 2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"position = {k}" for k in range(4)]
    assert "mean of 5 samples" in ax.get_title() and "shape" in ax.get_ylabel()
    image = ax.get_images()[0].get_array()
    assert image.shape[:2] == (2 + 3 * 30, 2 + 4 * 30)  # one make_grid image: 28 px cells, 2 px padding


def test_unnamed_factors_are_labelled_by_component_and_weight_heaviest_first(model_and_data, figures, tmp_path):
    model, ds = model_and_data
    _, cells = plots.sample_grid(model, ds, [1, 1], 3, tmp_path / "g.png")
    w = model.prior.mixture_weights()[1]
    order = w.argsort(descending=True)[:3].tolist()
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert labels == [f"k={k} ({w[k]:.3f})" for k in order]
    assert cells.shape == (3, 3, 1, 28, 28)


def test_figure4_shares_one_variance_scale_with_a_colour_bar(model_and_data, figures, tmp_path):
    model, ds = model_and_data
    plots.cluster_figure(model, ds, 0, tmp_path / "c.png", n_clusters=3, n_draws=20, n_show=4)
    fig = figures[0]
    variance_images = [ax.get_images()[0] for ax in fig.axes[1:9:3]]
    assert len({im.get_clim() for im in variance_images}) == 1  # one colour scale for every row
    assert len(fig.axes) == 3 * 3 + 1 and "pixel variance" in fig.axes[-1].get_ylabel()  # the colour bar
    assert "K = 3" in fig._suptitle.get_text()


def test_figure4_shows_every_value_of_a_named_factor_and_only_the_heaviest_of_a_free_one(model_and_data, figures,
                                                                                       tmp_path):
    """A digit factor must show all ten digits, not the first n_clusters; a free factor its heaviest."""
    model, ds = model_and_data
    plots.cluster_figure(model, ds, 1, tmp_path / "named.png", n_clusters=2, n_draws=5, n_show=2, names={1: "position"})
    plots.cluster_figure(model, ds, 1, tmp_path / "free.png", n_clusters=2, n_draws=5, n_show=2)
    named, free = figures
    assert [ax.get_ylabel() for ax in named.axes[0:12:3]] == [f"position = {k}" for k in range(4)]
    assert "each of its 4 values" in named._suptitle.get_text()
    w = model.prior.mixture_weights()[1]
    assert len(free.axes) == 2 * 3 + 1 and "the 2 heaviest" in free._suptitle.get_text()
    assert [ax.get_ylabel().split("\n")[0] for ax in free.axes[0:6:3]] == \
        [f"k={k}" for k in w.argsort(descending=True)[:2].tolist()]


def test_training_curves_one_panel_per_term_on_one_axis_in_nats(tmp_path, figures):
    files = []
    for phase, n, cols in (("pretrain", 3, ["elbo", "recon", "kl"]), ("prior_init", 2, ["kl_z", "kl_r"]),
                           ("joint", 3, ["elbo", "recon", "kl_z", "kl_r", "ce"])):
        df = pd.DataFrame({"step": [10 * (i + 1) for i in range(n)]} | {c: [-1.0 - i for i in range(n)] for c in cols})
        files.append(tmp_path / f"{phase}.csv")
        df.to_csv(files[-1], index=False)
    plots.training_curves(files, tmp_path / "t.png")
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ELBO", "reconstruction E[log p(x|z)]", "KL[z]", "KL[r]",
                                               "cross-entropy of labels (8)"]
    assert all(ax.get_ylabel() == "nats per point" for ax in axes)
    joint = [line for line in axes[0].get_lines() if line.get_label() == "joint"][0]
    assert list(joint.get_xdata()) == [30 + 20 + 10, 30 + 20 + 20, 30 + 20 + 30]  # after both earlier phases
