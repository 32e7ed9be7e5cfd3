"""Benchmark: which denoising strategy should be the default? Every strategy on the demo cohort.

The functional chain runs once per BOLD run of the demo (motion, coregistration,
resampling, parcellation, confounds: :func:`bh_models.func.preprocess.extract_run`,
on the anatomical derivatives of a finished demo run), then every strategy
denoises the same parcel series (:func:`bh_models.func.preprocess.denoise_run`).
One table, one row per strategy (and per strategy with global signal
regression, ``+GSR``):

fidelity
    Median over runs of the median over parcels of Pearson r between the
    output and the demo's **raw** ground-truth neural series, only detrended
    and high-passed like the output (no regressors), on the kept frames. What
    the cleaning keeps of the true signal, and what it removes of the noise.
r (truth cleaned alike)
    The same against the truth passed through the strategy's own cleaning
    (regressors and censoring included): recovery, not cost (the workflow
    test's measure).
QC-FC
    Over all subjects with fMRI (one run each), the partial correlation
    between each edge's connectivity and mean FD, controlling for age, sex and
    site (:mod:`bh_models.func.qcfc`): % of the 79,800 edges with p < 0.05
    (uncorrected and FDR), median |QC-FC|, and the Spearman rho of QC-FC
    with inter-parcel distance. With ~27 subjects even no motion effect at all
    gives a median |QC-FC| near 0.14: the "null" column is the median |QC-FC|
    with mean FD shuffled across subjects (median of ``--permutations``
    shuffles), the level a strategy's value should be compared with.
tDOF lost
    Mean over runs of regressor rank + censored frames.
time
    Mean seconds per run of the strategy's denoising (the shared extraction
    is timed separately: it is the same for every strategy).

The default is the strategy with the best fidelity among those whose median
|QC-FC| is at or below the median of all rows.

It also prints how close the tissue segmentation's volumes come to the demo's
truth (:func:`bh_models.demo.cohort.tissue_truth`, summed inside each subject's
MNI-space brain mask), over every subject.

Anatomical inputs: ``--derivatives`` is a ``bh-preproc`` folder of a demo run
(``<site>/sub-<label>/anat/``). Tissue posteriors missing there (a run from
before the segmentation existed) are computed with
:func:`bh_models.anat.tissues.segment_tissues` into ``--workdir``.

Usage::

    python benchmarks/bench_denoise.py --demo demo_data --derivatives results/derivatives/bh-preproc \\
        [--workdir /tmp/bh_bench_denoise] [--no-gsr] [--sites siteA siteB siteC] [--permutations 50] [--demo-seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

THREADS = 1
SPACE = "space-MNI152NLin2009cAsym_res-2"
HIGH_PASS = 0.01


def _runs(demo: Path, sites: list[str]) -> list[dict]:
    """Every BOLD run of the demo: site, subject, stem, BOLD path, TR, truth path."""
    runs = []
    for site in sites:
        tr = json.loads((demo / site / "task-rest_bold.json").read_text())["RepetitionTime"]
        for bold in sorted((demo / site).glob("sub-*/func/*_bold.nii.gz")):
            stem = bold.name.removesuffix("_bold.nii.gz")
            runs.append({"site": site, "subject": bold.parts[-3], "stem": stem, "bold": bold, "tr": float(tr),
                         "truth": demo / "ground_truth" / site / f"{stem}_timeseries.tsv"})
    return runs


def _anat(derivatives: Path, workdir: Path, site: str, subject: str) -> dict[str, Path]:
    """The anatomical inputs of one subject; tissue posteriors computed into ``workdir`` when missing."""
    import nibabel as nib
    import numpy as np

    from bh_models.anat.tissues import TISSUES, segment_tissues

    anat = derivatives / site / subject / "anat"
    paths = {
        "t1w": anat / f"{subject}_desc-preproc_T1w.nii.gz",
        "t1w_mask": anat / f"{subject}_desc-brain_mask.nii.gz",
        "t1w_to_mni": anat / f"{subject}_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5",
        "mni_mask": anat / f"{subject}_{SPACE}_desc-brain_mask.nii.gz",
    }
    probseg = {name: anat / f"{subject}_{SPACE}_label-{name}_probseg.nii.gz" for name in TISSUES}
    if not all(p.is_file() for p in probseg.values()):
        probseg = {name: workdir / "anat" / site / p.name for name, p in probseg.items()}
        if not all(p.is_file() for p in probseg.values()):
            t1w = nib.load(anat / f"{subject}_{SPACE}_desc-preproc_T1w.nii.gz")
            mask = np.asarray(nib.load(paths["mni_mask"]).dataobj) > 0
            maps = segment_tissues(t1w=t1w, mask=mask, resolution=2.0)
            for name, path in probseg.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(maps.probseg[name], t1w.affine), path)
    return {**paths, **{f"{name.lower()}_probseg": p for name, p in probseg.items()}}


def _tissue_errors(demo_seed: int, subjects: list[tuple[str, str]], derivatives: Path, workdir: Path):
    """(n, 3) % error of the GM, WM, CSF volumes against the demo truth inside each subject's MNI mask."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from bh_models.anat.tissues import TISSUES
    from bh_models.demo.cohort import _cohort_latents, tissue_truth

    cohort = _cohort_latents(seed=demo_seed)
    errors = []
    for site, subject in subjects:
        latents = next(s for s in cohort[site] if s.participant_id == subject)
        anat = _anat(derivatives, workdir, site, subject)
        mask = np.asarray(nib.load(anat["mni_mask"]).dataobj) > 0
        maps, _ = tissue_truth(latents)
        row = []
        for name in TISSUES:
            truth = maps[name].astype(np.float64)
            for axis in range(3):  # 1 mm -> 2 mm (voxel j of the 2 mm grid is voxel 2j of the 1 mm grid)
                truth = ndimage.convolve1d(truth, [0.25, 0.5, 0.25], axis=axis, mode="constant")
            posterior = np.asarray(nib.load(anat[f"{name.lower()}_probseg"]).dataobj, dtype=np.float64)
            row.append(100 * (posterior[mask].sum() / truth[::2, ::2, ::2][mask].sum() - 1))
        errors.append(row)
    return np.array(errors)


def _covariates(demo: Path, subjects: list[tuple[str, str]]):
    """(n, 4) age, sex (1 = F), site dummies for the (site, subject) list."""
    import numpy as np
    import pandas as pd

    tables = {site: pd.read_csv(demo / "ground_truth" / site / "subjects.tsv", sep="\t").set_index("participant_id")
              for site in {s for s, _ in subjects}}
    sites = sorted(tables)
    rows = []
    for site, subject in subjects:
        row = tables[site].loc[subject]
        rows.append([float(row["age"]), float(row["sex"] == "F")] + [float(site == s) for s in sites[1:]])
    return np.array(rows)


def _rowwise_r(a, b):
    import numpy as np

    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


def _evaluate_run(signals, run: dict, variants: list[tuple[str, bool]], truth) -> dict:
    """Every strategy on one extracted run: fidelity, alike-r, tDOF, time, FC edges."""
    import numpy as np

    from bh_models.func.denoise import (
        STRATEGIES,
        clean_parcel_series,
        regressor_columns,
        regressor_matrix,
    )
    from bh_models.func.preprocess import denoise_run
    from bh_models.func.qcfc import fc_edges

    high_passed = clean_parcel_series(series=truth, repetition_time=run["tr"], high_pass=HIGH_PASS,
                                      standardize=False)[0]
    valid = ~signals.parcels.empty
    out = {}
    for name, gsr in variants:
        started = time.perf_counter()
        cleaned, censored, info, _ = denoise_run(signals, denoise=name, gsr=gsr, high_pass=HIGH_PASS)
        seconds = time.perf_counter() - started
        keep = ~censored
        columns, _ = regressor_columns(strategy=STRATEGIES[name], gsr=gsr, table=signals.confounds.table,
                                       metadata=signals.confounds.metadata)
        alike = clean_parcel_series(series=truth, repetition_time=run["tr"],
                                    confounds=regressor_matrix(signals.confounds.table, columns), censored=censored,
                                    high_pass=HIGH_PASS, standardize=False)[0]
        out[(name, gsr)] = {
            "fidelity": float(np.nanmedian(_rowwise_r(cleaned[:, valid], high_passed[keep][:, valid]))),
            "alike": float(np.nanmedian(_rowwise_r(cleaned[:, valid], alike[:, valid]))),
            "tdof_lost": info["tdof_lost"], "n_censored": info["n_censored"], "seconds": seconds,
            "fc": fc_edges(cleaned).astype(np.float32),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo_data"))
    parser.add_argument("--derivatives", type=Path, default=Path("results/derivatives/bh-preproc"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_denoise"))
    parser.add_argument("--sites", nargs="+", default=["siteA", "siteB", "siteC"])
    parser.add_argument("--no-gsr", action="store_true", help="leave out the +GSR rows")
    parser.add_argument("--permutations", type=int, default=50, help="shuffles of mean FD for the QC-FC null")
    parser.add_argument("--demo-seed", type=int, default=0, help="the seed the demo cohort was written with")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(THREADS)  # as the workflow's one-thread jobs

    import numpy as np
    import pandas as pd

    from bh_models.func.denoise import STRATEGIES
    from bh_models.func.preprocess import extract_run
    from bh_models.func.qcfc import edge_distances, parcel_centroids, qc_fc, summarise

    variants = [(name, False) for name in STRATEGIES] + ([] if args.no_gsr else [(n, True) for n in STRATEGIES])
    runs = _runs(args.demo, args.sites)
    results, mean_fd, extraction, first_run = {}, {}, [], {}
    for k, run in enumerate(runs):
        anat = _anat(args.derivatives, args.workdir, run["site"], run["subject"])
        started = time.perf_counter()
        signals = extract_run(bold=run["bold"], **anat, tr_sidecar=run["tr"], resolution=2.0, networks=7,
                              seed=42, threads=THREADS)
        extraction.append(time.perf_counter() - started)
        truth = pd.read_csv(run["truth"], sep="\t").to_numpy(dtype=np.float64)
        results[run["stem"], run["site"]] = _evaluate_run(signals, run, variants, truth)
        mean_fd[run["stem"], run["site"]] = signals.motion.mean_fd
        first_run.setdefault((run["site"], run["subject"]), (run["stem"], run["site"]))
        print(f"[{k + 1}/{len(runs)}] {run['site']} {run['stem']}: extraction {extraction[-1]:.1f} s, "
              f"mean FD {signals.motion.mean_fd:.3f} mm", flush=True)

    subjects = sorted(first_run)
    keys = [first_run[s] for s in subjects]
    covariates = _covariates(args.demo, subjects)
    motion = np.array([mean_fd[key] for key in keys])
    distances = edge_distances(parcel_centroids(networks=7, resolution=2.0))
    rows = []
    for name, gsr in variants:
        per_run = [results[key][name, gsr] for key in results]
        fc = np.stack([results[key][name, gsr]["fc"] for key in keys]).astype(np.float64)
        r, p = qc_fc(fc=fc, motion=motion, covariates=covariates)
        shuffles = np.random.default_rng(0)
        null = [np.nanmedian(np.abs(qc_fc(fc=fc, motion=shuffles.permutation(motion), covariates=covariates)[0]))
                for _ in range(args.permutations)]
        rows.append({"strategy": name + ("+GSR" if gsr else ""),
                     "fidelity": np.median([x["fidelity"] for x in per_run]),
                     "fidelity_min": np.min([x["fidelity"] for x in per_run]),
                     "r_alike": np.median([x["alike"] for x in per_run]),
                     "r_alike_min": np.min([x["alike"] for x in per_run]),
                     **summarise(r=r, p=p, distances=distances),
                     "null_median_abs_qcfc": float(np.median(null)),
                     "tdof_lost": np.mean([x["tdof_lost"] for x in per_run]),
                     "censored": np.mean([x["n_censored"] for x in per_run]),
                     "seconds": np.mean([x["seconds"] for x in per_run])})
    table = pd.DataFrame(rows)
    eligible = table[table["median_abs_qcfc"] <= table["median_abs_qcfc"].median()]
    default = eligible.sort_values("fidelity", ascending=False, kind="stable").iloc[0]["strategy"]
    table["default"] = table["strategy"] == default
    args.workdir.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.workdir / "bench_denoise.tsv", sep="\t", index=False, float_format="%.4f")

    print(f"\n{len(runs)} runs, {len(subjects)} subjects (QC-FC: one run each; covariates age, sex, site); "
          f"mean FD {motion.min():.3f}-{motion.max():.3f} mm (median {np.median(motion):.3f}); "
          f"shared extraction {np.mean(extraction):.1f} s per run")
    print("\n| strategy | fidelity (median, min r vs raw truth) | r vs truth cleaned alike (min) | QC-FC % sig (FDR) | "
          "median abs QC-FC (null) | QC-FC-distance rho | tDOF lost | censored | time (s/run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table.itertuples():
        mark = " **(default)**" if row.default else ""
        print(f"| {row.strategy}{mark} | {row.fidelity:.3f} ({row.fidelity_min:.3f}) | {row.r_alike:.3f} "
              f"({row.r_alike_min:.3f}) | "
              f"{row.pct_sig:.1f} ({row.pct_sig_fdr:.1f}) | {row.median_abs_qcfc:.3f} ({row.null_median_abs_qcfc:.3f}) | "
              f"{row.distance_rho:+.3f} | {row.tdof_lost:.1f} | {row.censored:.1f} | {row.seconds:.3f} |")
    print(f"\nQC-FC threshold (median of the median |QC-FC| of all rows): "
          f"{table['median_abs_qcfc'].median():.3f}; eligible: {', '.join(eligible['strategy'])}")
    print(f"default = best fidelity among them: {default}")
    errors = _tissue_errors(args.demo_seed, subjects, args.derivatives, args.workdir)
    print(f"\ntissue volumes vs the demo truth, {len(subjects)} subjects, % error (median [min, max]): "
          + "; ".join(f"{name} {np.median(e):+.1f} [{e.min():+.1f}, {e.max():+.1f}]"
                      for name, e in zip(("GM", "WM", "CSF"), errors.T))
          + f"; largest |error| {np.abs(errors).max():.1f} %")


if __name__ == "__main__":
    main()
