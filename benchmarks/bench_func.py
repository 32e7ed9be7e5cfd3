"""Benchmark: the functional chain on one 200-volume run, and one-shot vs per-volume resampling.

Setup (not timed): a demo-like subject is synthesised from the MNI152 2009c
brain under a known rigid head pose: a 1 mm native T1w and brain mask, a rest
BOLD run (``--bold-mm`` voxels, default 3 mm, 200 volumes, TR 0.8 s, EPI-like
contrast, random parcel series, small rigid head motion, noise), and the
anatomical outputs the functional chain needs: the T1w -> MNI composite
transform from :func:`bh_models.anat.registration.register_to_template` (``SyN``
preset at ``--anat-mm``, default 4 mm, so the ``.h5`` holds a real
displacement field) and the subject mask on the 2 mm template grid.

Timed, each in a fresh process (so ``ru_maxrss`` is that job's own peak,
interpreter and imports included), with 2 threads as the rule gives:

``preprocess_bold``
    The whole step at the 2 mm template resolution, default denoising:
    motion, coregistration, one-shot resampling of the atlas voxels (and of
    the confound masks and brain lattice), parcellation, confounds,
    denoising, TSV/JSON/PNG outputs.
``one-shot (atlas voxels)`` / ``one-shot (full grid)``
    :func:`bh_models.func.resample.map_points` once plus
    :func:`bh_models.func.resample.resample_bold` for every volume, onto the atlas
    voxels inside the brain mask (what the chain does) or onto the whole 2 mm
    template grid (like for like with ANTs).
``ANTs per-volume loop``
    ``ants.apply_transforms(fixed=template, moving=volume_t,
    transformlist=[t1w_to_mni.h5, bold_from_t1w.mat, motion_t.mat])`` for every
    volume (linear), the same composition; the largest difference from the
    one-shot values inside the field of view is printed too.

Usage::

    python benchmarks/bench_func.py [--volumes 200] [--bold-mm 3] [--workdir /tmp/bh_bench_func]

Target: preprocess_bold <= 45 s for one run on 2 cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

THREADS = 2
TR = 0.8
RESOLUTION = 2.0


def _rigid(degrees, shift):
    import numpy as np
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    out[:3, 3] = shift
    return out


def _pull(source, source_affine, out_affine, out_shape, world_map, order):
    import numpy as np
    from scipy import ndimage

    m = np.linalg.inv(source_affine) @ world_map @ out_affine
    return ndimage.affine_transform(source, m[:3, :3], offset=m[:3, 3], output_shape=out_shape, order=order)


def _write_ants_affine(matrix, path: Path) -> Path:
    """A RAS+ 4x4 point map as an ANTs .mat (LPS+)."""
    import ants
    import numpy as np

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ matrix @ flip
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                                    matrix=lps[:3, :3], translation=lps[:3, 3]), str(path))
    return path


def setup(workdir: Path, *, n_volumes: int, bold_mm: float, anat_mm: float, seed: int = 0) -> dict:
    """Write the subject and its anatomical outputs (not timed)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from bh_models.anat.registration import limit_itk_threads, register_to_template
    from bh_models.core.templates import atlas_in_template_space, load_template

    limit_itk_threads(THREADS)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = _rigid([6, -4, 8], [5, -7, 4])  # MNI point -> subject point
    head_inv = np.linalg.inv(head)

    tpl1, mask1, _ = load_template(1.0)
    t1_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    t1_affine[:3, 3] = [-90, -126, -72]
    t1_shape = (182, 218, 182)
    t1 = _pull(np.asarray(tpl1.dataobj, dtype=np.float32), tpl1.affine, t1_affine, t1_shape, head_inv, 1)
    brain = _pull(np.asarray(mask1.dataobj, dtype=np.float32), mask1.affine, t1_affine, t1_shape, head_inv, 0)
    t1_img = nib.Nifti1Image(t1.astype(np.float32), t1_affine)
    nib.save(t1_img, workdir / "t1w.nii.gz")
    nib.save(nib.Nifti1Image((brain > 0.5).astype(np.uint8), t1_affine), workdir / "t1w_mask.nii.gz")
    template_reg, _, _ = load_template(anat_mm)
    t0 = time.perf_counter()
    register_to_template(moving=t1_img, template=template_reg, out_forward=workdir / "t1w_to_mni.h5",
                         out_inverse=workdir / "mni_to_t1w.h5", type_of_transform="SyN", seed=1)
    anat_s = time.perf_counter() - t0
    template2, mask2, _ = load_template(RESOLUTION)
    nib.save(mask2, workdir / "mni_mask.nii.gz")
    nib.save(template2, workdir / "mni_t1w.nii.gz")
    # Tissue posteriors as the anatomical chain writes them (here: the template priors, normalised in the mask).
    from bh_models.anat.tissues import tissue_priors

    priors = tissue_priors(RESOLUTION)
    inside = np.asarray(mask2.dataobj) > 0
    total = sum(priors.values()) + 1e-6
    for name in ("GM", "WM", "CSF"):
        nib.save(nib.Nifti1Image((priors[name] / total * inside).astype(np.float32), mask2.affine),
                 workdir / f"{name.lower()}_probseg.nii.gz")

    # BOLD: EPI-like contrast from the 2 mm template, parcel series, motion, noise.
    tpl = np.asarray(template2.dataobj, dtype=np.float32)
    epi = ndimage.gaussian_filter(np.where(tpl > 0.05 * tpl.max(), 1.5 * tpl.max() - tpl, 0.0), 1.0)
    labels = np.asarray(atlas_in_template_space(7, RESOLUTION).dataobj).astype(np.float32)
    signals = ndimage.gaussian_filter1d(rng.standard_normal((n_volumes, 401)), 2.0, axis=0)
    signals[:, 0] = 0.0
    signals /= signals[:, 1:].std(axis=0).mean()
    motion = np.stack([_rigid(rng.normal(0, 0.15, 3), rng.normal(0, 0.15, 3)) for _ in range(n_volumes)])
    bold_affine = np.diag([bold_mm, bold_mm, bold_mm, 1.0])
    bold_affine[:3, 3] = [-96, -132, -78]
    bold_shape = tuple(int(np.ceil(n / bold_mm)) for n in (192, 228, 168))
    data = np.empty((*bold_shape, n_volumes), dtype=np.float32, order="F")
    for t in range(n_volumes):
        world = head_inv @ np.linalg.inv(motion[t])  # BOLD_t point -> MNI point
        base = _pull(epi, template2.affine, bold_affine, bold_shape, world, 1)
        label = _pull(labels, template2.affine, bold_affine, bold_shape, world, 0).astype(int)
        noise = rng.normal(0, 0.01 * epi.max(), bold_shape) * (base > 0)
        data[..., t] = base * (1 + 0.02 * signals[t, label]) + noise
    img = nib.Nifti1Image(data, bold_affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((bold_mm, bold_mm, bold_mm, TR))
    nib.save(img, workdir / "sub-01_task-rest_bold.nii.gz")
    np.save(workdir / "motion.npy", motion)
    # For the resampling comparison: the true BOLD <- T1w map (identity here: same session).
    _write_ants_affine(np.eye(4), workdir / "bold_from_t1w.mat")
    return {"anat_s": anat_s, "bold_shape": bold_shape}


def _measure(queue: mp.Queue, job: str, workdir: str) -> None:
    """Run one job in this fresh process; report wall s, CPU s, peak RSS MB and a note."""
    from bh_models.core.step import limit_threads

    limit_threads(THREADS)  # as the Snakemake runner does: numpy, torch and ITK threads
    import nibabel as nib
    import numpy as np

    work = Path(workdir)
    bold = work / "sub-01_task-rest_bold.nii.gz"
    if job == "step":
        from bh_models.func.preprocess import preprocess_bold

        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = preprocess_bold(
            bold=bold, t1w=work / "t1w.nii.gz", t1w_mask=work / "t1w_mask.nii.gz",
            t1w_to_mni=work / "t1w_to_mni.h5", mni_mask=work / "mni_mask.nii.gz",
            mni_t1w=work / "mni_t1w.nii.gz", gm_probseg=work / "gm_probseg.nii.gz",
            wm_probseg=work / "wm_probseg.nii.gz", csf_probseg=work / "csf_probseg.nii.gz",
            out_timeseries=work / "out" / "ts.tsv", out_confounds=work / "out" / "confounds.tsv",
            out_carpet=work / "out" / "carpet.png", out_rois=work / "out" / "rois.png", tr_sidecar=TR,
            resolution=RESOLUTION, threads=THREADS,
        )
        note = f"mean FD {out['mean_fd']:.3f} mm, {len(out['warnings'])} warning(s)"
    elif job in ("oneshot_atlas", "oneshot_full"):
        from bh_models.func.parcellate import parcel_layout
        from bh_models.func.resample import grid_points, map_points, resample_bold
        from bh_models.core.templates import atlas_in_template_space

        atlas = atlas_in_template_space(7, RESOLUTION)
        mask = nib.load(work / "mni_mask.nii.gz")
        motion = np.load(work / "motion.npy")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        img = nib.load(bold)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if job == "oneshot_atlas":
            targets = parcel_layout(atlas=atlas, mask=mask, networks=7).indices
        else:
            targets = np.argwhere(np.ones(atlas.shape[:3], dtype=bool))
        points = map_points(points=grid_points(indices=targets.astype(np.float64), affine=atlas.affine),
                            transforms=[work / "t1w_to_mni.h5", work / "bold_from_t1w.mat"])
        series, in_view = resample_bold(bold=data, affine=img.affine, motion=motion, reference_points=points)
        if job == "oneshot_full":
            np.save(work / "oneshot_full.npy", series)
            np.save(work / "oneshot_full_in_view.npy", in_view)
        note = f"{len(targets)} voxels x {data.shape[3]} volumes"
    elif job == "ants_loop":
        import ants

        from bh_models.core.antsio import ants_to_nifti, nifti_to_ants
        from bh_models.core.templates import load_template

        template, _, _ = load_template(RESOLUTION)
        motion = np.load(work / "motion.npy")
        mats = [_write_ants_affine(m, work / f"motion_{t:03d}.mat") for t, m in enumerate(motion)]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        img = nib.load(bold)
        data = np.asarray(img.dataobj, dtype=np.float32)
        fixed = nifti_to_ants(template)
        out = np.empty((data.shape[3], int(np.prod(template.shape[:3]))), dtype=np.float32)
        for t in range(data.shape[3]):
            moved = ants.apply_transforms(
                fixed=fixed, moving=nifti_to_ants(nib.Nifti1Image(data[..., t], img.affine)),
                transformlist=[str(work / "t1w_to_mni.h5"), str(work / "bold_from_t1w.mat"), str(mats[t])],
                interpolator="linear",
            )
            out[t] = np.asarray(ants_to_nifti(moved).dataobj).reshape(-1)  # C order = argwhere order
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        ours = np.load(work / "oneshot_full.npy")
        in_view = np.load(work / "oneshot_full_in_view.npy")
        diff = np.abs(ours[:, in_view] - out[:, in_view]).max()
        scale = np.abs(out[:, in_view]).max()
        note = f"max |one-shot - ANTs| in view {diff:.2e} ({diff / scale:.1e} of max)"
        queue.put((wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, note))
        return
    else:  # pragma: no cover - programming error
        raise ValueError(job)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    queue.put((wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, note))


def run(job: str, workdir: Path) -> tuple[float, float, float, str]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(queue, job, str(workdir)))
    process.start()
    import queue as queue_module

    while True:  # a child that dies before reporting must not hang the benchmark
        try:
            result = queue.get(timeout=2)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"job {job} failed with exit code {process.exitcode}") from None
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--bold-mm", type=float, default=3.0, help="BOLD voxel size (mm)")
    parser.add_argument("--anat-mm", type=float, default=4.0, help="grid of the SyN registration in the setup")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_func"))
    parser.add_argument("--skip-ants", action="store_true", help="skip the per-volume ANTs loop")
    args = parser.parse_args()

    t0 = time.perf_counter()
    info = setup(args.workdir, n_volumes=args.volumes, bold_mm=args.bold_mm, anat_mm=args.anat_mm)
    print(f"setup (not timed): {time.perf_counter() - t0:.1f} s, of which SyN T1w->MNI at {args.anat_mm:g} mm "
          f"{info['anat_s']:.1f} s; BOLD {info['bold_shape']} x {args.volumes} at {args.bold_mm:g} mm, "
          f"TR {TR:g} s; output grid {RESOLUTION:g} mm; {THREADS} threads; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{'job':<36}{'wall s':>9}{'CPU s':>9}{'peak MB':>10}  note")
    labels = {
        "step": "preprocess_bold (whole step)",
        "oneshot_atlas": "one-shot resampling, atlas voxels",
        "oneshot_full": "one-shot resampling, full grid",
        "ants_loop": "ANTs apply_transforms per volume",
    }
    results = {}
    jobs = ["step", "oneshot_atlas", "oneshot_full"] + ([] if args.skip_ants else ["ants_loop"])
    for job in jobs:
        wall, cpu, peak, note = run(job, args.workdir)
        results[job] = (wall, cpu, peak)
        print(f"{labels[job]:<36}{wall:9.2f}{cpu:9.2f}{peak:10.0f}  {note}", flush=True)
    print()
    wall, _, peak = results["step"]
    print(f"preprocess_bold: {wall:.1f} s wall, peak {peak:.0f} MB (target <= 45 s)")
    if "ants_loop" in results:
        ants_wall, ants_cpu, _ = results["ants_loop"]
        for job in ("oneshot_full", "oneshot_atlas"):
            print(f"ANTs per-volume loop / {labels[job]}: wall {ants_wall / results[job][0]:.1f}x, "
                  f"CPU {ants_cpu / results[job][1]:.1f}x")


if __name__ == "__main__":
    main()
