"""Ray Tune sweeps over K, seeds and I, on one machine or a Ray cluster, with all their state in one storage.

The storage is a local folder (default checkpoints/sweep) or any URI Ray Tune and pyarrow accept
(s3://bucket/path, gs://..., file:///...). Everything a trial needs or leaves is there:
    data/<dataset>-s<seed>-<fp>.pt                  each (data set, trial seed) prepared once by the driver
    pretrain/<dataset>-I<I>-D<D>-s<seed>-<fp>.pt    K-independent pre-training, published once by its own Tune trial
    finished/<dataset>-I<I>-K<K>-s<seed>-<fp>.json  a finished trial's record (what a later sweep reuses)
    ray/fmvae-pretrain-<fp>/, ray/fmvae-<dataset>[+<dataset>...]-<fp>/
                                                    the two Tune experiments (pre-trainings, then the K trials):
                                                    trial checkpoints (tune.Checkpoint) and Tune's own state
Trials never open the driver's disk: a trial fetches the files it reads from the storage into a
per-node cache (FMVAE_CACHE, default ~/.cache/fmvae; locked, atomic), trains in its Tune trial folder
and reports that folder to Tune as its checkpoint whenever training has saved one, so a trial
rescheduled on another node (a lost node, a retried failure) resumes from its last reported checkpoint
and, resume being bitwise, ends with the numbers of an uninterrupted run. results.csv is built from
Tune's results.

Every <fp> is a fingerprint of all the params the thing depends on (not a hand-picked subset), of the
source that trains and evaluates (provenance.code_digest) and of the sweep's own (fmvae/sweep): a trial whose effective params
are unchanged is reused without training, one whose params changed trains anew, and pre-training is
shared only between trials whose pre-training params match. Each Ray experiment is named after its
trials' fingerprints, so Tuner.restore never hands back results of other params.

    keys.py        the params each piece reads, its fingerprint and name; the grids
    storage.py     the storage (any pyarrow file system) and the per-node cache
    trainables.py  what runs inside a Tune trial (a pre-training, a K trial, a pack)
    driver.py      run_sweep: data, Ray, the two Tune experiments, the rows; the pre-training report
"""
