"""Measured costs of the workflow's steps, and the resources and plans derived from them.

``bh_models/core/costs.tsv`` is written by ``benchmarks/bench_costs.py`` (never by
hand): one row per measured quantity, in long form,

``rule``
    the rule (or ``storage`` for bytes of a derivative class);
``quantity``
    ``seconds`` (wall time, one thread), ``peak_mb`` (peak resident memory of
    the process), ``bytes`` (disk), ``flops`` (per training sample);
``per``
    what one value is for: ``unit`` (a subject's T1w or a BOLD run),
    ``frame`` (one volume of a BOLD run), ``job``, ``subject``, ``run``, ``sample``;
``item``
    the derivative class for ``bytes`` rows (``transforms``, ``mni``, ...), else empty;
``value``
    the measurement;
``setting``
    the configuration it was measured at (``resolution=2`` ...), compared with
    the run's config by :func:`setting_matches`;
``source``
    the benchmark, the data and the machine.

Rules ask for their resources through :func:`batch_resources` and
:func:`job_resources`: the measured peak and time with :data:`HEADROOM`, times
Snakemake's ``attempt`` (1 on the first try, 2 and 3 on the SLURM profile's
retries), so a job that ran out of memory or time is retried with more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

COSTS_PATH = Path(__file__).resolve().with_name("costs.tsv")
COST_COLUMNS = ["rule", "quantity", "per", "item", "value", "setting", "source"]

#: Multipliers on measured peaks and times: runs differ from the benchmark's data.
HEADROOM = {"mem_mb": 1.5, "runtime": 2.0}
#: Memory of the batch job's own process (it only schedules units and writes manifests).
BATCH_BASE_MB = 400
#: Smallest resources a job asks for.
MIN_MEM_MB, MIN_RUNTIME_MIN = 500, 5


@functools.lru_cache(maxsize=4)
def load_costs(path: str | Path = COSTS_PATH) -> pd.DataFrame:
    """The measured costs (columns :data:`COST_COLUMNS`)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = set(COST_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: columns {sorted(missing)} missing; rerun benchmarks/bench_costs.py")
    table["value"] = table["value"].astype(float)
    return table


def parse_setting(text: str) -> dict[str, str]:
    """``"resolution=2;tensor_grid=80x96x80"`` -> ``{"resolution": "2", "tensor_grid": "80x96x80"}``."""
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def config_setting(config: Mapping[str, Any]) -> dict[str, str]:
    """The config values the costs depend on, in the form of the ``setting`` column."""
    anat = config.get("anat", {})
    grid = anat.get("tensor_grid", [160, 192, 160])
    return {
        "resolution": f"{float(config.get('template', {}).get('resolution', 2)):g}",
        "registration_resolution": f"{float(anat.get('registration_resolution', 2)):g}",
        "tensor_grid": "x".join(str(int(n)) for n in grid),
        "skullstrip": str(anat.get("skullstrip", "deepbet")),
        "type_of_transform": str(anat.get("type_of_transform", "SyN")),
    }


def setting_matches(setting: str, config: Mapping[str, Any]) -> bool:
    """True when every key of a ``setting`` cell equals the config's value."""
    wanted = config_setting(config)
    return all(wanted.get(key, value) == value for key, value in parse_setting(setting).items())


@functools.lru_cache(maxsize=4)
def _cost_index(path: str | Path = COSTS_PATH) -> dict[tuple[str, str, str, str], list[tuple[dict, float]]]:
    # Planning asks for costs thousands of times (resources of every batch job): a dict, not pandas.
    index: dict[tuple[str, str, str, str], list[tuple[dict, float]]] = {}
    table = load_costs(path)
    for rule, quantity, per, item, value, setting in zip(table["rule"], table["quantity"], table["per"],
                                                         table["item"], table["value"], table["setting"]):
        index.setdefault((rule, quantity, per, item), []).append((parse_setting(setting), float(value)))
    return index


def cost(rule: str, quantity: str, *, per: str = "unit", item: str = "", config: Mapping[str, Any] | None = None,
         costs: pd.DataFrame | None = None) -> tuple[float, bool]:
    """A measured value, and whether it was measured at the config's setting.

    The row whose setting matches the config wins; without one, the row with
    the most matching keys (ties: the first) is returned with ``False``, so a
    caller can say the figure is taken from another setting.

    Raises
    ------
    KeyError
        When nothing was measured for ``rule``/``quantity``/``per``/``item``.
    """
    if costs is not None:
        rows = [(parse_setting(s), float(v)) for r, q, p, i, v, s in zip(
            costs["rule"], costs["quantity"], costs["per"], costs["item"], costs["value"], costs["setting"])
            if (r, q, p, i) == (rule, quantity, per, item)]
    else:
        rows = _cost_index().get((rule, quantity, per, item), [])
    if not rows:
        raise KeyError(f"no measured {quantity} per {per} for {rule} {item}".strip())
    if config is None:
        return rows[0][1], True
    wanted = config_setting(config)
    scored = []
    for position, (parsed, value) in enumerate(rows):
        agree = sum(wanted.get(k) == v for k, v in parsed.items())
        scored.append((agree == len(parsed), agree, -position, value))
    exact, _, _, value = max(scored)
    return value, exact


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def batch_resources(*, rule: str, units: int, workers: int, attempt: int = 1,
                    config: Mapping[str, Any] | None = None, mvoxel_frames: float | None = None) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` (minutes) of a batch job from the measured per-unit peak and time.

    Memory: :data:`BATCH_BASE_MB` plus one unit's peak per worker; time: the
    units a worker runs one after the other. Both with :data:`HEADROOM`, times
    ``attempt``. ``mvoxel_frames`` (voxels x volumes / 1e6 of a typical run) scales
    the functional time and memory, which grow with the run's size, when the table
    has ``per mvoxel_frame`` rows.
    """
    workers = max(1, min(int(workers), max(1, int(units))))
    peak, _ = cost(rule, "peak_mb", config=config)
    seconds, _ = cost(rule, "seconds", config=config)
    if mvoxel_frames is not None:
        try:
            seconds += cost(rule, "seconds", per="mvoxel_frame", config=config)[0] * float(mvoxel_frames)
            peak += cost(rule, "peak_mb", per="mvoxel_frame", config=config)[0] * float(mvoxel_frames)
        except KeyError:
            pass
    rounds = math.ceil(max(1, int(units)) / workers)
    mem = (BATCH_BASE_MB + peak * workers) * HEADROOM["mem_mb"]
    runtime = rounds * seconds / 60.0 * HEADROOM["runtime"]
    return _with_attempt(mem, runtime, attempt)


def _with_attempt(mem: float, runtime: float, attempt: int) -> dict[str, int]:
    # The floors first, then the attempt: a retry always asks for more than the first try did.
    return {"mem_mb": max(MIN_MEM_MB, _round_up(mem, 100)) * max(1, int(attempt)),
            "runtime": max(MIN_RUNTIME_MIN, _round_up(runtime, 1)) * max(1, int(attempt))}


def job_resources(*, rule: str, units: int = 1, attempt: int = 1,
                  config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` of a one-process job whose cost grows with ``units`` (runs, subjects).

    Uses the rule's ``per job`` row plus its ``per unit`` row times ``units``
    when the table has one, with :data:`HEADROOM`, times ``attempt``.
    """
    values = {}
    for quantity in ("peak_mb", "seconds"):
        total, _ = cost(rule, quantity, per="job", config=config)
        try:
            per_unit, _ = cost(rule, quantity, per="unit", config=config)
            total += per_unit * max(0, int(units))
        except KeyError:
            pass
        values[quantity] = total
    return _with_attempt(values["peak_mb"] * HEADROOM["mem_mb"], values["seconds"] / 60.0 * HEADROOM["runtime"],
                         attempt)


def run_size(path: str | Path) -> tuple[float | None, float | None]:
    """(voxels x volumes / 1e6, volumes) of a BOLD run from its NIfTI header; (None, None) when unreadable."""
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception:  # a zero-byte or unfetched file: callers fall back to the measured reference run
        return None, None
    if len(shape) != 4:
        return None, None
    return shape[0] * shape[1] * shape[2] * shape[3] / 1e6, float(shape[3])


# --------------------------------------------------------------------------- the cost plan (`bh plan`)

#: Sustained bf16 throughput assumed for the GPU-hour estimates (TFLOP/s): 35 % of an
#: H100 SXM's 989 dense bf16 TFLOP/s, a typical utilisation for ViT training. An
#: assumption, not a measurement (no GPU here): `bh plan --gpu-tflops` changes it.
DEFAULT_GPU_TFLOPS = 350.0

#: Rules whose jobs form the preprocessing group (one SLURM submission per batch pair).
GROUPED_RULES = ("anat_preprocess", "func_preprocess")


@dataclass(frozen=True)
class DatasetCounts:
    """What `bh plan` knows of a dataset before anything runs (from the index).

    Attributes
    ----------
    name, role : str
    subjects : int
        Subjects with a usable unit.
    anat_units, func_units : int
        T1w units and BOLD runs to preprocess.
    problems : int
        Problems the index lists (left out before any job).
    batch_labels : tuple of (str, bool, bool)
        Each non-empty batch: label, has anatomical units, has functional units.
    tasks : int
        Evaluation tasks (downstream roles).
    run_mvoxel_frames : float or None
        Voxels x volumes of a typical BOLD run / 1e6 (a header read), None when unknown.
    run_frames : float or None
        Volumes of a typical BOLD run.
    repetition_time : float or None
        Median TR (s) of the runs.
    """

    name: str
    role: str
    subjects: int
    anat_units: int
    func_units: int
    problems: int
    batch_labels: tuple
    tasks: int = 0
    run_mvoxel_frames: float | None = None
    run_frames: float | None = None
    repetition_time: float | None = None


def workflow_jobs(*, datasets: list[DatasetCounts], config: Mapping[str, Any],
                  pooled: bool | None = None) -> dict[str, int]:
    """Jobs per rule that `snakemake` plans for a fresh results folder (mirrors the rules; a test
    compares it with `snakemake -n`). ``pooled``: whether the evaluated datasets share a task
    (default: two or more evaluated datasets)."""
    pretrain = [d for d in datasets if d.role in ("pretrain", "both")]
    downstream = [d for d in datasets if d.role in ("downstream", "both")]
    external = bool(config.get("model", {}).get("bundle"))
    n = len(datasets)
    jobs = {
        "index_dataset": n, "dataset_description": n,
        "anat_preprocess": sum(1 for d in datasets for _, anat, _ in d.batch_labels if anat),
        "func_preprocess": sum(1 for d in datasets for _, _, func in d.batch_labels if func),
        "anat_qc_table": n, "func_qc_table": n, "augment_samples": n,
        "exclusion_table": 1, "boilerplate": 1, "audit": 1, "all": 1,
    }
    if not external:
        jobs.update({"make_splits": len(pretrain), "pack_fmri": len(pretrain), "pack_t1": len(pretrain),
                     "store_scaling": 1, "pretrain_fmri": 1, "pretrain_t1": 1, "pretrain_harmonizer": 1,
                     "make_bundle": 1, "geometry_eigenmodes": 2, "geometry_project": 2, "geometry_plot": 1,
                     "geometry_description": 1, "geometry_gradients": 1, "cache_latents": len(pretrain)})
    evaluated = [d for d in downstream if d.tasks]
    jobs["extract_embeddings"] = len(downstream)
    jobs["evaluate_dataset"] = len(evaluated)
    if pooled is None:
        pooled = len(evaluated) >= 2
    jobs["evaluate_pooled"] = int(bool(config.get("evaluate", {}).get("pooled", True) and len(evaluated) >= 2
                                       and pooled))
    if config.get("evaluate", {}).get("finetune", {}).get("enabled"):
        # Latent stores, the probes' folds and the fine-tuning job of every evaluated dataset (and pooled).
        for rule in ("extract_latents", "finetune_folds", "finetune"):
            jobs[rule] = len(evaluated)
        jobs["finetune_folds_pooled"] = jobs["finetune_pooled"] = jobs["evaluate_pooled"]
    return {rule: count for rule, count in jobs.items() if count}


def slurm_submissions(*, datasets: list[DatasetCounts], jobs: Mapping[str, int],
                      group_components: int) -> dict[str, int]:
    """SLURM jobs per rule: the preprocessing group (a batch's anatomical and functional jobs
    together, ``group_components`` groups per submission) counts under ``preproc group``;
    every other job is one submission; ``all`` (no action) none."""
    components = sum(len(d.batch_labels) for d in datasets)
    out = {"preproc group (anat_preprocess + func_preprocess)": math.ceil(components / max(1, group_components))}
    out.update({rule: count for rule, count in jobs.items() if rule not in GROUPED_RULES and rule != "all"})
    return out


def _mvf(dataset: DatasetCounts, costs: pd.DataFrame | None) -> tuple[float, bool]:
    if dataset.run_mvoxel_frames:
        return dataset.run_mvoxel_frames, True
    value, _ = cost("func_preprocess", "mvoxel_frames", per="reference_run", costs=costs)
    return value, False


def cpu_hours(*, datasets: list[DatasetCounts], jobs: Mapping[str, int], config: Mapping[str, Any],
              costs: pd.DataFrame | None = None) -> dict[str, float]:
    """CPU-hours per rule (one thread per unit for the batch rules): measured per-unit costs x units."""
    hours: dict[str, float] = {}
    anat, _ = cost("anat_preprocess", "seconds", config=config, costs=costs)
    hours["anat_preprocess"] = anat * sum(d.anat_units for d in datasets) / 3600
    per_run, _ = cost("func_preprocess", "seconds", config=config, costs=costs)
    per_mvf, _ = cost("func_preprocess", "seconds", per="mvoxel_frame", config=config, costs=costs)
    hours["func_preprocess"] = sum(d.func_units * (per_run + per_mvf * _mvf(d, costs)[0]) for d in datasets) / 3600
    units = {"index_dataset": lambda d: d.subjects, "anat_qc_table": lambda d: d.anat_units,
             "func_qc_table": lambda d: d.func_units, "augment_samples": lambda d: d.func_units,
             "make_splits": lambda d: d.anat_units, "pack_fmri": lambda d: d.func_units,
             "pack_t1": lambda d: d.anat_units}
    for rule, count in units.items():
        if rule not in jobs:
            continue
        chosen = datasets if rule in ("index_dataset", "anat_qc_table", "func_qc_table", "augment_samples") \
            else [d for d in datasets if d.role in ("pretrain", "both")]
        try:
            per_job, _ = cost(rule, "seconds", per="job", config=config, costs=costs)
            per_unit, _ = cost(rule, "seconds", per="unit", config=config, costs=costs)
        except KeyError:
            continue
        hours[rule] = sum(per_job + per_unit * count(d) for d in chosen) / 3600
    return hours


def gpu_hours(*, datasets: list[DatasetCounts], config: Mapping[str, Any], gpu_tflops: float = DEFAULT_GPU_TFLOPS,
              costs: pd.DataFrame | None = None) -> dict[str, float]:
    """GPU-hours of the three pretraining jobs: samples x measured FLOPs per sample / assumed throughput."""
    if config.get("model", {}).get("bundle"):
        return {}
    size = config.get("pretrain", {}).get("model_size", "base")
    table = load_costs() if costs is None else costs
    out = {}
    for model, rule in (("fmri", "pretrain_fmri"), ("t1", "pretrain_t1"), ("harmonizer", "pretrain_harmonizer")):
        settings = config.get("pretrain", {}).get(model, {})
        samples = settings.get("steps", 100000) * settings.get("batch_size", 32) * settings.get("grad_accum", 1)
        rows = table[(table["rule"] == rule) & (table["quantity"] == "flops")
                     & (table["setting"] == f"model_size={size}")]
        if rows.empty:
            continue
        out[rule] = samples * float(rows["value"].iloc[0]) / (gpu_tflops * 1e12) / 3600
    return out


def storage_bytes(*, datasets: list[DatasetCounts], config: Mapping[str, Any],
                  costs: pd.DataFrame | None = None) -> dict[str, dict[str, float]]:
    """Bytes of every derivative class: ``{class: {"per_unit": b, "units": n, "total": b * n}}``.

    Per-subject and per-run classes are the measured ones of a demo subject (functional
    tables scaled by the run's length when it is known); the training store and the
    checkpoints are computed from the config (float32 rows, parameter counts).
    """
    table = load_costs() if costs is None else costs
    rows = table[(table["rule"] == "storage") & (table["quantity"] == "bytes")]
    anat_units = sum(d.anat_units for d in datasets)
    func_units = sum(d.func_units for d in datasets)
    out: dict[str, dict[str, float]] = {}
    reference_frames = 160.0  # the demo run the functional classes were measured on
    frames = [d.run_frames for d in datasets if d.run_frames and d.func_units]
    scale = (sum(f * d.func_units for f, d in zip(frames, [d for d in datasets if d.run_frames and d.func_units]))
             / max(1, sum(d.func_units for d in datasets if d.run_frames))) / reference_frames if frames else 1.0
    for item, value in zip(rows["item"], rows["value"]):
        kind, _, name = item.partition(":")
        units = anat_units if kind == "anat" else func_units
        per_unit = float(value) * (scale if kind == "func" and name in ("parcel_series", "confounds") else 1.0)
        out[f"{kind}: {name}"] = {"per_unit": per_unit, "units": units, "total": per_unit * units}
    augment = config.get("augment", {})
    tau, max_patches = augment.get("tau", 35.28), augment.get("max_patches", 18)
    fmri = 0.0
    for d in datasets:
        if d.role not in ("pretrain", "both") or not d.func_units:
            continue
        tr = d.repetition_time or 0.735
        length = d.run_frames or reference_frames
        factors = config["datasets"][d.name].get("tr_factors", [1]) if d.name in config.get("datasets", {}) else [1]
        for f in factors:
            k = max(1, int(math.floor(tau / (f * tr) + 0.5)))
            fmri += d.func_units * (min(length / f, max_patches * k) * 400 * 4 + 2 * 400 * 8)
    grid = config.get("anat", {}).get("tensor_grid", [160, 192, 160])
    t1 = sum(d.anat_units for d in datasets if d.role in ("pretrain", "both")) * 4 * math.prod(grid)
    out["store: fmri shards"] = {"per_unit": fmri / max(1, func_units), "units": func_units, "total": fmri}
    out["store: t1 shards"] = {"per_unit": 4 * math.prod(grid), "units": anat_units, "total": t1}
    if not config.get("model", {}).get("bundle"):
        size = config.get("pretrain", {}).get("model_size", "base")
        params = table[(table["quantity"] == "parameters") & (table["setting"] == f"model_size={size}")]
        # Weights (checkpoint.pt) plus the resumable checkpoint: weights and two AdamW moments.
        total = float(params["value"].sum()) * 4 * (1 + 3)
        out["models: checkpoints"] = {"per_unit": total, "units": 1, "total": total}
    return out
