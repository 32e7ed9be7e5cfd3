"""Benchmark: the linear-probe evaluation at cohort size, old against new, in one run.

Synthetic data of the issue's sizes (seeded):

* classification: 871 subjects (403 / 468, like ABIDE-I) x 6,105 features: Fisher-z
  functional connectivity of 111 parcels from random time series with a shared
  structure, a weak diagnosis effect on a few hundred edges;
* regression: 20,000 subjects x 768 features (embedding-like: correlated Gaussian
  features), a target linear in 50 of them plus noise.

Each job runs the default protocol of ``evaluate.*`` (5 folds x 10 repeats, 200
label permutations within the first repeat's folds, the penalty chosen on inner
folds) in a fresh spawned process with 2 threads, reporting wall time, CPU time (both
threads; on a shared machine the wall time also counts waiting for a core) and peak RSS:

``new``
    :func:`bh_models.evaluation.permutation.observed_and_permuted`: every repeat
    once, the first repeat's fits shared by the observed labels (column 0) and the
    permutations; the Newton-CG logistic solver.
``old``
    the probe of ``--old-ref`` (default ``72a5fce^``, the last commit before the Newton-CG probe;
    ``git show <ref>:bh_models/evaluation/probe.py``),
    called as the evaluation called it: every repeat with the observed labels, then
    the first repeat again with the observed and permuted labels. Its full classification
    run takes hours at this size, so by default it is timed on the first outer split
    of each call and extrapolated (x the number of splits); ``--old-full`` runs the whole
    protocol of every task, ``--old-full regression`` of that task only.
    Its peak memory is measured (the first split holds the largest arrays). Its
    permutation split is the slowest part (the solver builds an n x (r+1)^2 array and a
    (columns x (r+1)^2) Hessian batch); ``--old-columns K`` times it on K permutation
    columns and scales linearly to 200.

The new and old held-out scores of the splits both ran are compared.

    python benchmarks/bench_probe.py [--old-full [KIND ...]] [--old-columns K] [--skip-regression] [--only KIND:VERSION ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

THREADS = 2
N_FOLDS, N_REPEATS, N_PERMUTATIONS = 5, 10, 200
OLD_REF = "72a5fce^"  # the probe before "Evaluation at cohort size (issue 20.5)"


def classification_data(seed: int = 0):
    import numpy as np

    from bh_models.evaluation.baselines import connectivity_features

    rng = np.random.default_rng(seed)
    n, parcels, frames = 871, 111, 120
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, 403, replace=False)] = 1
    mixing = rng.normal(size=(parcels, 12))  # shared network structure
    effect = np.zeros((parcels, 12))
    effect[:20, :3] = 0.25  # the diagnosis strengthens a few networks' coupling
    features = np.empty((n, parcels * (parcels - 1) // 2))
    for i in range(n):
        sources = rng.normal(size=(frames, 12))
        series = sources @ (mixing + y[i] * effect).T + 2.0 * rng.normal(size=(frames, parcels))
        features[i] = connectivity_features(timeseries=series)
    return features, y


def regression_data(seed: int = 1):
    import numpy as np

    rng = np.random.default_rng(seed)
    n, d = 20_000, 768
    basis = rng.normal(size=(64, d))
    features = rng.normal(size=(n, 64)) @ basis + rng.normal(size=(n, d))
    y = features[:, :50] @ rng.normal(size=50) * 0.05 + rng.normal(size=n)
    return features, y


def _load_old(ref: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:bh_models/evaluation/probe.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bh_old_probe_")) / "probe_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("probe_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_old"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _job(queue, kind: str, version: str, old_ref: str, full: bool, old_columns: int) -> None:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from bh_models.core.step import limit_threads
    from bh_models.evaluation import permutation, probe

    limit_threads(THREADS)
    features, y = classification_data() if kind == "classification" else regression_data()
    task = kind
    splits = probe.make_splits(y=y, task_type=task, n_folds=N_FOLDS, n_repeats=N_REPEATS, seed=0)
    row_subject = np.arange(len(y))
    metric = probe.PRIMARY_METRIC[task]
    started = time.perf_counter()
    cpu_started = time.process_time()
    note = ""
    with threadpool_limits(limits=THREADS):
        if version == "new":
            def score(labels, folds):
                return probe.cross_validated_scores(features=features, row_subject=row_subject, labels=labels,
                                                    splits=folds, task_type=task, threads=THREADS)
            observed, test = permutation.observed_and_permuted(
                score=score, y=y, splits=splits, task_type=task, metric=metric, n_permutations=N_PERMUTATIONS,
                seed=7)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            compare = observed.scores[0, :, 0]
            note = f"p = {test.p_value:.4f}, observed {metric} {test.observed:.3f}"
        else:
            old = _load_old(old_ref)
            first = [s for s in splits if s.repeat == 0]
            labels = permutation.permuted_labels(y=y, blocks=probe.fold_of_subjects(splits=first),
                                                 n_permutations=N_PERMUTATIONS, seed=7)
            chosen_obs = splits if full else splits[:1]
            chosen_perm = first if full else first[:1]
            columns = labels.shape[1] if full else min(labels.shape[1], old_columns + 1)
            t0, c0 = time.perf_counter(), time.process_time()
            observed = old.cross_validated_scores(features=features, row_subject=row_subject, labels=y,
                                                  splits=chosen_obs, task_type=task, threads=THREADS)
            t_obs, c_obs = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            old.cross_validated_scores(features=features, row_subject=row_subject, labels=labels[:, :columns],
                                       splits=chosen_perm, task_type=task, threads=THREADS)
            t_perm, c_perm = time.perf_counter() - t0, time.process_time() - c0
            # The old solver's cost is linear in the label columns (each column's Hessian is a row of
            # a (columns x (r+1)^2) product, solved on its own), so scale to all of them.
            t_perm *= labels.shape[1] / columns
            c_perm *= labels.shape[1] / columns
            if full:
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
                note = f"the whole protocol, run ({len(splits)} observed and {len(first)} permutation splits)"
            else:
                elapsed = t_obs * len(splits) + t_perm * len(first)
                cpu = c_obs * len(splits) + c_perm * len(first)
                note = (f"timed on 1 of {len(splits)} observed splits ({t_obs:.1f} s) and 1 of {len(first)} "
                        f"permutation splits with {columns} of {labels.shape[1]} label columns "
                        f"({t_perm:.1f} s scaled to all columns), extrapolated")
            compare = np.full(len(y), np.nan)
            compare[splits[0].test] = observed.scores[0, splits[0].test, 0]
    queue.put((elapsed, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, note, compare))


def run(kind: str, version: str, old_ref: str, full: bool, old_columns: int):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_job, args=(queue, kind, version, old_ref, full, old_columns))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-ref", default=OLD_REF, help=f"git ref of the old probe (default {OLD_REF})")
    parser.add_argument("--old-full", nargs="*", default=None, metavar="KIND",
                        help="run the old probe's whole protocol, of these tasks (none named: all); "
                             "classification takes hours")
    parser.add_argument("--skip-regression", action="store_true")
    parser.add_argument("--old-columns", type=int, default=200,
                        help="permutation columns of the old probe's timed permutation split (default all 200; "
                             "its time is scaled linearly to 200)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these jobs, e.g. classification:old regression:new")
    args = parser.parse_args()
    import numpy as np

    print(f"default protocol: {N_FOLDS} folds x {N_REPEATS} repeats, {N_PERMUTATIONS} permutations, "
          f"{THREADS} threads\n")
    print(f"{'job':<48}{'minutes':>9}{'CPU min':>9}{'peak GB':>9}  note")
    kinds = ["classification"] + ([] if args.skip_regression else ["regression"])
    for kind in kinds:
        label = "871 x 6,105 classification" if kind == "classification" else "20,000 x 768 regression"
        results = {}
        full = args.old_full is not None and (not args.old_full or kind in args.old_full)
        for version in ("new", "old"):
            if args.only is not None and f"{kind}:{version}" not in args.only:
                continue
            elapsed, cpu, peak, note, compare = run(kind, version, args.old_ref, full, args.old_columns)
            results[version] = (elapsed, peak, compare, cpu)
            print(f"{label + ', ' + version:<48}{elapsed / 60:9.2f}{cpu / 60:9.2f}{peak / 1024:9.2f}  {note}",
                  flush=True)
        if len(results) < 2:
            continue
        new, old = results["new"], results["old"]
        both = np.isfinite(old[2])
        diff = np.abs(new[2][both] - old[2][both]).max()
        print(f"{label}: new/old time {new[0] / old[0]:.3f}, CPU time {new[3] / old[3]:.3f}, peak {new[1] / old[1]:.2f}; largest difference "
              f"of the first split's held-out scores {diff:.2e}\n", flush=True)


if __name__ == "__main__":
    main()
