"""The prepared GPU check: `python -m fmvae.tools.gpu_check --data DIR --out OUT_DIR [--budget-s S] [--tiny]`.

One process, no dvc, no ray, no network. On the GPU at hand it
  1. prints the device, torch version and the benchmark table (fmvae.tools.bench: plain vs joint
     step; eager, CUDA graph and compiled; bf16 off and on; K = 2, 64, 512; CelebA-shaped);
  2. trains binarised MNIST (read from DIR: the mirror's three MAT files) with the
     `mnist_paper` preset (I = 1, K = 512, D = 64, batch 64, Adam 1e-4, tau0 = 2000,
     kappa = 0.7; 1e5 + 2e4 + 2e5 iterations) through the fastest step the benchmark found,
     scaling the three phases down by one factor when the full schedule would not fit
     the training budget (said, and recorded);
  3. evaluates the test bound (11) with its parts, IWAE (1000 samples on 1000 test points),
     components in use, and draws the Figure 4 and sample-grid figures;
  4. writes metrics.json, bench.json, the curves, the figures and summary.md into OUT_DIR
     (each file as soon as it exists, so a run cut short still leaves what it finished),
     and prints the summary last.
`--tiny` runs the same code path on the CPU in seconds (a test does).

`--celeba DIR` runs the paper's semi-supervised CelebA model instead (`celeba_paper` preset: I = 5,
K = (2, 2, 2, 64, 64), D = 64, the 128-256-512-1024 networks; Male, Eyeglasses and Smiling clamp
factors 0 to 2 on 40% of the training images), on the images DIR holds (a partial set is loaded
as such and its counts recorded), scaled to the budget by the benchmark's CelebA rates as for
MNIST; it writes the test bound, per property the accuracy of argmax q(r_i|x), its balanced
accuracy and the majority baseline, the judge's agreement with clamped samples (Table 1's set-up)
and the judge's own accuracy, sample grids and summary.md. What travels to a lent GPU is at most
64 MiB, so `--make-celeba-subset SRC DEST --train N --test M` first writes a CelebA folder of the
first N training-partition and M test-partition images of SRC (a zip of their JPEGs, the attribute
and partition files for exactly those), about 7 kB an image.

    cli.py      the arguments and the device; common.py  the benchmark, the schedule, one phase
    mnist.py    the default check;  celeba.py  --celeba;  figure3.py  --figure3;  orders.py  --orders
"""
