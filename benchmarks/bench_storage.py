"""Benchmark: derivative storage per subject before and after the compact transforms, and what changes downstream.

One demo subject (default ``siteA/sub-02``: one T1w, one rest BOLD) goes through the
anatomical and functional steps twice, in the same run:

* **before**: ``compact_storage=False``, the transforms exactly as ITK writes them
  (float32 displacement fields, uncompressed: 13.2 MB each for a demo subject);
* **after**: the default, fields rounded to ``TRANSFORM_QUANTUM_MM`` (2^-10 mm) and
  stored with shuffle + gzip.

It prints the bytes of every derivative class (``bh plan``'s classes) before and
after, and the largest differences of every downstream output computed through the
forward transform: the MNI-space T1w and brain mask, the encoder tensor (inside the
brain, and the fraction of voxels whose nearest-neighbour mask flips at a tie), the
parcel time series, the functional connectivity (Fisher z) a probe would see. The
stated tolerances (:data:`TOLERANCE`) are checked: a larger difference makes the
script exit 1.

    python benchmarks/bench_storage.py --demo demo_data
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

#: Tolerances of the downstream outputs (stated in the README): the rounding must stay far below them.
TOLERANCE = {
    "mni_t1w_relative": 1e-3,    # max |diff| / 99th percentile of the brain's intensity
    "tensor_z_in_brain": 1e-2,   # max |diff| of the z-scored encoder tensor where both masks hold
    "tensor_mask_flipped": 1e-4, # fraction of brain voxels entering/leaving the (nearest-neighbour) tensor mask
    "mni_mask_flipped": 1e-4,    # the same for the MNI-space brain mask
    "timeseries_relative": 1e-3, # max |diff| / SD of the parcel series
    "fc_fisher_z": 1e-3,         # max |diff| of the 79,800 Fisher-z FC features
}


def derivative_class(name: str) -> str:
    """The storage class of a derivative file name (the classes ``bh plan`` reports)."""
    if name.endswith("_xfm.h5"):
        return "transforms"
    if name.endswith(".png"):
        return "figures"
    if name.endswith(".json"):
        return "sidecars"
    if name.endswith("_desc-encoder_T1w.npy"):
        return "tensor"
    if name.endswith(("_probseg.nii.gz", "_dseg.nii.gz")):
        return "tissue_maps"  # the GM/WM/CSF posteriors (float32, read by func_preprocess) and labels
    if "_space-" in name and name.endswith(".nii.gz"):
        return "mni_anat"
    if name.endswith(".nii.gz"):
        return "native_anat"
    if name.endswith("_timeseries.tsv") and "desc-confounds" not in name:
        return "parcel_series"
    if "desc-confounds" in name:
        return "confounds"
    return "other"


def storage(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = derivative_class(path.name)
            sizes[key] = sizes.get(key, 0) + path.stat().st_size
    return sizes


SPACE = "MNI152NLin2009cAsym"
# preprocess_bold's anatomical inputs: its parameter -> the preprocess_anat output it reads
# (rules/common.smk's FUNC_NEEDS).
FUNC_NEEDS = {"t1w": "out_t1w", "t1w_mask": "out_mask", "t1w_to_mni": "out_forward", "mni_mask": "out_mni_mask",
              "mni_t1w": "out_mni_t1w", "gm_probseg": "out_gm_probseg", "wm_probseg": "out_wm_probseg",
              "csf_probseg": "out_csf_probseg"}


def anat_paths(out: Path, prefix: str, res: int) -> dict[str, Path]:
    """preprocess_anat's ``out_*`` arguments under ``out``, named as the workflow names them
    (rules/common.smk's anat_outputs)."""
    anat, fig = out / "anat", out / "figures"
    return {
        "out_t1w": anat / f"{prefix}_desc-preproc_T1w.nii.gz",
        "out_mask": anat / f"{prefix}_desc-brain_mask.nii.gz",
        "out_mni_t1w": anat / f"{prefix}_space-{SPACE}_res-{res}_desc-preproc_T1w.nii.gz",
        "out_mni_mask": anat / f"{prefix}_space-{SPACE}_res-{res}_desc-brain_mask.nii.gz",
        "out_forward": anat / f"{prefix}_from-T1w_to-{SPACE}_mode-image_xfm.h5",
        "out_inverse": anat / f"{prefix}_from-{SPACE}_to-T1w_mode-image_xfm.h5",
        "out_tensor": anat / f"{prefix}_space-{SPACE}_res-{res}_desc-encoder_T1w.npy",
        **{f"out_{name.lower()}_probseg": anat / f"{prefix}_space-{SPACE}_res-{res}_label-{name}_probseg.nii.gz"
           for name in ("GM", "WM", "CSF")},
        "out_dseg": anat / f"{prefix}_space-{SPACE}_res-{res}_dseg.nii.gz",
        "out_qc_mask": fig / f"{prefix}_desc-brainmask_T1w.png",
        "out_qc_registration": fig / f"{prefix}_space-{SPACE}_desc-registration_T1w.png",
        "out_qc_segmentation": fig / f"{prefix}_space-{SPACE}_desc-segmentation_T1w.png",
    }


def func_inputs(anat: dict[str, Path]) -> dict[str, Path]:
    """preprocess_bold's anatomical arguments from its subject's :func:`anat_paths`."""
    return {param: anat[output] for param, output in FUNC_NEEDS.items()}


def func_settings(config: dict) -> dict:
    """preprocess_bold's settings as rules/func.smk passes them: cleaning, the denoising
    strategy and its censoring, the network order."""
    func = config["func"]
    return {**{k: func[k] for k in ("detrend", "high_pass", "low_pass", "denoise", "gsr", "standardize")},
            **func["scrubbing"], "networks": config["atlas"]["networks"]}


def run_subject(raw: Path, subject: str, out: Path, compact: bool, config: dict) -> dict[str, Path]:
    from bh_models.anat.preprocess import preprocess_anat
    from bh_models.func.preprocess import preprocess_bold

    func, fig = out / "func", out / "figures"
    prefix = f"sub-{subject}"
    res = config["template"]["resolution"]
    paths = anat_paths(out, prefix, res)
    started = time.perf_counter()
    preprocess_anat(t1w=raw / prefix / "anat" / f"{prefix}_T1w.nii.gz", **paths,
                    skullstrip_method=config["anat"]["skullstrip"],
                    type_of_transform=config["anat"]["type_of_transform"], resolution=res,
                    registration_resolution=config["anat"]["registration_resolution"],
                    tensor_grid=config["anat"]["tensor_grid"], seed=config["seed"], compact_storage=compact)
    bold = sorted((raw / prefix / "func").glob("*_bold.nii.gz"))[0]
    stem = bold.name.removesuffix("_bold.nii.gz")
    networks = config["atlas"]["networks"]
    series = func / f"{stem}_space-{SPACE}_atlas-Schaefer2018_seg-{networks}n_scale-400_timeseries.tsv"
    tr = json.loads((raw / "task-rest_bold.json").read_text())["RepetitionTime"] \
        if (raw / "task-rest_bold.json").is_file() else None
    preprocess_bold(bold=bold, **func_inputs(paths), out_timeseries=series,
                    out_confounds=func / f"{stem}_desc-confounds_timeseries.tsv",
                    out_carpet=fig / f"{stem}_desc-carpet_bold.png", out_rois=fig / f"{stem}_desc-rois_bold.png",
                    tr_sidecar=tr, resolution=res, seed=config["seed"], **func_settings(config))
    print(f"  {'compact' if compact else 'exact'} storage: {time.perf_counter() - started:.0f} s",
          flush=True)
    return {**paths, "series": series}


def differences(before: dict[str, Path], after: dict[str, Path]) -> dict[str, float]:
    from bh_models.evaluation.baselines import connectivity_features

    a = np.asarray(nib.load(before["out_mni_t1w"]).dataobj, float)
    b = np.asarray(nib.load(after["out_mni_t1w"]).dataobj, float)
    scale = np.percentile(a[a > 0], 99)
    ta, tb = np.load(before["out_tensor"]), np.load(after["out_tensor"])
    both = (ta != 0) & (tb != 0)
    ma = np.asarray(nib.load(before["out_mni_mask"]).dataobj) > 0
    mb = np.asarray(nib.load(after["out_mni_mask"]).dataobj) > 0
    sa = pd.read_csv(before["series"], sep="\t").to_numpy(float)
    sb = pd.read_csv(after["series"], sep="\t").to_numpy(float)
    sd = sa.std(axis=0)
    live = sd > 0
    r = [np.corrcoef(sa[:, i], sb[:, i])[0, 1] for i in np.flatnonzero(live)]
    return {
        "mni_t1w_relative": float(np.abs(a - b).max() / scale),
        "mni_t1w_voxels_changed": float(np.mean(a != b)),
        "tensor_z_in_brain": float(np.abs(ta - tb)[both].max()),
        "tensor_mask_flipped": float(np.sum((ta != 0) != (tb != 0)) / max(1, np.sum(ta != 0))),
        "mni_mask_flipped": float(np.sum(ma != mb) / max(1, ma.sum())),
        "timeseries_relative": float((np.abs(sa - sb)[:, live] / sd[live]).max()),
        "timeseries_min_r": float(min(r)),
        "fc_fisher_z": float(np.abs(connectivity_features(timeseries=sa) - connectivity_features(timeseries=sb)).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "demo_data", help="demo cohort (bh demo)")
    parser.add_argument("--site", default="siteA")
    parser.add_argument("--subject", default="02")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from bh_models.anat.preprocess import TRANSFORM_QUANTUM_MM
    from bh_models.core.config import load_config

    config = load_config(REPO / "config.yaml", base_dir=REPO)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bh_bench_storage_"))
    raw = args.demo / args.site
    print(f"{args.site}/sub-{args.subject}, demo config (template {config['template']['resolution']} mm, "
          f"tensor grid {config['anat']['tensor_grid']}); transforms rounded to {TRANSFORM_QUANTUM_MM:g} mm")
    before = run_subject(raw, args.subject, work / "before", False, config)
    after = run_subject(raw, args.subject, work / "after", True, config)
    sizes_before, sizes_after = storage(work / "before"), storage(work / "after")
    # The batch design adds, per subject, its share of the batches' QC pages (figure thumbnails).
    from bh_models.core.batches import write_qc_page

    page = work / "after_qc.html"
    rows = [{"unit": "sub", "status": "done", "outputs": {k: str(v) for k, v in after.items()}}]
    write_qc_page(rows=rows, figures=["out_qc_mask", "out_qc_registration"], out_html=page, title="anat")
    qc_bytes = page.stat().st_size
    write_qc_page(rows=[{"unit": "run", "status": "done",
                         "outputs": {"out_carpet": str(next((work / "after" / "figures").glob("*carpet*")))}}],
                  figures=["out_carpet"], out_html=page, title="func")
    sizes_after["qc_pages"] = qc_bytes + page.stat().st_size
    print("\n| derivative class | before (MB) | after (MB) | ratio |\n| --- | --- | --- | --- |")
    for key in sorted(set(sizes_before) | set(sizes_after)):
        b, a = sizes_before.get(key, 0) / 1e6, sizes_after.get(key, 0) / 1e6
        print(f"| {key} | {b:.2f} | {a:.2f} | {b / a if a else float('nan'):.2f} |")
    total_b, total_a = sum(sizes_before.values()) / 1e6, sum(sizes_after.values()) / 1e6
    print(f"| **subject total** | {total_b:.2f} | {total_a:.2f} | {total_b / total_a:.2f} |")
    diffs = differences(before, after)
    print("\n| downstream output | largest difference | tolerance |\n| --- | --- | --- |")
    failed = False
    for key, value in diffs.items():
        limit = TOLERANCE.get(key)
        failed |= limit is not None and value > limit
        print(f"| {key} | {value:.3g} | {limit if limit is not None else ''} |")
    print(f"\nstorage per subject {total_b:.1f} -> {total_a:.1f} MB ({total_b / total_a:.2f}x smaller); "
          f"{'within' if not failed else 'OUTSIDE'} the stated tolerances")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
