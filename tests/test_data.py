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


@pytest.fixture(scope="module")
def omniglot_folder(mirror, raw):
    return data.fetch("omniglot", raw, mirror, allow_download=False)


def omniglot_names(folder, *zips):
    import zipfile
    names = []
    for z in zips:
        with zipfile.ZipFile(folder / z) as zf:
            names += [f"{z[:-4]}/{n.split('/', 1)[1]}" for n in sorted(zf.namelist()) if n.endswith(".png")]
    return names


def test_omniglot_full_set_splits_each_character_15_train_5_test(omniglot_folder):
    """The paper's split (chardata.mat): 15 drawings of each of the 1,623 characters train, 5 test."""
    ds = data.load("omniglot", omniglot_folder, seed=0)
    assert ds.x_train.shape == (1623 * 15, 1, 28, 28) and ds.x_test.shape == (1623 * 5, 1, 28, 28)
    assert set(ds.x_train.unique().tolist()) == {0, 1} and 0.03 < ds.x_train.float().mean() < 0.2  # thin strokes
    names = omniglot_names(omniglot_folder, "images_background.zip", "images_evaluation.zip")
    test = data.split_within_characters(names, seed=0)
    per_character = {}
    for name, is_test in zip(names, test):
        per_character.setdefault(name.rsplit("/", 1)[0], []).append(is_test)
    assert len(per_character) == 1623
    assert all(len(v) == 20 and sum(v) == 5 for v in per_character.values())
    assert np.array_equal(test, data.split_within_characters(names, seed=0))      # same seed, same split
    assert not np.array_equal(test, data.split_within_characters(names, seed=1))  # another seed, another
    # no drawing on both sides: each name is one side's, and the images follow the names
    assert len(set(names)) == len(names) == 32460
    again = data.load("omniglot", omniglot_folder, seed=0)
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.x_train, again.x_train)


def test_omniglot_alphabet_split_is_the_option_of_the_one_shot_benchmark(omniglot_folder):
    ds = data.load("omniglot", omniglot_folder, seed=0, omniglot_split="alphabets")
    assert ds.x_train.shape[0] == 19280 and ds.x_test.shape[0] == 13180


def test_omniglot_small_subsets_alone_split_within_characters(mirror, tmp_path):
    for z in ("images_background_small1.zip", "images_background_small2.zip"):
        (tmp_path / z).symlink_to((mirror / "omniglot" / z).resolve())
    ds = data.load("omniglot", tmp_path, seed=0)
    assert len(ds.x_train) == 5840 // 20 * 15 and len(ds.x_test) == 5840 // 20 * 5
    with pytest.raises(data.DataError, match="images_evaluation.zip"):
        data.load("omniglot", tmp_path, seed=0, omniglot_split="alphabets")


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


def real_celeba_zip(mirror, folder, n_listed=40, n_present=25):
    """A CelebA folder whose attribute file lists n_listed real rows (the full file's, for the
    mirror's images) and whose zip holds the first n_present of those real JPEGs."""
    import zipfile
    src = mirror / "celeba"
    with zipfile.ZipFile(src / "img_align_celeba.zip") as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[:n_listed]
        blobs = {m: zf.read(m) for m in members[:n_present]}
    listed = {m.split("/")[-1] for m in members}
    lines = src.joinpath("list_attr_celeba.txt").read_text().splitlines()
    rows = [ln for ln in lines[2:] if ln.split()[0] in listed]
    folder.mkdir(parents=True)
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(rows)), lines[1]] + rows) + "\n")
    partition = src.joinpath("list_eval_partition.txt").read_text().splitlines()
    (folder / "list_eval_partition.txt").write_text("\n".join(ln for ln in partition if ln.split()[0] in listed) + "\n")
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as zf:
        for m, b in blobs.items():
            zf.writestr(m, b)
    return rows, [m.split("/")[-1] for m in blobs]


def test_celeba_partial_set_is_refused_by_default_and_loaded_when_asked(mirror, tmp_path):
    rows, present = real_celeba_zip(mirror, tmp_path / "c")
    with pytest.raises(data.DataError, match=r"15 of the 40 images .* data\.partial: true"):
        data.load("celeba", tmp_path / "c")
    ds = data.load("celeba", tmp_path / "c", partial=True)
    assert len(ds.x_train) + len(ds.x_test) == 25
    assert ds.info["listed"] == 40 and ds.info["absent"] == 15 and ds.info["loaded"] == 25
    assert ds.info["train_images"] == len(ds.x_train) and ds.info["test_images"] == len(ds.x_test)
    assert sum(ds.info["partition_counts"].values()) == 25
    names = (tmp_path / "c" / "list_attr_celeba.txt").read_text().splitlines()[1].split()
    male = {r.split()[0]: int(r.split()[1 + names.index("Male")]) > 0 for r in rows}
    assert sorted(ds.y_train[:, 0].tolist() + ds.y_test[:, 0].tolist()) == sorted(male[f] for f in present)


def test_the_mirror_s_real_celeba_images_load_as_a_partial_set(mirror):
    """The mirror's 20,000 real faces: 15,360 training-partition and 4,640 test-partition images,
    64x64 RGB in [-1, 1], and each property's rate that of the attribute file for those images."""
    ds = data.load("celeba", mirror / "celeba", partial=True)
    assert ds.x_train.shape == (15360, 3, 64, 64) and ds.x_test.shape == (4640, 3, 64, 64)
    assert ds.info["listed"] == 202599 and ds.info["absent"] == 202599 - 20000
    assert ds.info["partition_counts"] == {"train": 15360, "valid": 0, "test": 4640}
    x = ds.to_float(ds.x_test[:500])
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2
    import zipfile
    with zipfile.ZipFile(mirror / "celeba" / "img_align_celeba.zip") as zf:
        present = {n.split("/")[-1] for n in zf.namelist() if n.endswith(".jpg")}
    lines = (mirror / "celeba" / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.split()[0] in present]
    y = torch.cat([ds.y_train, ds.y_test])
    for p, attribute in enumerate(("Male", "Eyeglasses", "Smiling")):
        positives = sum(int(r[1 + names.index(attribute)]) > 0 for r in rows)  # the file's rate, as a count
        assert int(y[:, p].sum()) == positives


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
        data.install(Broken(), tmp_path / "file.bin", None)
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
