"""Benchmark: measure every rule's cost and write bh_models/core/costs.tsv (read by the rules' resources and `bh plan`).

Each measurement runs the rule's step function in a fresh spawned process (so its
peak RSS, ``ru_maxrss``, is its own: interpreter and imports included) on the
thread count the rule gives it. Times are CPU seconds (user + system) of the step
call: on a shared machine, what the step needs of an idle core (the units run on
one thread, so that is their wall time when the core is theirs):

* ``anat_preprocess``, per unit (one T1w, one thread): two demo subjects at the
  demo config (2 mm template, tensor grid 80 x 96 x 80), and one at the schema's
  default tensor grid (160 x 192 x 160, the paper's 1 mm tensor); plus the bytes of
  every derivative class of a subject.
* ``func_preprocess``, per unit (one BOLD run, one thread): two demo runs (160 and
  100 volumes of 45 x 53 x 46 voxels) and one UK-Biobank-sized synthetic run
  (``bench_func.setup``: 2.4 mm voxels, 80 x 95 x 70, 490 volumes). Time and peak
  are fitted as ``a + b x`` (megavoxel-frames of the run), stored as a ``per unit``
  and a ``per mvoxel_frame`` row; plus the bytes of each run's derivatives.
* cohort-level steps (QC tables, sample plan, splits, packing, scaling, embeddings,
  evaluation, exclusion table, audit, index) on the finished demo run of
  ``--demo-results`` (read only; copied where a step writes beside its inputs), at
  two sizes where their cost grows with the units: ``per job`` and ``per unit`` rows.
* pretraining: floating-point operations of one training sample (forward and
  backward, and the frozen encoders for the Harmonizer) of each model at the
  ``base`` (paper) and ``tiny`` sizes, counted by ``torch.utils.flop_counter`` on
  CPU, and parameter counts; ``bh plan`` turns them into GPU-hours at an assumed
  sustained throughput.

    python benchmarks/bench_costs.py --demo demo_data --demo-results /tmp/results_premove
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(queue, spec: str, kwargs: dict, threads: int) -> None:
    from bh_models.core.step import limit_threads, resolve

    limit_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    started = _cpu_seconds()
    try:
        result = resolve(spec)(**kwargs, threads=threads)
        error = None
    except Exception as exc:  # reported, then raised in the parent
        result, error = None, f"{type(exc).__name__}: {exc}"
    queue.put((_cpu_seconds() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               result if isinstance(result, (dict, int, float, str, type(None))) else None, error))


def measure(spec: str, kwargs: dict, *, threads: int = 1) -> tuple[float, float]:
    """CPU seconds of the step call (user + system: on a shared machine, the time it needs on
    an idle core, for one thread) and peak RSS (MB) of its fresh process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, spec, kwargs, threads))
    process.start()
    wall, peak, _, error = queue.get()
    process.join()
    if error:
        raise RuntimeError(f"{spec}: {error}")
    return wall, peak


class Table:
    def __init__(self, source: str) -> None:
        self.rows: list[dict] = []
        self.source = source

    def add(self, rule: str, quantity: str, per: str, value: float, *, item: str = "", setting: str = "",
            note: str = "") -> None:
        self.rows.append({"rule": rule, "quantity": quantity, "per": per, "item": item,
                          "value": f"{value:.6g}", "setting": setting,
                          "source": f"{self.source}{'; ' + note if note else ''}"})
        print(f"  {rule:<22}{quantity:<9}per {per:<14}{item:<16}{value:>12.4g}  {setting}", flush=True)

    def write(self, path: Path) -> None:
        import pandas as pd

        from bh_models.core.costs import COST_COLUMNS
        from bh_models.core.jsonio import write_tsv

        write_tsv(pd.DataFrame(self.rows, columns=COST_COLUMNS), path)


def storage_classes(folder: Path) -> dict[str, int]:
    from bench_storage import derivative_class

    sizes: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            sizes[derivative_class(path.name)] = sizes.get(derivative_class(path.name), 0) + path.stat().st_size
    return sizes


def setting_text(config: dict, **extra) -> str:
    from bh_models.core.costs import config_setting

    values = {**config_setting(config), **extra}
    return ";".join(f"{k}={v}" for k, v in values.items())


def bench_anat(table: Table, demo: Path, work: Path, config: dict) -> dict[str, dict[str, Path]]:
    from bench_storage import anat_paths

    print("anat_preprocess", flush=True)
    res = config["template"]["resolution"]
    done = {}
    runs = [("siteA", "02", config["anat"]["tensor_grid"]), ("siteC", "03", config["anat"]["tensor_grid"]),
            ("siteB", "02", [160, 192, 160])]
    by_grid: dict[str, list[tuple[float, float]]] = {}
    for site, subject, grid in runs:
        out = work / "anat" / f"{site}_{subject}_{'x'.join(map(str, grid))}"
        paths = anat_paths(out, f"sub-{subject}", res)
        kwargs = {"t1w": demo / site / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz", **paths,
                  "skullstrip_method": config["anat"]["skullstrip"],
                  "type_of_transform": config["anat"]["type_of_transform"], "resolution": res,
                  "registration_resolution": config["anat"]["registration_resolution"], "tensor_grid": grid,
                  "seed": config["seed"]}
        wall, peak = measure("bh_models.anat.preprocess:preprocess_anat", kwargs)
        by_grid.setdefault("x".join(map(str, grid)), []).append((wall, peak))
        done[f"{site}/{subject}/{'x'.join(map(str, grid))}"] = paths
        print(f"    {site}/sub-{subject} grid {grid}: {wall:.0f} s, peak {peak:.0f} MB", flush=True)
        if grid == config["anat"]["tensor_grid"] and site == "siteA":
            grid_text = "x".join(map(str, grid))
            for item, size in sorted(storage_classes(out).items()):
                table.add("storage", "bytes", "unit", size, item=f"anat:{item}",
                          setting=setting_text(config, tensor_grid=grid_text))
            exact = _exact_transform_bytes([paths["out_forward"], paths["out_inverse"]])
            table.add("storage", "bytes", "unit", exact, item="anat:transforms_exact",
                      setting=setting_text(config, tensor_grid=grid_text),
                      note="uncompressed float32 fields as ITK writes them (compact_storage off)")
    for grid, values in by_grid.items():
        setting = setting_text(config, tensor_grid=grid)
        table.add("anat_preprocess", "seconds", "unit", sum(w for w, _ in values) / len(values), setting=setting,
                  note=f"mean of {len(values)} demo T1w (1 mm, ~199 x 232 x 198)")
        table.add("anat_preprocess", "peak_mb", "unit", max(p for _, p in values), setting=setting)
    return done


def _exact_transform_bytes(paths: list[Path]) -> int:
    import h5py

    total = 0
    for path in paths:
        with h5py.File(path) as h5:
            floats = sum(h5[f"TransformGroup/{g}/TransformParameters"].size for g in h5["TransformGroup"]
                         if "TransformParameters" in h5[f"TransformGroup/{g}"])
        total += 4 * floats + 20_000  # float32 values plus HDF5 headers and strings
    return total


def _synthesise(folder: str) -> dict:
    from bench_func import setup

    return setup(Path(folder), n_volumes=490, bold_mm=2.4, anat_mm=4.0)


def bench_func(table: Table, demo: Path, work: Path, config: dict, anat: dict[str, dict[str, Path]],
               ukb_run: bool) -> None:
    import json

    import nibabel as nib
    from bench_storage import func_inputs, func_settings

    print("func_preprocess", flush=True)
    res = config["template"]["resolution"]
    cleaning = func_settings(config)
    points = []
    for site, subject in (("siteA", "02"), ("siteC", "03")):
        paths = anat[f"{site}/{subject}/{'x'.join(map(str, config['anat']['tensor_grid']))}"]
        bold = sorted((demo / site / f"sub-{subject}" / "func").glob("*_bold.nii.gz"))[0]
        tr = json.loads(bold.with_name(bold.name.replace(".nii.gz", ".json")).read_text()).get("RepetitionTime") \
            if bold.with_name(bold.name.replace(".nii.gz", ".json")).is_file() else None
        tr = tr or json.loads((demo / site / "task-rest_bold.json").read_text())["RepetitionTime"]
        out = work / "func" / f"{site}_{subject}"
        kwargs = {"bold": bold, **func_inputs(paths),
                  "out_timeseries": out / "ts_timeseries.tsv", "out_confounds": out / "desc-confounds_timeseries.tsv",
                  "out_carpet": out / "carpet.png", "out_rois": out / "rois.png", "tr_sidecar": tr, "resolution": res, "seed": config["seed"],
                  **cleaning}
        wall, peak = measure("bh_models.func.preprocess:preprocess_bold", kwargs)
        shape = nib.load(bold).shape
        mvf = float(shape[0] * shape[1] * shape[2] * shape[3]) / 1e6
        points.append((mvf, wall, peak))
        print(f"    {site}/sub-{subject} {shape}: {mvf:.1f} Mvoxel-frames, {wall:.0f} s, peak {peak:.0f} MB", flush=True)
        if site == "siteA":
            for item, size in sorted(storage_classes(out).items()):
                table.add("storage", "bytes", "unit", size, item=f"func:{item}", setting=setting_text(config))
    if ukb_run:
        synth = work / "func_ukb"
        print("    synthesising a UK-Biobank-sized run (2.4 mm, 490 volumes) ...", flush=True)
        # In its own process: on Linux a child inherits its parent's peak RSS, which would inflate
        # every later measurement if this process held the 1 GB run.
        context = mp.get_context("spawn")
        with context.Pool(1) as pool:
            info = pool.apply(_synthesise, (str(synth),))
        kwargs = {"bold": synth / "sub-01_task-rest_bold.nii.gz", "t1w": synth / "t1w.nii.gz",
                  "t1w_mask": synth / "t1w_mask.nii.gz", "t1w_to_mni": synth / "t1w_to_mni.h5",
                  "mni_mask": synth / "mni_mask.nii.gz", "mni_t1w": synth / "mni_t1w.nii.gz",
                  **{f"{name}_probseg": synth / f"{name}_probseg.nii.gz" for name in ("gm", "wm", "csf")},
                  "out_timeseries": synth / "out" / "ts_timeseries.tsv",
                  "out_confounds": synth / "out" / "confounds.tsv", "out_carpet": synth / "out" / "carpet.png",
                  "out_rois": synth / "out" / "rois.png",
                  "tr_sidecar": 0.735, "resolution": res, "seed": config["seed"], **cleaning}
        wall, peak = measure("bh_models.func.preprocess:preprocess_bold", kwargs)
        shape = info["bold_shape"]
        mvf = float(shape[0] * shape[1] * shape[2] * 490) / 1e6
        points.append((mvf, wall, peak))
        print(f"    UKB-sized {shape} x 490: {mvf:.1f} Mvoxel-frames, {wall:.0f} s, peak {peak:.0f} MB", flush=True)
    import numpy as np

    x = np.array([p[0] for p in points])
    for column, quantity in ((1, "seconds"), (2, "peak_mb")):
        y = np.array([p[column] for p in points])
        slope, intercept = np.polyfit(x, y, 1) if len(points) > 1 else (0.0, float(y[0]))
        slope, intercept = max(slope, 0.0), max(intercept, 0.0)
        note = "least-squares line through " + ", ".join(f"({a:.1f} Mvf, {b:.0f})" for a, b in zip(x, y))
        table.add("func_preprocess", quantity, "unit", intercept, setting=setting_text(config), note=note)
        table.add("func_preprocess", quantity, "mvoxel_frame", slope, setting=setting_text(config), note=note)
    table.add("func_preprocess", "mvoxel_frames", "reference_run", float(np.median(x[:2])),
              setting=setting_text(config), note="a demo run; used when a dataset's run size cannot be read")


def _synthetic_manifest(path: Path, rows: int) -> Path:
    lines = ["unit\tdataset\tsubject\tsession\trun\trule\tstatus\treason\tfile\tout_timeseries"]
    lines += [f"sub-{i:06d}\tds\t{i:06d}\t\t\tfunc_preprocess\t{'excluded' if i % 10 == 0 else 'done'}\t"
              f"{'12 volumes. Fix: exclude the run' if i % 10 == 0 else ''}\t\tx_{i}.tsv" for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_cohort_steps(table: Table, results: Path, work: Path, config: dict, layouts: Path) -> None:
    """Cohort-level steps on a finished demo run (and the zero-byte index layouts), at two sizes."""
    print("cohort-level steps", flush=True)
    setting = setting_text(config)
    derivatives = results / "derivatives" / "bh-preproc"
    series = [p for p in sorted(derivatives.glob("*/sub-*/func/*_timeseries.tsv")) if "desc-confounds" not in p.name]
    anat_sidecars = sorted(derivatives.glob("*/sub-*/anat/*_desc-preproc_T1w.json"))
    tensors = sorted(derivatives.glob("siteA/sub-*/anat/*_desc-encoder_T1w.npy"))
    site_a = [p for p in series if "/siteA/" in str(p)]
    splits = results / "store" / "splits" / "siteA_splits.tsv"
    out = work / "cohort"
    roots = [layouts / "bids1000", layouts / "bids10000"]
    if not all((r / "dataset_description.json").is_file() for r in roots):
        from bench_bids_index import build_layout

        for root, n in zip(roots, (1000, 10000)):
            build_layout(root, n)
    jobs = {
        # rule: (step, kwargs for a list of units and a tag, small units, large units)
        "index_dataset": ("bh_models.bids.cohort:write_index",
                          lambda root, tag: {"dataset_description": root / "dataset_description.json",
                                             "out_runs": out / f"runs_{tag}.tsv",
                                             "out_subjects": out / f"subjects_{tag}.tsv",
                                             "out_problems": out / f"problems_{tag}.tsv", "dataset": "ds"},
                          (roots[0], 1000), (roots[1], 10000)),
        "anat_qc_table": ("bh_models.anat.preprocess:anat_qc_table",
                          lambda items, tag: {"sidecars": items, "out_table": out / f"anat_qc_{tag}.tsv"},
                          (anat_sidecars[:2], 2), (anat_sidecars, len(anat_sidecars))),
        "func_qc_table": ("bh_models.func.preprocess:func_qc_table",
                          lambda items, tag: {"sidecars": [p.with_suffix(".json") for p in items],
                                              "out_table": out / f"func_qc_{tag}.tsv"},
                          (series[:2], 2), (series, len(series))),
        "augment_samples": ("bh_models.store.augment:make_samples",
                            lambda items, tag: {"timeseries": items, "dataset": "siteA",
                                                "out_samples": out / f"samples_{tag}.tsv", "tr_factors": [1, 2],
                                                "tau": config["augment"]["tau"],
                                                "max_patches": config["augment"]["max_patches"],
                                                "seed": config["seed"]},
                            (site_a[:2], 2), (site_a, len(site_a))),
        "make_splits": ("bh_models.store.splits:make_splits",
                        lambda items, tag: {"dataset": "siteA", "out_splits": out / f"splits_{tag}.tsv",
                                            "samples": out / "samples_large.tsv", "t1_tensors": items,
                                            "seed": config["seed"]},
                        (tensors[:2], 2), (tensors, len(tensors))),
        "pack_fmri": ("bh_models.store.shards:pack_fmri",
                      lambda items, tag: {"samples": out / "samples_large.tsv", "timeseries": items, "splits": splits,
                                          "out_dir": out / f"fmri_{tag}",
                                          "shard_size_mb": config["store"]["shard_size_mb"]},
                      (site_a, len(site_a)), (site_a, len(site_a))),
        "pack_t1": ("bh_models.store.shards:pack_t1",
                    lambda items, tag: {"t1_tensors": items, "splits": splits, "dataset": "siteA",
                                        "out_dir": out / f"t1_{tag}", "shard_size_mb": config["store"]["shard_size_mb"]},
                    (tensors[:2], 2), (tensors, len(tensors))),
        "exclusion_table": ("bh_models.core.exclusions:write_exclusion_table",
                            lambda n, tag: {"manifests": [_synthetic_manifest(out / f"m_{tag}.tsv", n)],
                                            "out_tsv": out / f"exclusions_{tag}.tsv"},
                            (100, 100), (10_000, 10_000)),
    }
    for rule, (spec, kwargs_of, (small, n_small), (large, n_large)) in jobs.items():
        if rule == "pack_fmri":  # pack_fmri needs every run of the samples table: one size, all per unit
            wall, peak = measure(spec, kwargs_of(large, "large"), threads=2)
            table.add(rule, "seconds", "job", 0.0, setting=setting)
            table.add(rule, "seconds", "unit", wall / n_large, setting=setting, note=f"{n_large} runs: {wall:.2f} s")
            table.add(rule, "peak_mb", "job", peak, setting=setting, note=f"{n_large} runs")
            table.add(rule, "peak_mb", "unit", 0.0, setting=setting)
            continue
        wall_small, peak_small = measure(spec, kwargs_of(small, "small"))
        wall_large, peak_large = measure(spec, kwargs_of(large, "large"))
        per_unit = max(0.0, (wall_large - wall_small) / max(1, n_large - n_small))
        per_unit_mb = max(0.0, (peak_large - peak_small) / max(1, n_large - n_small))
        note = f"{n_small} and {n_large} units: {wall_small:.2f} s, {wall_large:.2f} s; {peak_small:.0f}, {peak_large:.0f} MB"
        table.add(rule, "seconds", "job", max(0.0, wall_small - per_unit * n_small), setting=setting, note=note)
        table.add(rule, "seconds", "unit", per_unit, setting=setting, note=note)
        table.add(rule, "peak_mb", "job", max(0.0, peak_small - per_unit_mb * n_small), setting=setting, note=note)
        table.add(rule, "peak_mb", "unit", per_unit_mb, setting=setting, note=note)
    # The audit: per file (hash-cache hits) on a copy of the demo run.
    copy = work / "audit_copy"
    if not copy.exists():
        shutil.copytree(results, copy, ignore=shutil.ignore_patterns(".cache"))
    files = sum(1 for p in copy.rglob("*") if p.is_file())
    first, peak = measure("bh_models.records.audit:write_audit",
                          {"results_dir": copy, "out_tsv": work / "audit.tsv", "out_html": work / "audit.html"})
    second, peak2 = measure("bh_models.records.audit:write_audit",
                            {"results_dir": copy, "out_tsv": work / "audit.tsv", "out_html": work / "audit.html"})
    table.add("audit", "seconds", "unit", second / files, setting=setting,
              note=f"{files} files, hash cache warm ({first:.1f} s cold: every file read)")
    table.add("audit", "seconds", "job", 0.0, setting=setting)
    table.add("audit", "peak_mb", "job", max(peak, peak2), setting=setting)
    table.add("audit", "peak_mb", "unit", 0.0, setting=setting)


def _flops_one_sample(model: str, size: str) -> tuple[float, int]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bh_models.models.nn.configs import model_config
    from bh_models.models.nn.harmonix_f import HarmonixF
    from bh_models.models.nn.harmonix_s import HarmonixS
    from bh_models.models.nn.harmonizer import Harmonizer

    torch.manual_seed(0)
    if model == "harmonix_f":
        config = model_config(model=model, size=size)
        net = HarmonixF(config, torch.randn(config.n_rois, config.geometry_dim))
        patches, k = 18, config.base_patch
        batch = {"x": torch.randn(1, config.n_rois, patches * k), "patch_mask": torch.ones(1, patches, dtype=torch.bool),
                 "k": torch.tensor([k])}

        def step():
            return net(batch, torch.Generator().manual_seed(0))[0]
    elif model == "harmonix_s":
        config = model_config(model=model, size=size)
        net = HarmonixS(config)
        batch = {"t1": torch.randn(1, 1, *config.img_size)}

        def step():
            return net(batch, torch.Generator().manual_seed(0))[0]
    else:
        f_config = model_config(model="harmonix_f", size=size)
        s_config = model_config(model="harmonix_s", size=size)
        config = model_config(model=model, size=size,
                              overrides={"dim_s": s_config.embed_dim, "dim_f": f_config.embed_dim})
        net = Harmonizer(config)
        encoder_f = HarmonixF(f_config, torch.randn(f_config.n_rois, f_config.geometry_dim))
        encoder_s = HarmonixS(s_config)
        patches = 18
        fmri = {"x": torch.randn(1, f_config.n_rois, patches * f_config.base_patch),
                "patch_mask": torch.ones(1, patches, dtype=torch.bool), "k": torch.tensor([f_config.base_patch])}
        volume = torch.randn(1, 1, *s_config.img_size)

        def step():
            with torch.no_grad():
                z_f, f_mask = encoder_f.encode(fmri)
                z_s = encoder_s.encode(volume)
            s_mask = torch.ones(z_s.shape[:2], dtype=torch.bool)
            return net(z_s, s_mask, z_f, f_mask)[0]
    parameters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as counter:
        step().backward()
    return float(counter.get_total_flops()), int(parameters)


def bench_pretraining(table: Table) -> None:
    print("pretraining FLOPs per sample (forward + backward; CPU count)", flush=True)
    import torch

    torch.set_num_threads(2)
    for size in ("tiny", "base"):
        for model, rule in (("harmonix_f", "pretrain_fmri"), ("harmonix_s", "pretrain_t1"),
                            ("harmonizer", "pretrain_harmonizer")):
            started = time.perf_counter()
            flops, parameters = _flops_one_sample(model, size)
            table.add(rule, "flops", "sample", flops, setting=f"model_size={size}",
                      note=f"18 TAPE patches of 48 frames x 400 ROIs; T1 160 x 192 x 160 "
                           f"({time.perf_counter() - started:.0f} s to count)")
            table.add(rule, "parameters", "model", parameters, setting=f"model_size={size}")


PARTS = ("anat", "func", "cohort", "pretraining")


def _anat_done(work: Path, config: dict) -> dict[str, dict[str, Path]]:
    """The anatomical outputs of an earlier run in the same --workdir (the functional part reads them)."""
    from bench_storage import anat_paths

    res = config["template"]["resolution"]
    grid = "x".join(map(str, config["anat"]["tensor_grid"]))
    done = {}
    for site, subject in (("siteA", "02"), ("siteC", "03")):
        paths = anat_paths(work / "anat" / f"{site}_{subject}_{grid}", f"sub-{subject}", res)
        if not paths["out_forward"].is_file():
            raise SystemExit(f"{paths['out_forward']} is missing: run the anat part first (same --workdir)")
        done[f"{site}/{subject}/{grid}"] = paths
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "demo_data")
    parser.add_argument("--demo-results", type=Path, required=True,
                        help="results folder of a finished demo run (read only)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-ukb-run", action="store_true", help="skip the UK-Biobank-sized functional run")
    parser.add_argument("--layouts", type=Path, default=Path(tempfile.gettempdir()) / "bh_bench_dag",
                        help="zero-byte layouts of 1,000 and 10,000 subjects (built if missing) for index_dataset")
    parser.add_argument("--out", type=Path, default=REPO / "bh_models" / "core" / "costs.tsv")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measure only these parts; the other rows of --out are kept")
    args = parser.parse_args()
    from bh_models.core.config import load_config

    config = load_config(REPO / "config.yaml", base_dir=REPO)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bh_bench_costs_"))
    machine = f"{platform.node()} ({os.cpu_count()} CPUs)"
    table = Table(f"benchmarks/bench_costs.py {date.today().isoformat()} on {machine}")
    parts = set(args.parts)
    previous = []
    if parts != set(PARTS) and args.out.is_file():  # keep the other parts' rows of the existing table
        import pandas as pd

        previous = pd.read_csv(args.out, sep="\t", dtype=str, keep_default_na=False).to_dict(orient="records")

    def save() -> None:  # after every part: a failure later keeps what was measured
        ours = {(r["rule"], r["quantity"], r["per"], r["item"], r["setting"]) for r in table.rows}
        kept = [r for r in previous if (r["rule"], r["quantity"], r["per"], r["item"], r["setting"]) not in ours]
        merged = Table(table.source)
        merged.rows = kept + table.rows
        merged.write(args.out)

    if "anat" in parts or "func" in parts:
        anat = bench_anat(table, args.demo, work, config) if "anat" in parts else _anat_done(work, config)
        save()
    if "func" in parts:
        bench_func(table, args.demo, work, config, anat, ukb_run=not args.no_ukb_run)
        save()
    if "cohort" in parts:
        bench_cohort_steps(table, args.demo_results, work, config, args.layouts)
        save()
    if "pretraining" in parts:
        bench_pretraining(table)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
