"""CelebA's section 4.2 artifacts (fmvae/reporting/celeba.py): scores, NMI, the 40-attribute alignment,
Figure 6's columns, and a tiny `celeba_cpu` run through `dvc exp run` and stages/celeba_table.py."""
import json
import types

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fmvae import data
from fmvae.core.distributions import normal_gamma as ng
from fmvae.core.model import FMVAE
from fmvae.data.core import Dataset
from fmvae.params import validate
from fmvae.reporting import celeba as cr
from helpers import ROOT, copy_project, run, tiny_params

matplotlib.use("Agg")


def test_property_scores_balanced_accuracy_sees_through_a_majority_guess():
    """Always 'no glasses' on 7% positives: accuracy 0.93, balanced accuracy 0.5, baseline 0.93."""
    true = [1] * 7 + [0] * 93
    assert cr.property_scores([0] * 100, true) == {"accuracy": 0.93, "balanced_accuracy": 0.5, "majority_baseline": 0.93}
    # right on every positive, wrong on 3 of the 93 negatives: recalls 1 and 90/93
    pred = [1] * 7 + [1] * 3 + [0] * 90
    assert cr.property_scores(pred, true)["balanced_accuracy"] == pytest.approx((1 + 90 / 93) / 2)


def test_nmi_of_a_copy_is_one_of_an_independent_factor_about_zero():
    rng = np.random.default_rng(0)
    attribute = rng.integers(0, 2, 20000)
    relabelled = np.where(attribute == 1, 7, 3)  # a factor whose components copy the attribute
    assert cr.normalized_mutual_information(relabelled, attribute) == pytest.approx(1.0)
    assert cr.normalized_mutual_information(rng.integers(0, 64, 20000), attribute) < 0.01
    assert cr.normalized_mutual_information(np.zeros(100), attribute[:100]) == 0.0
    # by hand: a = b on 3 of 4 points; I = H(b) - H(b|a), both halves split 1:1 and 2:0
    a, b = [0, 0, 1, 1], [0, 0, 0, 1]
    h_a, h_b = np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mi = h_b - 0.5 * np.log(2)
    assert cr.normalized_mutual_information(a, b) == pytest.approx(mi / ((h_a + h_b) / 2))
    table = cr.factor_attribute_nmi(torch.tensor(np.stack([relabelled, relabelled * 0], 1)),
                                    np.stack([attribute, 1 - attribute], 1), ["A", "notA"])
    assert table.loc["factor 0"].tolist() == pytest.approx([1.0, 1.0]) and table.loc["factor 1"].tolist() == [0.0, 0.0]


def signposted_model(K=(2, 2, 2, 3, 3), D=2):
    """A CelebA-shaped model whose prior components sit far apart with tiny variance (component k of
    factor i at 10 i + k) and whose decoder paints each factor's mean z into one row of pixels, so
    that an image shows which components drew it."""
    model = FMVAE("conv64", (3, 64, 64), list(K), D, channels=(4, 4, 4, 4))
    I, k_max = len(K), max(K)
    m = (10.0 * torch.arange(I)[:, None, None] + torch.arange(k_max)[None, :, None]).expand(I, k_max, D).double()
    full = lambda v: torch.full((I, k_max, D), v, dtype=torch.float64)
    model.prior.lam.copy_(ng.natural_from_mean(m, full(1e4), full(1e4), full(1e-2)))

    def paint(z):
        rows = z.view(len(z), I, D).mean(-1)  # (n, I): 10 i + k_i
        img = torch.zeros(len(z), 3, 64, 64)
        img[:, :, :I, :] = rows[:, None, :, None]
        return img
    model.decoder.mean = paint
    return model


def test_figure6_columns_follow_the_paper_s_order_and_rows_hold_the_free_factors(tmp_path):
    model = signposted_model()
    ds = Dataset("celeba", torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
                 "rgb", property_names=["Male", "Eyeglasses", "Smiling"], property_K=[2, 2, 2])
    torch.manual_seed(0)
    path, cells, settings = cr.figure6(model, ds, tmp_path / "f6.png", rows=5)
    assert path.stat().st_size > 0 and cells.shape == (5, 8, 3, 64, 64)
    _, titles = cr.property_columns(ds.property_names)
    assert titles == ["(m,g,s)", "(m,g,ns)", "(m,ng,s)", "(m,ng,ns)", "(f,g,s)", "(f,g,ns)", "(f,ng,s)", "(f,ng,ns)"]
    drawn = (cells[:, :, 0, :5, 0] - 10.0 * torch.arange(5)).round().long()  # (rows, cols, I): each factor's k
    for c, title in enumerate(titles):  # value 1 is m, g, s (the attribute file's +1)
        male, glasses, smiling = (title[1:-1].split(",")[j] in ("m", "g", "s") for j in range(3))
        assert (drawn[:, c, :3] == torch.tensor([male, glasses, smiling])).all(), title
    assert (drawn[:, :, 3:] == drawn[:, :1, 3:]).all()  # k4, k5 held along each row
    assert len({tuple(r) for r in drawn[:, 0, 3:].tolist()}) > 1  # and drawn again per row
    # the row's z of the free factors is held too, not only its components
    assert torch.equal(cells[:, :, 0, 3:5, 0], cells[:, :1, 0, 3:5, 0].expand(-1, 8, -1))


def test_factor_figure_iterates_one_factor_s_heaviest_components(tmp_path):
    model = signposted_model()
    model.prior.c[4, :3] = torch.tensor([5.0, 50.0, 20.0], dtype=torch.float64)
    ds = Dataset("celeba", torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
                 "rgb", property_names=["Male", "Eyeglasses", "Smiling"], property_K=[2, 2, 2])
    _, cells = cr.factor_figure(model, ds, 4, tmp_path / "f8.png", n_components=3, rows=4)
    drawn = (cells[:, :, 0, :5, 0] - 10.0 * torch.arange(5)).round().long()
    assert (drawn[:, :, 4] == torch.tensor([1, 2, 0])).all()  # heaviest first
    assert (drawn[:, :, :4] == drawn[:, :1, :4]).all()
    cr.figure5(model, ds, tmp_path / "f5.png")
    assert (tmp_path / "f8.png").stat().st_size > 0 and (tmp_path / "f5.png").stat().st_size > 0


def test_factor_swap_flips_the_judge_only_through_factors_the_decoder_reads():
    """Encodings sit at their labels' components; a decoder that paints factors 0 and 2 but not 1
    (it draws factor 1 as 'no glasses' whatever z_1 is): reconstructions agree with the labels
    except Eyeglasses = 1, moving factor 0 or 2 flips the judge every time, moving factor 1 never
    shows glasses (and 'removes' them only where they were not drawn to begin with)."""
    model = signposted_model()
    I, D, n = 5, 2, 40
    y = torch.stack([torch.arange(n) % 2, (torch.arange(n) // 2) % 2, (torch.arange(n) // 4) % 2], 1)
    ds = Dataset("celeba", torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(n, 3, 64, 64, dtype=torch.uint8),
                 "rgb", y_test=y, property_names=["Male", "Eyeglasses", "Smiling"], property_K=[2, 2, 2])
    k = torch.cat([y, torch.zeros(n, 2, dtype=torch.long)], 1)  # free factors at component 0
    mu = (10.0 * torch.arange(I) + k).unsqueeze(-1).expand(n, I, D) + 0.01 * torch.randn(n, I, D)
    model.encode = lambda x: (mu[:len(x)], torch.zeros(len(x), I, D))

    def paint(z):  # row i: 0.5 k_i, except row 1, never painted
        k_drawn = z.view(len(z), I, D).mean(-1) - 10.0 * torch.arange(I)
        img = torch.zeros(len(z), 3, 64, 64)
        img[:, :, :I, :] = 0.5 * k_drawn[:, None, :, None]
        img[:, :, 1, :] = 0.0
        return img
    model.decoder.mean = paint

    def judge(img):  # reads each labelled factor's row back
        k_seen = 2 * img[:, 0, :3, 0]
        return [torch.stack([-(k_seen[:, p] - 0) ** 2, -(k_seen[:, p] - 1) ** 2], -1) for p in range(3)]
    rows = {r["property"]: r for r in cr.factor_swap(model, judge, ds, batch=16)}
    assert rows["Male"]["judge_on_reconstructions"] == 1.0 and rows["Smiling"]["judge_on_reconstructions"] == 1.0
    assert rows["Male"]["judge_sees_factor_swap"] == 1.0 and rows["Smiling"]["judge_sees_factor_swap"] == 1.0
    assert rows["Eyeglasses"]["judge_on_reconstructions"] == pytest.approx(0.5)  # the glasses wearers are lost
    assert rows["Eyeglasses"]["judge_sees_factor_swap"] == pytest.approx(0.5)  # 'removing' them looks right...
    assert rows["Eyeglasses"]["swap_per_value"] == "0:1.00 1:0.00"  # ...adding them never works
    assert rows["Male"]["swap_per_value"] == "0:1.00 1:1.00"


def test_the_table_trains_the_run_s_judge_again_on_the_run_s_thread_count(tmp_path, monkeypatch):
    """stages/celeba_table.py's factor_swap trains the judge on the thread count the run recorded in
    its provenance.json (on another count it is another judge: the swap shares move by up to 0.017),
    gives the caller its own count back, and refuses a judge whose test accuracy is not the run's,
    writing nothing."""
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    import celeba_table
    seen = []

    def cached_judge(ds, iters, seed):
        seen.append((torch.get_num_threads(), iters, seed))
        return "the judge", [0.931, 0.970, 0.885]
    monkeypatch.setattr(celeba_table, "show", lambda rev, path: json.dumps({"host": {"torch_threads": 1}}).encode())
    monkeypatch.setattr(celeba_table, "cached_judge", cached_judge)
    monkeypatch.setattr(celeba_table.cr, "factor_swap",
                        lambda model, judge, ds: [{"property": p, "judged_by": judge} for p in ds.property_names])
    ds = types.SimpleNamespace(property_names=["Male", "Eyeglasses", "Smiling"])
    params = validate({"properties": {"judge_iters": 7}, "seed": 3})
    props = {"judge_acc_Male": 0.931, "judge_acc_Eyeglasses": 0.965, "judge_acc_Smiling": 0.885}
    caller = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = celeba_table.factor_swap("run", "rev", params, props, None, ds, tmp_path / "swap.json")
        assert seen == [(1, 7, 3)] and torch.get_num_threads() == 2
        assert json.loads((tmp_path / "swap.json").read_text())["rows"] == rows
        assert [r["judged_by"] for r in rows] == ["the judge"] * 3
        with pytest.raises(SystemExit, match="Eyeglasses test accuracy 0.9700, the run's reached 0.9500"):
            celeba_table.factor_swap("run", "rev", params, props | {"judge_acc_Eyeglasses": 0.95}, None, ds,
                                     tmp_path / "other.json")
        assert not (tmp_path / "other.json").exists() and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller)


def small_celeba(mirror, dest, n_train=150, n_test=50):
    """A complete CelebA folder of the mirror's first real training and test images."""
    from fmvae.tools.gpu_check import celeba as gpu_check
    gpu_check.make_celeba_subset(mirror / "celeba", dest, n_train, n_test)
    return dest


def test_the_40_attributes_of_the_test_images_line_up_with_the_prepared_ones(mirror, tmp_path):
    folder = small_celeba(mirror, tmp_path / "celeba", 30, 20)
    ds = data.load("celeba", folder, partial=True)
    names, values = cr.attributes_of_test_images(folder, ds)
    assert len(names) == 40 and values.shape == (20, 40)
    rows = {ln.split()[0]: ln.split()[1:] for ln in (folder / "list_attr_celeba.txt").read_text().splitlines()[2:]}
    tests = [f for f, p in (ln.split() for ln in (folder / "list_eval_partition.txt").read_text().splitlines()) if p == "2"]
    young = [int(rows[f][names.index("Young")]) > 0 for f in sorted(tests)]
    assert values[:, names.index("Young")].tolist() == young
    ds.y_test[3, 0] = 1 - ds.y_test[3, 0]  # a data set prepared from another selection
    with pytest.raises(data.DataError, match="do not match"):
        cr.attributes_of_test_images(folder, ds)


def test_a_tiny_celeba_cpu_experiment_and_its_table(mirror, tmp_path):
    """The celeba_cpu preset (shrunk by -S overrides) through `dvc exp run`, then
    stages/celeba_table.py on it: the table quotes the run's own properties.json and adds balanced
    accuracy and the majority baseline; every figure and the NMI table are written; a variant is added
    alone, then the table regrouped around it with the former main run's rows taken as committed."""
    small_celeba(mirror, tmp_path / "mirror" / "celeba")
    root = copy_project(tmp_path / "project", tiny_params())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    run(git + ["add", "-A"], root)
    run(git + ["commit", "-qm", "project"], root)
    shrink = {"model.channels": [4, 8, 8, 8], "model.D": 4, "model.K": [2, 2, 2, 3, 3], "pretrain.iters": 20,
              "prior_init.iters": 5, "prior_init.init_points": 150, "joint.iters": 20, "joint.kl_z_anneal_iters": 10,
              "joint.snapshots": 2, "joint.snapshot_every": 5, "properties.judge_iters": 20, "properties.samples": 32,
              "plot.samples_per_cell": 2}
    extra = [a for k, v in shrink.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    env = {"FMVAE_DATA_MIRROR": str(tmp_path / "mirror"), "OMP_NUM_THREADS": "1"}
    run(["python", "stages/preset.py", "celeba_cpu", *extra], root, env_extra=env, timeout=900)
    committed = (root / "reports/celeba_table.csv").read_bytes()  # the project's own, copied with it
    refused = run(["python", "stages/celeba_table.py", "celeba_cpu", "--variant", "celeba_cpu"], root, check=False,
                  env_extra=env, timeout=300)  # a variant that changed nothing would sit outside the mean for no reason
    assert refused.returncode != 0 and "changed only the seed" in refused.stderr
    assert (root / "reports/celeba_table.csv").read_bytes() == committed  # refused before anything was written
    assert (root / "reports/celeba/celeba_cpu_seed1").is_dir()
    res = run(["python", "stages/celeba_table.py", "celeba_cpu"], root, env_extra=env, timeout=600)
    assert "celeba_cpu" in res.stdout
    assert not (root / "reports/celeba/celeba_cpu_seed1").exists()  # a run no longer in the table leaves
    table = pd.read_csv(root / "reports/celeba_table.csv")
    runs = table[table["run"] == "celeba_cpu"]
    props = json.loads((root / "reports/celeba/celeba_cpu/properties.json").read_text())
    assert runs["property"].tolist() == ["Male", "Eyeglasses", "Smiling"]
    for r in runs.itertuples():
        assert r.accuracy_argmax_q_r == props[f"acc_{r.property}"] and r.test_images == 50 and r.train_images == 150
        assert 0 <= r.balanced_accuracy <= 1 and 0.5 <= r.majority_baseline <= 1
    used = yaml.safe_load((root / "reports/celeba/celeba_cpu/params.yaml").read_text())
    assert used["model"]["channels"] == [4, 8, 8, 8] and used["data"]["partial"] is True
    for name in ("figure6.png", "figure8_factor3.png", "figure8_factor4.png", "figure5.png",
                 "factor_attribute_nmi.png", "dvc.lock", "samples_grid.png"):
        assert (root / "reports/celeba/celeba_cpu" / name).stat().st_size > 0, name
    nmi = pd.read_csv(root / "reports/celeba_factors.csv")
    assert nmi.shape == (5, 3 + 40) and nmi["Male"].between(0, 1).all()
    assert runs["judge_on_reconstructions"].between(0, 1).all() and runs["judge_sees_factor_swap"].between(0, 1).all()
    swap_file = root / "reports/celeba/celeba_cpu/factor_swap.json"
    swap = json.loads(swap_file.read_text())
    assert [r["property"] for r in swap["rows"]] == ["Male", "Eyeglasses", "Smiling"]
    # the same run and code again: the judge is not trained again, the rows are read back
    again = run(["python", "stages/celeba_table.py", "celeba_cpu"], root, env_extra=env, timeout=600)
    assert "read back" in again.stdout and json.loads(swap_file.read_text()) == swap
    # rows left by other code (its key differs) are computed again, never quoted
    swap_file.write_text(json.dumps({"key": "other code", "rows": [dict(r, judge_sees_factor_swap=7.0)
                                                                   for r in swap["rows"]]}))
    third = run(["python", "stages/celeba_table.py", "celeba_cpu"], root, env_extra=env, timeout=600)
    assert "read back" not in third.stdout and json.loads(swap_file.read_text()) == swap
    assert pd.read_csv(root / "reports/celeba_table.csv")["judge_sees_factor_swap"].between(0, 1).all()
    # a variant added alone (its seeds' models need not exist): the main table stays byte for byte, the
    # variant's rows name what it changed, and its files join the table's folders
    main = (root / "reports/celeba_table.csv").read_bytes()
    run(["python", "stages/preset.py", "celeba_cpu", "-n", "celeba_swap", *extra, "-S", "semi.swap_weight=1.0"], root,
        env_extra=env, timeout=900)
    res = run(["python", "stages/celeba_table.py", "celeba_cpu", "--only-variants", "--variant", "celeba_swap"], root,
              env_extra=env, timeout=600)
    assert (root / "reports/celeba_table.csv").read_bytes() == main
    variants = pd.read_csv(root / "reports/celeba_variants.csv")
    assert variants["run"].tolist() == ["celeba_swap"] * 3 and (variants["changed"] == "semi.swap_weight=1.0").all()
    props = json.loads((root / "reports/celeba/celeba_swap/properties.json").read_text())
    assert variants["judge_agreement_clamped_samples"].tolist() == [props[f"agreement_{p}"] for p in variants["property"]]
    assert (root / "reports/celeba/celeba_swap/figure6.png").stat().st_size > 0
    # a preset that adopts what a variant changed regroups the table: the variant becomes the main row, the
    # former main run a variant whose rows and NMI come from the committed tables (its model need not be here)
    before = (root / "reports/celeba_table.csv").read_bytes()
    old = pd.read_csv(root / "reports/celeba_table.csv").query("run == 'celeba_cpu'").reset_index(drop=True)
    refused = run(["python", "stages/celeba_table.py", "celeba_swap", "--variant", "celeba_cpu", "--committed",
                   "celeba_swap", "celeba_cpu"], root, check=False, env_extra=env, timeout=300)
    assert refused.returncode != 0 and "celeba_factors.csv" in refused.stderr  # a main run needs its NMI
    assert (root / "reports/celeba_table.csv").read_bytes() == before
    run(["python", "stages/celeba_table.py", "celeba_swap", "--variant", "celeba_cpu", "--committed", "celeba_cpu"],
        root, env_extra=env, timeout=600)
    table = pd.read_csv(root / "reports/celeba_table.csv")
    assert set(table.dropna(subset=["seed"])["run"]) == {"celeba_swap"}
    regrouped = pd.read_csv(root / "reports/celeba_variants.csv")
    assert regrouped["run"].tolist() == ["celeba_cpu"] * 3 and (regrouped["changed"] == "semi.swap_weight=10.0").all()
    for col in ("accuracy_argmax_q_r", "balanced_accuracy", "judge_agreement_clamped_samples", "judge_sees_factor_swap",
                "test_elbo"):
        assert regrouped[col].tolist() == old[col].tolist(), col
    assert set(pd.read_csv(root / "reports/celeba_factors.csv")["run"]) == {"celeba_swap"}
