"""Loaders on the mirror's real files, the CelebA layout, and safe fetching."""
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fmvae import data


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return tmp_path_factory.mktemp("raw")


def test_binarized_mnist_from_the_mirror(mirror, raw):
    ds = data.load("binarized_mnist", data.fetch("binarized_mnist", raw, mirror, allow_download=False))
    assert ds.x_train.shape == (50000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and set(ds.x_train.unique().tolist()) == {0, 1}
    assert 0.10 < ds.x_train.float().mean() < 0.16  # ~13% of MNIST pixels are ink


def test_binarized_mnist_text_amat_gives_the_same_images(mirror, tmp_path):
    from scipy.io import loadmat
    x = loadmat(mirror / "binarized_mnist" / "binarized_mnist_test.mat")["X"][:50]
    amat = tmp_path / "binarized_mnist_test.amat"
    amat.write_text("\n".join(" ".join(map(str, row)) for row in x) + "\n")
    assert np.array_equal(data.read_binarized_mnist_split(amat), x)


def test_mnist_idx_with_labels(mirror, raw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load("mnist", data.fetch("mnist", raw, mirror, allow_download=False))
    assert any("training images not available" in str(w.message) for w in caught)
    assert ds.x_train.shape == (8000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.y_test.shape == (2000, 1) and set(ds.y_test[:, 0].tolist()) == set(range(10))
    assert torch.bincount(torch.cat([ds.y_train, ds.y_test])[:, 0]).tolist()[1] == 1135  # MNIST test: 1135 ones
    assert ds.property_names == ["digit"] and ds.property_K == [10]


def test_omniglot_png_zips_with_seeded_split(mirror, raw):
    ds = data.load("omniglot", data.fetch("omniglot", raw, mirror, allow_download=False))
    assert len(ds.x_train) + len(ds.x_test) == 2720 + 3120
    assert ds.x_train.shape[1:] == (1, 28, 28) and set(ds.x_train.unique().tolist()) == {0, 1}
    assert 0.03 < ds.x_train.float().mean() < 0.2  # thin strokes
    again = data.load("omniglot", data.fetch("omniglot", raw, mirror, allow_download=False))
    assert torch.equal(ds.x_test, again.x_test)


def test_celeba_attribute_file_of_the_mirror_is_rejected(mirror):
    """Its header claims 202599 rows and it holds 20000."""
    with pytest.raises(data.DataError, match="declares 202599 rows but the file holds 20000"):
        data.read_celeba_attributes(mirror / "celeba" / "list_attr_celeba_first20000.txt")


def make_celeba(folder, mirror, n=12, drop=None):
    lines = (mirror / "celeba" / "list_attr_celeba_first20000.txt").read_text().splitlines()
    rows = lines[2:2 + n]
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(n), lines[1]] + rows) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "\n".join(f"{r.split()[0]} {2 if j >= n - 3 else 0}" for j, r in enumerate(rows)) + "\n")
    rng = np.random.default_rng(0)
    for r in rows:
        name = r.split()[0]
        if name != drop:
            Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    return rows


def test_celeba_layout_with_real_attribute_rows(mirror, tmp_path):
    rows = make_celeba(tmp_path / "celeba", mirror)
    folder = data.fetch("celeba", tmp_path / "raw", tmp_path)
    ds = data.load("celeba", folder)
    assert ds.x_train.shape == (9, 3, 64, 64) and ds.x_test.shape == (3, 3, 64, 64) and ds.kind == "rgb"
    x = ds.to_float(ds.x_train)
    assert x.min() >= -1 and x.max() <= 1
    header = (mirror / "celeba" / "list_attr_celeba_first20000.txt").read_text().splitlines()[1].split()
    male = [int(r.split()[1 + header.index("Male")]) > 0 for r in rows]
    assert ds.y_train[:, 0].tolist() == male[:9] and ds.y_test[:, 0].tolist() == male[9:]
    assert ds.property_names == ["Male", "Eyeglasses", "Smiling"]


def test_celeba_missing_image_is_named(mirror, tmp_path):
    make_celeba(tmp_path / "celeba", mirror, drop="000003.jpg")
    with pytest.raises(data.DataError, match="000003.jpg"):
        data.load("celeba", tmp_path / "celeba")


def test_missing_files_error_names_them_and_the_mirror_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FMVAE_DATA_MIRROR", raising=False)
    with pytest.raises(data.DataError, match=r"binarized_mnist_test\.amat.*FMVAE_DATA_MIRROR"):
        data.fetch("binarized_mnist", tmp_path, tmp_path / "empty", allow_download=False)


def test_a_file_failing_its_checksum_is_rejected_and_not_installed(mirror, tmp_path):
    bad = tmp_path / "mirror" / "mnist"
    bad.mkdir(parents=True)
    shutil.copy(mirror / "mnist" / "t10k-labels-idx1-ubyte.gz", bad)
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"not the real file")
    with pytest.raises(data.DataError, match="sha256"):
        data.fetch("mnist", tmp_path / "raw", tmp_path / "mirror", allow_download=False)
    assert not (tmp_path / "raw" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "raw" / "mnist").glob(".*part"))


def test_an_interrupted_copy_leaves_no_file_under_the_final_name(tmp_path):
    class Broken:
        def __init__(self):
            self.n = 0

        def read(self, size=-1):
            self.n += 1
            if self.n > 2:
                raise ConnectionError("connection reset")
            return b"x" * 1000

    with pytest.raises(ConnectionError):
        data._install(Broken(), tmp_path / "file.bin", None)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shapes_and_values_are_rejected(tmp_path):
    f = tmp_path / "x.amat"
    f.write_text("0 1 0\n1 1 0\n")
    with pytest.raises(data.DataError, match="784"):
        data.read_binarized_mnist_split(f)
    f.write_text(" ".join(["2"] * 784) + "\n")
    with pytest.raises(data.DataError, match="0 or 1"):
        data.read_binarized_mnist_split(f)


def test_synthetic_is_deterministic_and_factorial():
    x1, y1 = data.synthetic_images(200, seed=3)
    x2, y2 = data.synthetic_images(200, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1[:, 0].tolist()) == {0, 1, 2} and set(y1[:, 1].tolist()) == {0, 1, 2}
    # the position factor moves the ink's centre of mass left to right
    cols = torch.arange(28).float()
    centre = (x1[:, 0].float().sum(1) * cols).sum(-1) / x1[:, 0].float().sum((1, 2))
    means = [centre[y1[:, 1] == k].mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_semi_supervised_labels_fraction_and_errors():
    y = torch.randint(0, 2, (1000, 3))
    labels = data.semi_supervised_labels(y, 0.4, 5, seed=0)
    observed = (labels[:, :3] >= 0).all(-1)
    assert observed.sum() == 400 and (labels[:, 3:] == -1).all()
    assert torch.equal(labels[observed, :3], y[observed])
    with pytest.raises(ValueError, match="model.I"):
        data.semi_supervised_labels(y, 0.4, 2, seed=0)


def test_celeba_zip_as_distributed_gives_the_same_tensors_as_the_extracted_folder(mirror, tmp_path):
    """A zip of generated JPEGs (the layout of img_align_celeba.zip) loads with no unzip step and
    gives exactly the tensors of the extracted folder."""
    import zipfile
    rows = make_celeba(tmp_path / "folder", mirror, n=36)
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        (packed / name).write_bytes((tmp_path / "folder" / name).read_bytes())
    with zipfile.ZipFile(packed / "img_align_celeba.zip", "w") as zf:
        for r in reversed(rows):  # member order differs from the attribute file's on purpose
            name = r.split()[0]
            zf.write(tmp_path / "folder" / "img_align_celeba" / name, f"img_align_celeba/{name}")
    a = data.load("celeba", data.fetch("celeba", tmp_path / "raw", tmp_path / "folder"))
    b = data.load("celeba", data.fetch("celeba", tmp_path / "raw", tmp_path / "packed"))
    for field in ("x_train", "x_test", "y_train", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.x_train.shape == (33, 3, 64, 64) and a.x_train.dtype == torch.uint8
    assert a.x_train.float().std() > 10  # real pixels, not an empty buffer


def test_celeba_zip_missing_an_image_names_it(mirror, tmp_path):
    import zipfile
    rows = make_celeba(tmp_path / "src", mirror, n=6)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "list_attr_celeba.txt").write_bytes((tmp_path / "src" / "list_attr_celeba.txt").read_bytes())
    with zipfile.ZipFile(tmp_path / "c" / "img_align_celeba.zip", "w") as zf:
        for r in rows[:-1]:
            zf.write(tmp_path / "src" / "img_align_celeba" / r.split()[0], f"img_align_celeba/{r.split()[0]}")
    with pytest.raises(data.DataError, match=rows[-1].split()[0]):
        data.load("celeba", tmp_path / "c")


QUOTA_PAGE = b"""<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head>
<body>Too many users have viewed or downloaded this file recently.</body></html>"""


@pytest.mark.parametrize("dataset,name", [
    ("binarized_mnist", "binarized_mnist_train.amat"),
    ("mnist", "t10k-images-idx3-ubyte.gz"),
    ("omniglot", "images_background_small1.zip"),
    ("celeba", "list_attr_celeba.txt"),
    ("celeba", "img_align_celeba.zip"),
])
def test_an_html_page_saved_under_a_data_file_name_is_refused_naming_it(mirror, tmp_path, dataset, name):
    """What a download script saves when Google Drive says 'Quota exceeded': refused with the
    file's name and what to do, before anything is installed or decoded."""
    fake = tmp_path / "mirror" / dataset
    fake.mkdir(parents=True)
    if dataset == "celeba":  # the other file of the pair is real, so only the HTML one can be blamed
        make_celeba(tmp_path / "real", mirror, n=4)
        (fake / "list_attr_celeba.txt").write_bytes((tmp_path / "real" / "list_attr_celeba.txt").read_bytes())
        (fake / "img_align_celeba").mkdir()
    (fake / name).write_bytes(QUOTA_PAGE)
    raw = tmp_path / "raw"
    with pytest.raises(data.DataError, match=rf"{name}.*HTML page.*mirror"):
        data.load(dataset, data.fetch(dataset, raw, tmp_path / "mirror", allow_download=False))
    assert not (raw / dataset / name).exists()
