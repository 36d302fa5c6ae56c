"""Omniglot: the paper's 28x28 chardata.mat, or the original PNG zips box-filtered to 28x28.

The paper's data (Burda et al.'s chardata.mat) splits *within* characters: of each character's
20 drawings, 15 train and 5 test (1,623 x 15 = 24,345 training drawings). From the PNG zips the
default split (`data.omniglot_split: characters`) does the same, seeded per character: the full
zips give 24,345 / 8,115 drawings (chardata.mat has 8,070 test drawings: it lacks one drawing of
each Glagolitic character). `alphabets` keeps the one-shot benchmark's split instead: the 30
background alphabets train, the 20 evaluation alphabets test (19,280 / 13,180). With only the two
small background subsets (5,840 drawings), `characters` splits them the same way (4,380 / 1,460).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from fmvae.data.core import DataError, Dataset, first_present, images28, refuse_html

OMNIGLOT_SPLITS = ("characters", "alphabets")
TRAIN_PER_CHARACTER = 15  # of each character's 20 drawings, as in chardata.mat


def omniglot_pngs(zip_path: Path) -> tuple[list[str], np.ndarray]:
    """Every drawing of an Omniglot zip: its member name (ALPHABET/characterNN/NNNN_MM.png, the zip's
    top folder dropped) and the image resized 105 -> 28 (box filter), strokes = 1, (N, 784) uint8."""
    from PIL import Image
    refuse_html(zip_path)
    names, out = [], []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            img = Image.open(io.BytesIO(zf.read(name))).convert("L").resize((28, 28), Image.Resampling.BOX)
            names.append(name.split("/", 1)[1] if "/" in name else name)
            out.append((np.asarray(img) < 128).reshape(-1))  # ink is dark on white
    if not out:
        raise DataError(f"{zip_path.name}: no PNG drawings inside")
    return names, np.stack(out).astype(np.uint8)


def character_of(name: str) -> str:
    """ALPHABET/characterNN/NNNN_MM.png -> ALPHABET/characterNN."""
    return name.rsplit("/", 1)[0]


def split_within_characters(names: list[str], seed: int, n_train: int = TRAIN_PER_CHARACTER) -> np.ndarray:
    """A boolean test mask: for each character, a seeded choice of its drawings beyond the first
    n_train of a random order are test drawings. The same seed gives the same split."""
    rng = np.random.default_rng(seed)
    by_character: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_character.setdefault(character_of(name), []).append(i)
    test = np.zeros(len(names), dtype=bool)
    for character in sorted(by_character):  # sorted: the draw does not depend on the zips' order
        members = np.array(by_character[character])
        if len(members) <= n_train:
            raise DataError(f"omniglot: {character} has {len(members)} drawings; the split needs more than {n_train}")
        test[members[rng.permutation(len(members))[n_train:]]] = True
    return test


def load_omniglot(folder: Path, seed: int = 0, split: str = "characters") -> Dataset:
    if split not in OMNIGLOT_SPLITS:
        raise DataError(f"data.omniglot_split: {split!r}; choose one of {', '.join(OMNIGLOT_SPLITS)}")
    chardata = first_present(folder, "chardata.mat")
    if chardata is not None:  # the paper's 28x28 version (split within characters): columns in Fortran order
        from scipy.io import loadmat
        mat = loadmat(chardata)
        to_x = lambda a: (a.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784) > 0.5).astype(np.uint8)
        return Dataset("omniglot", images28(to_x(mat["data"])), images28(to_x(mat["testdata"])), "binary")
    background, evaluation = first_present(folder, "images_background.zip"), first_present(folder, "images_evaluation.zip")
    if split == "alphabets":
        if background is None or evaluation is None:
            raise DataError(f"omniglot: data.omniglot_split 'alphabets' needs images_background.zip and "
                            f"images_evaluation.zip in {folder}")
        return Dataset("omniglot", images28(omniglot_pngs(background)[1]), images28(omniglot_pngs(evaluation)[1]),
                       "binary")
    # the full zips when present (the small subsets are part of images_background.zip), else the subsets
    zips = [p for p in (background, evaluation) if p] or \
        [p for p in (first_present(folder, "images_background_small1.zip"), first_present(folder, "images_background_small2.zip")) if p]
    if not zips:
        raise DataError(f"omniglot: no chardata.mat or images_*.zip in {folder}")
    names, x = [], []
    for path in zips:
        n, images = omniglot_pngs(path)
        names += [f"{path.stem}/{name}" for name in n]  # alphabets are unique to one zip; keep the zip's name anyway
        x.append(images)
    x = np.concatenate(x)
    test = split_within_characters(names, seed)
    return Dataset("omniglot", images28(x[~test]), images28(x[test]), "binary")
